"""Built-in instruction data with known right answers, and how to score a model on it.

Two tasks derived from the built-in corpora (common/corpora.py), so that SFT and DPO runs
on the default data measure real learning:
- sentiment: "is this review positive or negative?" -> "正面" / "负面" (gold: the corpus label);
- segmentation: "segment this People's Daily sentence, words separated by '/'" ->
  "中央/电视台/..." (gold: the corpus's own segmentation).
Items are split train / valid / test by a seeded hash of their text, so the split does not
depend on the order of the corpus or on how many items are drawn.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from common.corpora import NEGATIVE, POSITIVE, load_reviews, load_segmentations
from common.templates import ChatTemplate, encode_chat, stop_criteria
from common.tokenizer import display_cleaner

SENTIMENT_PROMPT = "判断下面这条评论的情感是正面还是负面：\n{text}"
SEGMENT_PROMPT = "请给下面的句子分词，词与词之间用“/”隔开：\n{text}"
SENTIMENT_ANSWERS = {POSITIVE: "正面", NEGATIVE: "负面"}
SENTENCE_END = {"。", "！", "？"}
SPLITS = ("train", "valid", "test")


def split_of(text: str, seed: int, valid_share: float, test_share: float) -> str:
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{text}".encode(), digest_size=8).digest(), "big") / 2**64
    return "test" if u < test_share else "valid" if u < test_share + valid_share else "train"


def sentiment_items() -> list[dict]:
    """Deduplicated reviews of 6-120 characters whose text has one label only."""
    labels: dict[str, set[int]] = {}
    for text, label in load_reviews():
        text = re.sub(r"\s+", " ", text).strip()
        if 6 <= len(text) <= 120:
            labels.setdefault(text, set()).add(label)
    return [{"task": "sentiment", "text": t, "answer": SENTIMENT_ANSWERS[next(iter(ls))]}
            for t, ls in labels.items() if len(ls) == 1]


def segmentation_items(min_chars: int = 6, max_chars: int = 30) -> list[dict]:
    """People's Daily sentences (cut at 。！？) with their gold words joined by '/'."""
    seen, items = set(), []
    for words in load_segmentations():
        sentence: list[str] = []
        for word in words:
            sentence.append(word)
            if word in SENTENCE_END:
                text = "".join(sentence)
                if min_chars <= len(text) <= max_chars and "/" not in text and text not in seen:
                    seen.add(text)
                    items.append({"task": "segmentation", "text": text, "answer": "/".join(sentence)})
                sentence = []
    return items


def item_messages(item: dict) -> list[dict]:
    prompt = SENTIMENT_PROMPT if item["task"] == "sentiment" else SEGMENT_PROMPT
    return [{"role": "user", "content": prompt.format(text=item["text"])},
            {"role": "assistant", "content": item["answer"]}]


def builtin_items(per_task: dict[str, int], seed: int = 42, valid_share: float = 0.05,
                  test_share: float = 0.05, skip: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """Items per split; `per_task` caps how many of each task are drawn (all splits together),
    `skip` passes over the first ones of each task's seeded order (those an earlier draw of the
    same seed took: DPO draws past the SFT recipes' items)."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for task, items in (("sentiment", sentiment_items()), ("segmentation", segmentation_items())):
        rng.shuffle(items)
        first = (skip or {}).get(task, 0)
        for item in items[first:first + per_task.get(task, len(items))]:
            splits[split_of(item["text"], seed, valid_share, test_share)].append(item)
    for items in splits.values():
        rng.shuffle(items)
    return splits


def to_conversations(items: list[dict], multi_turn_share: float, seed: int) -> list[list[dict]]:
    """Single-turn conversations, with `multi_turn_share` of them merged in pairs into
    two-turn conversations (so that training sees replies in history)."""
    rng = random.Random(seed)
    conversations, pending = [], None
    for item in items:
        if rng.random() < multi_turn_share:
            if pending is None:
                pending = item
                continue
            conversations.append(item_messages(pending) + item_messages(item))
            pending = None
        else:
            conversations.append(item_messages(item))
    if pending is not None:
        conversations.append(item_messages(pending))
    return conversations


# ------------------------------------------------------------------ scoring
def parse_sentiment(reply: str) -> str | None:
    has_pos, has_neg = "正面" in reply, "负面" in reply
    return "正面" if has_pos and not has_neg else "负面" if has_neg and not has_pos else None


def _spans(words: list[str]) -> set[tuple[int, int]]:
    spans, at = set(), 0
    for word in words:
        spans.add((at, at + len(word)))
        at += len(word)
    return spans


def segmentation_scores(reply: str, gold: str) -> tuple[int, int, int]:
    """(correct words, predicted words, gold words); words are compared as character spans."""
    predicted = [w for w in re.sub(r"\s+", "", reply).split("/") if w]
    gold_words = gold.split("/")
    return len(_spans(predicted) & _spans(gold_words)), len(predicted), len(gold_words)


def f1(correct: int, predicted: int, gold: int) -> float:
    return 2 * correct / (predicted + gold) if predicted + gold else 0.0


def item_score(item: dict, reply: str) -> float:
    """One item's score: 1 / 0 for a right / wrong sentiment, the sentence's F1 for segmentation."""
    if item["task"] == "sentiment":
        return float(parse_sentiment(reply) == item["answer"])
    return f1(*segmentation_scores(reply, item["answer"]))


def paired_change(items: list[dict], before: list[str], after: list[str]) -> dict:
    """Per task, how many items scored higher / lower after than before, and the two-sided
    exact sign test's p-value of that split (the chance of one at least this uneven if the
    change were a coin toss per item): is a difference in accuracy more than noise?"""
    result = {}
    for task in sorted({i["task"] for i in items}):
        pairs = [(item_score(i, b), item_score(i, a)) for i, b, a in zip(items, before, after) if i["task"] == task]
        better = sum(a > b for b, a in pairs)
        worse = sum(a < b for b, a in pairs)
        n, k = better + worse, min(better, worse)
        p = min(1.0, 2 * sum(math.comb(n, j) for j in range(k + 1)) / 2**n) if n else 1.0
        result[task] = {"n": len(pairs), "better": better, "worse": worse, "sign_test_p": p}
    return result


def score(items: list[dict], replies: list[str]) -> dict:
    """Task metrics of replies to `items`, with the trivial answers beside them: the
    majority class for sentiment; one character per word for segmentation."""
    sentiment = [(i, r) for i, r in zip(items, replies) if i["task"] == "sentiment"]
    segmentation = [(i, r) for i, r in zip(items, replies) if i["task"] == "segmentation"]
    result: dict = {}
    if sentiment:
        answers = [i["answer"] for i, _ in sentiment]
        majority = max(set(answers), key=answers.count)
        parsed = [parse_sentiment(r) for _, r in sentiment]
        result["sentiment"] = {
            "n": len(sentiment),
            "accuracy": sum(p == i["answer"] for p, (i, _) in zip(parsed, sentiment)) / len(sentiment),
            "unparsable": sum(p is None for p in parsed) / len(sentiment),
            "majority_class_accuracy": answers.count(majority) / len(answers),
        }
    if segmentation:
        model = [segmentation_scores(r, i["answer"]) for i, r in segmentation]
        chars = [segmentation_scores("/".join(i["text"]), i["answer"]) for i, _ in segmentation]
        result["segmentation"] = {
            "n": len(segmentation),
            "f1": f1(*map(sum, zip(*model))),
            "exact_match": sum(r.replace(" ", "") == i["answer"] for i, r in segmentation) / len(segmentation),
            "one_char_per_word_f1": f1(*map(sum, zip(*chars))),
        }
    return result


@contextmanager
def quick_cpu_sampling():
    """Within the block, `torch.multinomial` draws one token per row of CPU probabilities by the
    inverse of their cumulative sum: the same distribution, about 30x faster than torch 2.13's CPU
    kernel, which draws an exponential variate for every vocabulary entry (7 ms for 64 rows of a
    5,664-token vocabulary, 0.2 ms this way, 2 cores). transformers' sampling calls it once per new
    token: a third of a GRPO step of the built-in model went there. Other calls (GPU tensors,
    several samples, invalid weights, which the original rejects) go to the original."""
    original = torch.multinomial

    def multinomial(input, num_samples, replacement=False, *, generator=None, out=None):
        if input.device.type != "cpu" or num_samples != 1 or out is not None or input.dim() not in (1, 2):
            return original(input, num_samples, replacement, generator=generator, out=out)
        cdf = input.double().cumsum(-1)
        total = cdf[..., -1:]
        if not (torch.isfinite(total).all() and (total > 0).all() and (input >= 0).all()):
            return original(input, num_samples, replacement, generator=generator, out=out)
        draw = torch.rand(total.shape, dtype=cdf.dtype, generator=generator) * total
        # right=True: the first entry whose cumulative sum exceeds the draw, never a zero-weight one
        return torch.searchsorted(cdf, draw, right=True).clamp_(max=input.shape[-1] - 1)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@contextmanager
def plain_generation(model):
    """Within the block, `model.generate` uses only the settings its call passes: transformers fills
    every setting a call leaves unset from the model's generation_config.json, so a converted
    Baichuan2-Chat (repetition_penalty 1.05, top_p 0.85) would be scored under its chat defaults,
    not greedily, and differently from what the server says at temperature 0."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel's HF model
    saved, inner.generation_config = inner.generation_config, GenerationConfig()
    try:
        yield
    finally:
        inner.generation_config = saved


@torch.inference_mode()
def generate_replies(model, tokenizer, template: ChatTemplate, conversations: list[list[dict]],
                     max_new_tokens: int = 64, batch_size: int = 32, desc: str = "generating",
                     temperature: float = 0.0) -> list[str]:
    """Replies to the last user turn of each conversation, prompted exactly as in training
    (`encode_chat`), in left-padded batches: greedy, or sampled at `temperature` > 0 (and nothing
    else of the model's generation_config: `plain_generation`)."""
    stop_ids, stop_texts = stop_criteria(tokenizer, template)
    clean = display_cleaner(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    prompts = [encode_chat(tokenizer, template, c, add_generation_prompt=True).input_ids for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less padding
    replies = [""] * len(prompts)
    was_training = model.training
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False):
        batch = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, longest - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, longest - len(prompts[i]):] = 1
        sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        with quick_cpu_sampling(), plain_generation(model):
            out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), **sampling,
                                 max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad)
        for row, i in enumerate(batch):
            new = out[row, longest:].tolist()
            cut = next((k for k, t in enumerate(new) if t in stop_ids), len(new))
            text = clean(tokenizer.decode(new[:cut], skip_special_tokens=True))
            for stop in stop_texts:
                text = text.split(stop)[0]
            replies[i] = text.strip()
    model.train(was_training)
    return replies
