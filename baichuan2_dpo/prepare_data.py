"""Preference pairs for DPO: read, convert, validate, split, write as JSONL.

    python baichuan2_dpo/prepare_data.py                                  # built-in pairs (sentiment, segmentation)
    python baichuan2_dpo/prepare_data.py --input my_pairs.jsonl           # prompt / chosen / rejected
    python baichuan2_dpo/prepare_data.py --input 'hh-rlhf/*.jsonl'        # Anthropic hh-rlhf layout

Accepted records (JSONL or a JSON array), one pair each:
  {"prompt": "...", "chosen": "...", "rejected": "..."}
  {"prompt": [{"role": "user", "content": "..."}, ...], "chosen": "...", "rejected": "..."}   (multi-turn prompt)
  {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "\\n\\nHuman: ...\\n\\nAssistant: ..."}  (hh-rlhf)
A hh-rlhf pair is two whole dialogues: every `\\n\\nHuman:` / `\\n\\nAssistant:` marker (with or
without the space after the colon, also the dialogue's last one) becomes a turn, the turns both
dialogues share become the prompt (a message list, rendered later with the model's chat
template), and the final assistant turns are chosen and rejected. A record in no known layout
ends the run with its file and line; pairs that cannot be used are dropped and counted:
empty prompt or reply, chosen == rejected, dialogues that part before their last reply.

Built-in default: the built-in tasks with known answers (common/instructions.py), the gold
answer as chosen and a wrong one as rejected (the other sentiment; a segmentation with words
wrongly merged or split); the same hash split as the SFT recipes, so the test items were held
out from SFT as well. Every row keeps `task` and `answer` (scoring generations; train_grpo.py's
gold answers).

Writes `train.jsonl`, `valid.jsonl`, `test.jsonl` and `report.json` under --output_dir.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from common.config import parse_args
from common.data import resolve_files
from common.errors import UserError, cli_main
from common.instructions import (
    SENTIMENT_ANSWERS,
    builtin_items,
    generate_replies,
    item_messages,
    item_score,
    parse_sentiment,
    split_of,
)
from common.sft_train import SFTPrepareArguments, write_splits

HH_MARKER = re.compile(r"\n\n(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class PrepareArguments:
    input: list[str] | None = field(
        default=None, metadata={"help": "Your JSON / JSONL files, folders or globs. Default: the built-in pairs."})
    output_dir: str = field(default="data/baichuan2_dpo", metadata={"help": "Where the JSONL files go."})
    valid_ratio: float = field(default=0.05, metadata={"help": "Share of pairs held out for validation."})
    test_ratio: float = field(default=0.1, metadata={"help": "Share held out for the final test."})
    sentiment_items: int = field(default=4000, metadata={"help": "Built-in: reviews drawn (all splits)."})
    segmentation_items: int = field(default=1000, metadata={"help": "Built-in: sentences drawn (all splits)."})
    skip_sft_items: bool = field(default=True, metadata={
        "help": "Built-in: draw past the items the SFT recipes' defaults draw, so the training pairs are new "
                "to the SFT model (the test items of both are held out either way)."})
    rejected_from: str | None = field(default=None, metadata={
        "help": "Built-in: a chat model (the SFT model DPO will start from, or its adapter). Its own greedy "
                "reply to each training item, where wrong, becomes the rejected answer (on-policy pairs); "
                "right replies keep the constructed wrong answer. Validation pairs stay constructed."})
    rejected_batch_size: int = 32
    pairs_from_samples: str | None = field(default=None, metadata={
        "help": "Built-in: a chat model (the SFT model DPO will start from). It samples --samples_per_item "
                "replies to each training item; the best-scoring one (sentiment right, highest segmentation F1) "
                "is chosen, the worst rejected, items whose samples all score the same are dropped (counted): "
                "on-policy pairs of behaviour the model already produces. Validation pairs stay constructed."})
    samples_per_item: int = 4
    sample_temperature: float = 1.0
    seed: int = 42


# ----------------------------------------------------------------------------- hh-rlhf
def parse_hh(text: str) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}]."""
    pieces = HH_MARKER.split(text)
    if len(pieces) < 3:
        raise ValueError("no \\n\\nHuman: / \\n\\nAssistant: markers")
    if pieces[0].strip():
        raise ValueError("text before the first \\n\\nHuman: marker")
    return [{"role": HH_ROLES[role], "content": content.strip()} for role, content in zip(pieces[1::2], pieces[2::2])]


def hh_pair(chosen: str, rejected: str) -> dict:
    """The prompt both dialogues share and their last replies; raises ValueError when they
    part before the last reply (or do not end with one)."""
    good, bad = parse_hh(chosen), parse_hh(rejected)
    shared = 0
    while shared < min(len(good), len(bad)) and good[shared] == bad[shared]:
        shared += 1
    if shared == len(good) == len(bad):  # the same dialogue twice: shows up as chosen == rejected
        shared -= 1
    rest_good, rest_bad = good[shared:], bad[shared:]
    if len(rest_good) != 1 or len(rest_bad) != 1 or rest_good[0]["role"] != "assistant" \
            or rest_bad[0]["role"] != "assistant":
        raise ValueError("the dialogues part before their last reply")
    return {"prompt": good[:shared], "chosen": rest_good[0]["content"], "rejected": rest_bad[0]["content"]}


# ------------------------------------------------------------------------------ reading
def to_pair(record: dict) -> dict:
    """One record of any accepted layout as {"prompt": messages, "chosen": str, "rejected": str};
    ValueError when it cannot be used, KeyError / TypeError when it is no known layout."""
    if "prompt" not in record and isinstance(record.get("chosen"), str) and "\n\nHuman:" in record["chosen"]:
        return hh_pair(record["chosen"], record["rejected"])
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys() for m in prompt):
        raise TypeError("prompt must be a string or a list of {role, content} messages")
    replies = []
    for reply in (chosen, rejected):
        if isinstance(reply, list):  # [{"role": "assistant", "content": ...}]
            reply = "".join(m["content"] for m in reply)
        if not isinstance(reply, str):
            raise TypeError("chosen and rejected must be strings or assistant messages")
        replies.append(reply.strip())
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "chosen": replies[0], "rejected": replies[1]}


def problem(pair: dict) -> str | None:
    """Why a pair cannot teach a preference, or None."""
    if not pair["prompt"] or not any(m["content"].strip() for m in pair["prompt"] if m["role"] == "user"):
        return "empty_prompt"
    if pair["prompt"][-1]["role"] != "user":
        return "prompt_not_ending_with_user"
    if not pair["chosen"] or not pair["rejected"]:
        return "empty_reply"
    if pair["chosen"] == pair["rejected"]:
        return "chosen_equals_rejected"
    return None


def read_pairs(inputs: list[str]) -> tuple[list[dict], dict]:
    pairs, dropped, read = [], {}, 0
    for path in resolve_files(inputs, extensions=(".json", ".jsonl")):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            records = json.loads(text) if path.suffix == ".json" else None
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
        lines = list(enumerate(records, 1)) if records is not None else \
            [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        for n, record in lines:
            where = f"{path}:{n}" if records is None else f"{path}, record {n}"
            try:
                record = json.loads(record) if isinstance(record, str) else record
                pair = to_pair(record)
            except json.JSONDecodeError as err:
                raise UserError(f"{where}: not valid JSON ({err.msg})") from None
            except (KeyError, TypeError, AttributeError) as err:
                raise UserError(f"{where}: expected prompt / chosen / rejected, or hh-rlhf chosen / rejected "
                                f"dialogues ({err})") from None
            except ValueError as err:
                read += 1
                dropped["unusable_dialogue"] = dropped.get("unusable_dialogue", 0) + 1
                if dropped["unusable_dialogue"] <= 3:
                    print(f"{where}: dropped: {err}")
                continue
            read += 1
            reason = problem(pair)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            pairs.append(pair)
    return pairs, {"read": read, "dropped": dropped}


# ----------------------------------------------------------------------------- built-in
def wrong_segmentation(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: a few neighbouring words merged, or a word split in two."""
    words = answer.split("/")
    for _ in range(max(1, len(words) // 4)):
        i = rng.randrange(len(words))
        if len(words[i]) > 1 and (rng.random() < 0.5 or len(words) == 1):
            cut = rng.randrange(1, len(words[i]))
            words[i:i + 1] = [words[i][:cut], words[i][cut:]]
        elif i + 1 < len(words):
            words[i:i + 2] = [words[i] + words[i + 1]]
    wrong = "/".join(words)
    return wrong if wrong != answer else "/".join(answer.replace("/", ""))


def is_right(item: dict, reply: str) -> bool:
    if item["task"] == "sentiment":
        return parse_sentiment(reply) == item["answer"]
    return reply.replace(" ", "") == item["answer"]


def best_worst_pair(item: dict, replies: list[str]) -> dict | None:
    """The best- and the worst-scoring of a model's non-empty replies to one item as chosen /
    rejected (the first of equals), None when fewer than two remain or they all score the same."""
    replies = [reply for reply in replies if reply]
    if len(replies) < 2:
        return None
    scores = [item_score(item, reply) for reply in replies]
    best, worst = max(range(len(scores)), key=scores.__getitem__), min(range(len(scores)), key=scores.__getitem__)
    if scores[best] == scores[worst]:
        return None
    return {"chosen": replies[best], "rejected": replies[worst], "scores": [scores[best], scores[worst]]}


def own_replies(model_path: str, items: list[dict], batch_size: int, temperature: float = 0.0) -> list[str]:
    """The model's replies to the items (greedy, or sampled at `temperature`), prompted with the
    template it was tuned with."""
    import torch

    from common.sft_train import load_start_model
    from common.templates import get_template, resolve_template

    model, tokenizer = load_start_model(model_path, torch.float32)
    template = resolve_template(None, tokenizer, model_path) or get_template("baichuan2")
    return generate_replies(model, tokenizer, template, [item_messages(i)[:1] for i in items],
                            batch_size=batch_size, desc=f"replies of {model_path}", temperature=temperature)


def builtin_pairs(args: PrepareArguments) -> tuple[dict[str, list[dict]], dict]:
    skip = {"sentiment": SFTPrepareArguments.sentiment_items,
            "segmentation": SFTPrepareArguments.segmentation_items} if args.skip_sft_items else None
    items = builtin_items({"sentiment": args.sentiment_items, "segmentation": args.segmentation_items},
                          args.seed, args.valid_ratio, args.test_ratio, skip)
    rng = random.Random(args.seed)
    other = {a: b for a, b in zip(SENTIMENT_ANSWERS.values(), reversed(list(SENTIMENT_ANSWERS.values())))}
    report: dict = {"source": "built-in", "skipped_sft_items": skip}
    own = {}
    if args.rejected_from:
        replies = own_replies(args.rejected_from, items["train"], args.rejected_batch_size)
        own = {i: reply for i, (item, reply) in enumerate(zip(items["train"], replies))
               if reply.strip() and not is_right(item, reply)}
        report["rejected_from"] = {"model": args.rejected_from, "own_wrong_replies": len(own),
                                   "of": len(items["train"])}
    sampled = {}
    if args.pairs_from_samples:
        n = args.samples_per_item
        replies = own_replies(args.pairs_from_samples, [i for i in items["train"] for _ in range(n)],
                              args.rejected_batch_size, args.sample_temperature)
        for i, item in enumerate(items["train"]):
            pair = best_worst_pair(item, replies[i * n:(i + 1) * n])
            if pair is not None:
                sampled[i] = pair
        kept = [p["scores"] for p in sampled.values()]
        report["pairs_from_samples"] = {
            "model": args.pairs_from_samples, "samples_per_item": n, "temperature": args.sample_temperature,
            "items": len(items["train"]), "pairs": len(sampled), "dropped_all_samples_equal": len(items["train"]) -
            len(sampled), "mean_chosen_score": sum(c for c, _ in kept) / max(1, len(kept)),
            "mean_rejected_score": sum(r for _, r in kept) / max(1, len(kept))}
    splits = {}
    for split, split_items in items.items():
        rows = []
        for i, item in enumerate(split_items):
            if split == "train" and args.pairs_from_samples:
                if i in sampled:
                    rows.append({"prompt": item_messages(item)[:1], "chosen": sampled[i]["chosen"],
                                 "rejected": sampled[i]["rejected"], **item})
                continue
            if split == "train" and i in own:
                rejected = own[i].strip()
            elif item["task"] == "sentiment":
                rejected = other[item["answer"]]
            else:
                rejected = wrong_segmentation(item["answer"], rng)
            row = {"prompt": item_messages(item)[:1], "chosen": item["answer"], "rejected": rejected}
            rows.append({**row, **item})  # task and answer kept: scoring, and GRPO's gold answers
        splits[split] = rows
    return splits, report


# ---------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PrepareArguments], argv, description=__doc__)
    if not (0 <= args.valid_ratio < 1 and 0 <= args.test_ratio < 1 and args.valid_ratio + args.test_ratio < 1):
        raise UserError("need 0 <= valid_ratio, test_ratio and valid_ratio + test_ratio < 1")
    out = Path(args.output_dir)
    if args.input is None:
        splits, report = builtin_pairs(args)
    else:
        pairs, report = read_pairs(args.input)
        splits, seen = {"train": [], "valid": [], "test": []}, set()
        for pair in pairs:
            key = json.dumps(pair, ensure_ascii=False, sort_keys=True)
            if key in seen:
                report["dropped"]["duplicate"] = report["dropped"].get("duplicate", 0) + 1
                continue
            seen.add(key)
            splits[split_of(key, args.seed, args.valid_ratio, args.test_ratio)].append(pair)
        report["source"] = args.input
    report["pairs"] = {split: len(rows) for split, rows in splits.items()}
    if not splits["train"]:
        raise UserError(f"no usable training pairs: {json.dumps(report, ensure_ascii=False)}")
    return write_splits(out, splits, report)


if __name__ == "__main__":
    main()
