"""Supervised fine-tuning data, shared by chatglm_lora, model_baichuan and baichuan2_dpo.

From files to training rows:
1. `read_conversations`: JSON / JSONL / CSV files in any of the accepted layouts become
   conversations (`[{"role", "content"}, ...]`), each remembering its file and line. Bad
   records end the run with one message naming file, line and what was expected.
   - messages:      {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
   - ShareGPT:      {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
   - alpaca:        {"instruction": ..., "input": ..., "output": ..., "system"?, "history"?: [[q, a], ...]}
   - content/summary (ADGEN): {"content": ..., "summary": ...}
   - CSV `text` column in the llama2-chinese layout: "<s>Human: ...\\n</s><s>Assistant: ...\\n</s>"
2. `tokenize_conversations`: `common.templates.encode_chat` gives ids and labels (loss on
   every assistant reply only). A conversation longer than `max_length` loses whole turns
   from its end, never part of a reply; one whose first exchange alone is too long is
   dropped. Both are counted in the returned report.
3. `pack`: examples packed into rows of at most `max_length` tokens (best fit, longest
   first) with `position_ids` restarting at 0 for every example. The models' attention
   masks (transformers' `find_packed_sequence_indices`) turn restarting positions into a
   block-diagonal mask, so packed examples never attend to each other.
4. `ReplyLossTrainer`: the Trainer with the LM head applied only where a reply token is
   predicted (same loss); `register_liger_glm` lets `use_liger_kernel` cover GLM-4-9B.
"""

from __future__ import annotations

import bisect
import csv
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import Trainer

from common.data import check_utf8, resolve_files
from common.errors import UserError
from common.templates import IGNORE_INDEX, check_messages, encode_chat

logger = logging.getLogger(__name__)

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "chatgpt": "assistant", "bing": "assistant", "system": "system"}


@dataclass
class Conversation:
    messages: list[dict]
    source: str  # "file:line"


# ------------------------------------------------------------------ reading
def _text(value, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def record_to_messages(record, where: str) -> list[dict]:
    """One JSON record in any accepted layout -> messages (validated)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        messages = [{"role": m.get("role"), "content": m.get("content")} if isinstance(m, dict) else m
                    for m in messages]
    elif "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'conversations' must be a list of {{from, value}} objects")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in SHAREGPT_ROLES:
                raise UserError(f"{where}: conversations[{i}]: 'from' must be one of {', '.join(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn.get("value")})
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _text(record["system"], where, "system")})
    elif "instruction" in record and "output" in record:
        instruction = _text(record["instruction"], where, "instruction")
        extra = _text(record.get("input") or "", where, "input")
        messages = [{"role": "system", "content": _text(record["system"], where, "system")}] \
            if record.get("system") else []
        history = record.get("history") or []
        if not isinstance(history, list) or any(not isinstance(h, list) or len(h) != 2 for h in history):
            raise UserError(f"{where}: 'history' must be a list of [question, answer] pairs")
        for question, answer in history:
            messages += [{"role": "user", "content": _text(question, where, "history")},
                         {"role": "assistant", "content": _text(answer, where, "history")}]
        messages += [{"role": "user", "content": f"{instruction}\n{extra}" if extra else instruction},
                     {"role": "assistant", "content": _text(record["output"], where, "output")}]
    elif "content" in record and "summary" in record:
        messages = [{"role": "user", "content": _text(record["content"], where, "content")},
                    {"role": "assistant", "content": _text(record["summary"], where, "summary")}]
    else:
        raise UserError(f"{where}: unknown record layout (keys: {', '.join(map(str, record)) or 'none'}); expected "
                        "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (alpaca) or "
                        "'content'+'summary'")
    try:
        check_messages(messages, for_generation=False)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return messages


_LLAMA2_TURN = re.compile(r"<s>(Human|Assistant|System): (.*?)\n?</s>", re.S)
_LLAMA2_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


def llama2_text_to_messages(text: str, where: str) -> list[dict]:
    """"<s>Human: q\\n</s><s>Assistant: a\\n</s>..." -> messages."""
    turns = _LLAMA2_TURN.findall(text)
    if not turns or _LLAMA2_TURN.sub("", text).strip():
        raise UserError(f"{where}: 'text' is not in the llama2-chinese layout "
                        r"'<s>Human: ...\n</s><s>Assistant: ...\n</s>'")
    messages = [{"role": _LLAMA2_ROLES[role], "content": content} for role, content in turns]
    try:
        check_messages(messages, for_generation=False)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return messages


def read_conversations(inputs: str | list[str]) -> list[Conversation]:
    """Every conversation of the given files / folders / globs (.json, .jsonl, .csv)."""
    conversations = []
    for path in resolve_files(inputs):
        check_utf8(path)
        if path.suffix == ".csv":
            conversations += _read_csv(path)
        else:
            conversations += _read_json(path)
    if not conversations:
        raise UserError(f"no conversations in {inputs}")
    return conversations


def _read_json(path: Path) -> list[Conversation]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
        return [Conversation(record_to_messages(r, f"{path} item {i}"), f"{path} item {i}")
                for i, r in enumerate(records)]
    conversations = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: malformed JSON ({err.msg}); expected one JSON object per line") from None
        conversations.append(Conversation(record_to_messages(record, where), where))
    return conversations


def _read_csv(path: Path) -> list[Conversation]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise UserError(f"{path}: a CSV needs a 'text' column in the llama2-chinese layout "
                            f"(columns found: {', '.join(reader.fieldnames or []) or 'none'})")
        return [Conversation(llama2_text_to_messages(row["text"] or "", f"{path} row {i}"), f"{path} row {i}")
                for i, row in enumerate(reader, 2)]


# --------------------------------------------------------------- tokenizing
def _encode_within(tokenizer, template, messages: list[dict], max_length: int):
    """The longest prefix of whole exchanges that fits: (encoded or None, turns dropped)."""
    encoded = encode_chat(tokenizer, template, messages)
    if len(encoded.input_ids) <= max_length:
        return encoded, 0
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        encoded = encode_chat(tokenizer, template, messages[:end])
        if len(encoded.input_ids) <= max_length:
            return encoded, len(messages) - end
    return None, len(messages)


def tokenize_conversations(tokenizer, template, conversations: list[Conversation],
                           max_length: int, num_proc: int | None = None) -> tuple[Dataset, dict]:
    """Rows with `input_ids`, `labels` (and `source`); the report counts what was cut."""
    raw = Dataset.from_dict({"messages": [json.dumps(c.messages, ensure_ascii=False) for c in conversations],
                             "source": [c.source for c in conversations]})

    def encode(row):
        try:
            encoded, dropped = _encode_within(tokenizer, template, json.loads(row["messages"]), max_length)
        except UserError as err:  # the template cannot render this conversation
            raise UserError(f"{row['source']}: {err} (template {template.name})") from None
        if encoded is None:
            return {"input_ids": [], "labels": [], "turns_dropped": dropped, "status": "too_long"}
        status = "truncated" if dropped else "whole"
        if all(label == IGNORE_INDEX for label in encoded.labels):
            status = "no_reply_tokens"
        return {"input_ids": encoded.input_ids, "labels": encoded.labels, "turns_dropped": dropped, "status": status}

    rows = raw.map(encode, num_proc=num_proc if num_proc and num_proc > 1 and len(raw) > 2000 else None,
                   remove_columns=["messages"], desc="tokenizing")
    status = Counter(rows["status"])
    too_long = [s for s, st in zip(rows["source"], rows["status"]) if st == "too_long"]
    report = {
        "conversations": len(rows),
        "kept_whole": status["whole"],
        "truncated": status["truncated"],  # later turns dropped so that the rest fits
        "turns_dropped": sum(d for d, st in zip(rows["turns_dropped"], rows["status"]) if st == "truncated"),
        "dropped_too_long": status["too_long"],  # even the first exchange is over max_length
        "dropped_no_reply_tokens": status["no_reply_tokens"],
        "examples_too_long": too_long[:5],
        "max_length": max_length,
    }
    kept = rows.filter(lambda st: st in ("whole", "truncated"), input_columns="status")
    return kept.remove_columns(["status", "turns_dropped"]), report


def format_report(name: str, report: dict) -> str:
    line = (f"{name}: {report['conversations']} conversations, {report['kept_whole']} whole, "
            f"{report['truncated']} truncated ({report['turns_dropped']} later turns dropped to fit "
            f"{report['max_length']} tokens), {report['dropped_too_long']} dropped (first exchange too long)")
    if report["dropped_no_reply_tokens"]:
        line += f", {report['dropped_no_reply_tokens']} dropped (reply tokenizes to nothing)"
    if report["examples_too_long"]:
        line += f"; e.g. {', '.join(report['examples_too_long'][:3])}"
    return line


# ------------------------------------------------------------------ packing
def pack_bins(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices grouped into bins of total length <= max_length: best fit, longest first."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, bin), sorted
    for i in order:
        if lengths[i] > max_length:
            raise ValueError(f"example {i} has {lengths[i]} tokens, over max_length {max_length}")
        at = bisect.bisect_left(room, (lengths[i], -1))
        if at < len(room):
            free, b = room.pop(at)
        else:
            free, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        if free - lengths[i] > 0:
            bisect.insort(room, (free - lengths[i], b))
    return bins


def pack(dataset: Dataset, max_length: int) -> Dataset:
    """One row per bin: examples concatenated, `position_ids` restarting for each."""
    bins = pack_bins([len(ids) for ids in dataset["input_ids"]], max_length)
    input_ids, labels = dataset["input_ids"], dataset["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for members in sorted(bins, key=min):  # keep roughly the original order
        row_ids, row_labels, row_pos = [], [], []
        for i in members:
            row_ids += input_ids[i]
            row_labels += [IGNORE_INDEX] + labels[i][1:]  # a row's first label never sees the previous example
            row_pos += range(len(input_ids[i]))
        rows["input_ids"].append(row_ids)
        rows["labels"].append(row_labels)
        rows["position_ids"].append(row_pos)
    return Dataset.from_dict(rows)


def real_tokens(dataset: Dataset) -> int:
    return sum(len(ids) for ids in dataset["input_ids"])


# ---------------------------------------------------------------- collators
class PaddingCollator:
    """Pads a batch to its longest example (rounded up to a multiple of 8): right padding,
    labels -100 on padding."""

    def __init__(self, pad_token_id: int, multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.multiple_of = multiple_of

    def __call__(self, features: list[dict]) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        longest = -(-longest // self.multiple_of) * self.multiple_of
        ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            mask[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class PackedCollator:
    """Packed rows (from `pack`) of a batch flattened into one row: no padding at all; the
    restarting `position_ids` keep examples apart. No attention_mask and no KV cache on
    purpose: with either, transformers does not look for packed sequences."""

    def __call__(self, features: list[dict]) -> dict:
        def cat(key: str) -> torch.Tensor:
            return torch.tensor([x for f in features for x in f[key]], dtype=torch.long)[None]

        labels = cat("labels")
        starts = torch.cumsum(torch.tensor([0] + [len(f["input_ids"]) for f in features[:-1]]), 0)
        labels[0, starts] = IGNORE_INDEX
        return {"input_ids": cat("input_ids"), "labels": labels, "position_ids": cat("position_ids"),
                "use_cache": False}


# ------------------------------------------------------------------- loss
class ReplyLossTrainer(Trainer):
    """The Trainer, with the LM head applied only where a reply token is predicted.

    In SFT most positions are prompt (no loss), yet the model computes [T, vocab] logits
    for all of them; with a small model and a large vocabulary that head is most of the work.
    The positions whose next token carries a label go to the model as `logits_to_keep` (an
    index tensor, which transformers' causal LMs accept), and the loss is the same
    token-summed cross-entropy over the same count (`num_items_in_batch`) as the model's
    own loss. Evaluation, training with Liger's fused loss and DataParallel (several GPUs, one
    process, no --device_map) take the usual path.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or self.args.use_liger_kernel or "labels" not in inputs or self.args.n_gpu > 1:
            # n_gpu > 1: one process driving several GPUs through nn.DataParallel, which would cut the
            # positions tensor into pieces as if it were a batch
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        targets = inputs.pop("labels")[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(-1)  # predicting positions (all rows)
        # A model chained over GPUs (--device_map): accelerate's top-level hook would move an index
        # tensor to the first GPU while the hidden states it indexes sit on the last; a list of ints
        # is left alone and indexes on whatever GPU the hidden states are.
        chained = len(set(getattr(model, "hf_device_map", {}).values())) > 1
        logits = model(**inputs, logits_to_keep=keep.tolist() if chained else keep).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets[:, keep].flatten(),
                                                 ignore_index=IGNORE_INDEX, reduction="sum")
        count = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
        loss = loss / torch.clamp(torch.as_tensor(count, device=loss.device), min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # as the Trainer does for the model's own loss
        return loss


# ------------------------------------------------------------ fused kernels
# liger-kernel (0.8.5) covers glm4 (GLM-4-0414) but not glm (GlmForCausalLM: the GLM-4-9B -hf
# checkpoints), for which the Trainer's use_liger_kernel=True silently did nothing. GLM-4-9B is
# Glm4 without its two extra norms per layer, so Liger's Glm4 pieces fit it.
def apply_liger_kernel_to_glm(rope: bool = False, cross_entropy: bool = False, fused_linear_cross_entropy: bool = True,
                              rms_norm: bool = True, swiglu: bool = True, model=None) -> None:
    """Liger's Glm4 kernels on a GlmForCausalLM instance (GLM-4-9B): Llama-style RMSNorm
    (GlmRMSNorm: weight * normalised input, no offset), Phi3's fused gate_up SwiGLU (GlmMLP is the
    same), Glm4's fused-linear-cross-entropy forward (GlmForCausalLM.forward is the same)."""
    from types import MethodType

    from liger_kernel.transformers.model.glm4 import lce_forward
    from liger_kernel.transformers.monkey_patch import (
        LigerPhi3SwiGLUMLP,
        _patch_rms_norm_module,
        _patch_swiglu_module,
    )

    if rope:
        raise NotImplementedError("Liger has no rotary kernel for GLM's partial interleaved rotary")
    if cross_entropy:
        raise NotImplementedError("use fused_linear_cross_entropy")
    if model is None:
        raise ValueError("apply_liger_kernel_to_glm patches a model instance")
    if fused_linear_cross_entropy:
        model.forward = MethodType(lce_forward, model)
    base = getattr(model, model.base_model_prefix, model)
    if rms_norm:
        _patch_rms_norm_module(base.norm, in_place=False)
    for layer in base.layers:
        if swiglu:
            _patch_swiglu_module(layer.mlp, LigerPhi3SwiGLUMLP)
        if rms_norm:
            _patch_rms_norm_module(layer.input_layernorm, in_place=False)
            _patch_rms_norm_module(layer.post_attention_layernorm, in_place=False)


def register_liger_glm() -> bool:
    """Make the Trainer's use_liger_kernel=True cover model_type "glm"; False if Liger is missing."""
    try:
        from liger_kernel.transformers import monkey_patch
    except Exception as err:  # not installed, or no triton / GPU
        logger.warning("liger-kernel unavailable: %r", err)
        return False
    if "glm" not in monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN:
        monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN["glm"] = apply_liger_kernel_to_glm
    return True
