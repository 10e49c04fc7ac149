"""Preference pairs as DPO sees them: tokenised with a chat template (the code SFT and serving
use), and the share of pairs whose chosen reply a model finds more likely. baichuan2_dpo's
train.py and evaluate.py use both."""

from __future__ import annotations

import torch
from datasets import Dataset

from common.templates import encode_chat


def tokenize_pairs(rows: list[dict], tokenizer, template, max_length: int | None) -> tuple[Dataset, dict]:
    """prompt_ids / chosen_ids / rejected_ids by the template, as SFT and serving tokenise;
    pairs whose prompt leaves no room for a reply are dropped (counted)."""
    columns = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    dropped = 0
    for row in rows:
        encoded = [encode_chat(tokenizer, template, [*row["prompt"], {"role": "assistant", "content": reply}])
                   for reply in (row["chosen"], row["rejected"])]
        starts = [e.reply_starts[-1] for e in encoded]
        prompt = encoded[0].input_ids[:starts[0]]
        assert prompt == encoded[1].input_ids[:starts[1]], "a template's prompt must not depend on the reply"
        if max_length is not None and len(prompt) >= max_length:
            dropped += 1
            continue
        columns["prompt_ids"].append(prompt)
        columns["chosen_ids"].append(encoded[0].input_ids[starts[0]:])
        columns["rejected_ids"].append(encoded[1].input_ids[starts[1]:])
    return Dataset.from_dict(columns), {"pairs": len(columns["prompt_ids"]), "dropped_prompt_too_long": dropped}


@torch.inference_mode()
def preference_accuracy(model, dataset: Dataset, batch_size: int = 16, with_gaps: bool = False) -> dict:
    """Share of pairs whose chosen reply has the higher log-likelihood, and the mean gap
    (`with_gaps`: also each pair's log p(chosen) - log p(rejected))."""
    model.eval()
    device = next(model.parameters()).device
    gaps = []
    for start in range(0, len(dataset), batch_size):
        rows = dataset[start:start + batch_size]
        logps = []
        for key in ("chosen_ids", "rejected_ids"):
            sequences = [p + r for p, r in zip(rows["prompt_ids"], rows[key])]
            width = max(map(len, sequences))
            ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=device)
            mask = torch.tensor([[0] * len(p) + [1] * len(r) + [0] * (width - len(p) - len(r))
                                 for p, r in zip(rows["prompt_ids"], rows[key])], device=device)
            attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in sequences], device=device)
            logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
            token_logps = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
            logps.append((token_logps * mask[:, 1:]).sum(-1))
        gaps.extend((logps[0] - logps[1]).tolist())
    result = {"n": len(gaps), "chosen_more_likely": sum(g > 0 for g in gaps) / max(1, len(gaps)),
              "mean_logp_gap": sum(gaps) / max(1, len(gaps))}
    return {**result, "gaps": gaps} if with_gaps else result
