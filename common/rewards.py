"""Verifiable rewards for GRPO (baichuan2_dpo/train_grpo.py): each scores one reply against its
item's gold answer.

A reward is a plain function

    def my_reward(prompt: str, completion: str, gold: str) -> float

`prompt` is the user's last message, `completion` the generated reply (its end marker removed),
`gold` the item's `answer` field. Add a keyword parameter `stopped` to also learn whether the
reply ended with the template's end marker (True) or ran into the length limit (False). Name
your own in the config as `module:function`, e.g. a file my_rewards.py next to where you run:

    # my_rewards.py
    def short_and_right(prompt, completion, gold, stopped=True):
        return float(completion.strip() == gold) - 0.01 * len(completion)

    rewards: [my_rewards:short_and_right, format]      # in the GRPO config
    reward_weights: [1.0, 0.5]

The built-in ones (`rewards: [task, format]`):
  task    sentiment (gold 正面 / 负面): 1 if the reply's label is the gold one, else 0;
          segmentation: word F1 of the reply against the gold segmentation (0..1)
  format  1 if the reply is well formed for its task and stopped: sentiment, the label alone;
          segmentation, the sentence's own characters (nothing added, dropped or changed)
          joined by "/"; else 0
"""

from __future__ import annotations

from common.instructions import SENTIMENT_ANSWERS, f1, parse_sentiment, segmentation_scores


def is_sentiment(gold: str) -> bool:
    return gold in SENTIMENT_ANSWERS.values()


def task(prompt: str, completion: str, gold: str) -> float:
    """The task's own score: exact label for sentiment, word F1 for segmentation."""
    if is_sentiment(gold):
        return float(parse_sentiment(completion) == gold)
    return f1(*segmentation_scores(completion, gold))


def format(prompt: str, completion: str, gold: str, stopped: bool = True) -> float:  # noqa: A001 (the config's name)
    """1 for a reply of the task's form that ended with the end marker."""
    reply = completion.strip()
    if not stopped or not reply:
        return 0.0
    if is_sentiment(gold):
        return float(reply in SENTIMENT_ANSWERS.values())
    words = reply.split("/")
    sentence = gold.replace("/", "")  # the prompt's sentence, as the gold segmentation spells it
    return float(all(words) and "".join(words) == sentence)


BUILTIN = {"task": task, "format": format}
