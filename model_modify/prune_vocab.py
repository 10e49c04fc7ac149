"""Prune a causal LM's byte-level BPE vocabulary to the tokens a corpus uses, verified exactly.

    python model_modify/prune_vocab.py --model /models/bloom-560m --corpus 'zh_corpus/*.txt' --output_dir outputs/bloom_zh
    python model_modify/prune_vocab.py --model outputs/demo_bpe_model --corpus builtin --output_dir outputs/pruned

For a model whose tokenizer is a byte-level BPE (BLOOM, GPT-2, Qwen style) and a corpus
(.txt lines, .jsonl `text`, .csv `content`; or `builtin`: People's Daily + the reviews):

1. count how often each token occurs in the corpus (all but the held-out share), the texts
   encoded in parallel batches (the `tokenizers` library's threads), with a progress bar;
2. keep the used tokens, every special / added token, the 256 byte tokens (any text stays
   encodable) and the merge closure: every token that some merge producing a kept token
   needs, recursively, so that each kept token is still built the way the original built it;
3. rebuild the tokenizer: vocabulary renumbered in the original order, merges kept when
   their two parts and their result are all kept (same order = same ranks), special token
   ids updated (post-processor and model config too); slice the input embedding and the
   LM head (tied or not) to the kept rows; save model + tokenizer (`from_pretrained` loads
   both);
4. verify on the held-out texts: the new tokenizer gives the same token strings as the old
   one (exactly, for every text whose tokens were seen in counting; the rest are counted),
   and the pruned model's logits equal the original's restricted to the kept tokens; report
   parameters and file sizes before and after (`prune_report.json`).

Why the merge closure makes tokenization identical: BPE applies, at each step, the
lowest-ranked merge that applies. The pruned merge list is a subset in the same order, so
as long as every merge the original used on a word survives, it is still the lowest-ranked
applicable one at its step and the same merges happen. A merge survives when its parts and
result are kept, and the closure keeps every part of every merge that yields a kept token.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from common.config import parse_args
from common.data import corpus_texts, split_held_out
from common.errors import UserError, cli_main


@dataclass
class PruneArguments:
    model: str = field(metadata={"help": "Local causal LM folder with a byte-level BPE fast tokenizer."})
    output_dir: str = field(metadata={"help": "Where the pruned model and tokenizer go."})
    corpus: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "Text files / folders / globs (.txt, .jsonl `text`, .csv `content`), or builtin, builtin:news, builtin:reviews."})
    column: str | None = field(default=None, metadata={"help": "Field of .jsonl / .csv records (text / content)."})
    held_out_ratio: float = field(default=0.05, metadata={"help": "Share of the texts kept out of counting, "
                                                          "to verify on."})
    min_count: int = field(default=1, metadata={"help": "Keep tokens seen at least this often."})
    batch_size: int = 1000
    verify_texts: int = field(default=200, metadata={"help": "Held-out texts whose logits are compared."})
    seed: int = 42


# ------------------------------------------------------------------------------ corpus
def count_tokens(tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """Occurrences of each id (special tokens the tokenizer adds around texts not counted)."""
    counts = np.zeros(len(tokenizer), dtype=np.int64)
    backend = tokenizer.backend_tokenizer
    for start in tqdm(range(0, len(texts), batch_size), desc="counting tokens", unit="batch"):
        for encoding in backend.encode_batch(texts[start:start + batch_size], add_special_tokens=False):
            counts += np.bincount(encoding.ids, minlength=len(counts))[:len(counts)]
    return counts


# --------------------------------------------------------------------------- tokenizer
def bpe_spec(tokenizer) -> dict:
    """The tokenizer's JSON, checked to be a byte-level BPE."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UserError(f"the tokenizer's model is {model.get('type')}, not BPE: pruning needs a byte-level BPE "
                        "(BLOOM, GPT-2, Qwen style)")
    if "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise UserError("the tokenizer has no ByteLevel pre-tokenizer: pruning needs a byte-level BPE (a "
                        "sentencepiece-style BPE can lose characters when pieces go)")
    model["merges"] = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model["merges"]]
    return spec


def byte_tokens(vocab: dict[str, int]) -> set[str]:
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    missing = alphabet - vocab.keys()
    if missing:
        raise UserError(f"the vocabulary lacks {len(missing)} of the 256 byte tokens: not a byte-level BPE")
    return alphabet


def merge_closure(keep: set[str], merges: list[list[str]]) -> set[str]:
    """`keep` plus every part of every merge producing a kept token, recursively."""
    producers: dict[str, list[tuple[str, str]]] = {}
    for a, b in merges:
        producers.setdefault(a + b, []).append((a, b))
    closed, stack = set(keep), list(keep)
    while stack:
        for pair in producers.get(stack.pop(), ()):
            for part in pair:
                if part not in closed:
                    closed.add(part)
                    stack.append(part)
    return closed


def pruned_spec(spec: dict, keep_ids: list[int], old_to_new: dict[int, int]) -> dict:
    """A copy of the tokenizer JSON with the kept vocabulary renumbered, merges filtered, ids remapped."""
    spec = copy.deepcopy(spec)
    model = spec["model"]
    by_id = {i: t for t, i in model["vocab"].items()}
    kept = {by_id[i] for i in keep_ids if i in by_id}
    model["vocab"] = {by_id[i]: old_to_new[i] for i in keep_ids if i in by_id}
    model["merges"] = [[a, b] for a, b in model["merges"] if a in kept and b in kept and a + b in kept]
    spec["added_tokens"] = [{**t, "id": old_to_new[t["id"]]} for t in spec.get("added_tokens", [])]

    def remap(node):  # post-processor templates carry special token ids
        if isinstance(node, dict):
            return {k: ([old_to_new[i] for i in v] if k == "ids" and isinstance(v, list) else remap(v))
                    for k, v in node.items()}
        if isinstance(node, list):
            return [remap(v) for v in node]
        return node

    spec["post_processor"] = remap(spec.get("post_processor"))
    return spec


# ------------------------------------------------------------------------------- model
def prune_model(model, keep_ids: list[int]) -> None:
    """Keep only `keep_ids` rows of the input embedding and the LM head (tied or not), in place."""
    index = torch.tensor(keep_ids)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    old_in = model.get_input_embeddings()
    new_in = torch.nn.Embedding(len(keep_ids), old_in.embedding_dim, padding_idx=None,
                                dtype=old_in.weight.dtype, device=old_in.weight.device)
    new_in.weight.data.copy_(old_in.weight.data[index])
    head = model.get_output_embeddings()
    model.set_input_embeddings(new_in)
    if head is not None and not tied:
        new_head = torch.nn.Linear(head.in_features, len(keep_ids), bias=head.bias is not None,
                                   dtype=head.weight.dtype, device=head.weight.device)
        new_head.weight.data.copy_(head.weight.data[index])
        if head.bias is not None:
            new_head.bias.data.copy_(head.bias.data[index])
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(keep_ids)
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().vocab_size = len(keep_ids)
    if tied:
        model.tie_weights()


def remap_config_ids(config, old_to_new: dict[int, int]) -> None:
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, old_to_new.get(value))
        elif isinstance(value, list):
            setattr(config, key, [old_to_new[v] for v in value if v in old_to_new])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(path).glob("*.bin"))


@torch.no_grad()
def max_logit_diff(original, pruned, texts_ids: list[list[int]], new_ids: list[list[int]],
                   keep: torch.Tensor) -> float:
    worst = 0.0
    for old, new in zip(texts_ids, new_ids):
        a = original(input_ids=torch.tensor([old])).logits[0][:, keep]
        b = pruned(input_ids=torch.tensor([new])).logits[0]
        worst = max(worst, float((a - b).abs().max()))
    return worst


# --------------------------------------------------------------------------------- main
@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([PruneArguments], argv, description=__doc__)
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from common.tokenizer import load_tokenizer

    if not Path(args.model, "config.json").is_file():
        raise UserError(f"no model in {args.model}")
    tokenizer = load_tokenizer(args.model, add_special_tokens=False)
    if not tokenizer.is_fast:
        raise UserError(f"{args.model}: a fast tokenizer (tokenizer.json) is needed")
    spec = bpe_spec(tokenizer)
    vocab = spec["model"]["vocab"]

    texts = list(corpus_texts(args.corpus, args.column))
    if not texts:
        raise UserError(f"{args.corpus}: no text")
    counted, held_out = split_held_out(texts, args.held_out_ratio, args.seed)
    counts = count_tokens(tokenizer, counted, args.batch_size)
    id_to_token = {i: t for t, i in vocab.items()}
    used = {id_to_token[i] for i in np.flatnonzero(counts >= args.min_count) if i in id_to_token}
    specials = {t["content"] for t in spec.get("added_tokens", [])}
    byte_level = byte_tokens(vocab)
    keep_tokens = merge_closure(used | byte_level | (specials & vocab.keys()), spec["model"]["merges"])
    keep_ids = sorted({vocab[t] for t in keep_tokens} | {t["id"] for t in spec.get("added_tokens", [])})
    old_to_new = {old: new for new, old in enumerate(keep_ids)}

    new_backend = Tokenizer.from_str(json.dumps(pruned_spec(spec, keep_ids, old_to_new)))
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    new_tokenizer = PreTrainedTokenizerFast(tokenizer_object=new_backend, **special)

    original = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    parameters_before = sum(p.numel() for p in original.parameters())
    if original.get_input_embeddings().num_embeddings < len(tokenizer):
        raise UserError(f"{args.model}: the embedding has fewer rows than the tokenizer has tokens")
    pruned = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prune_model(pruned, keep_ids)
    remap_config_ids(pruned.config, old_to_new)
    if pruned.generation_config is not None:
        remap_config_ids(pruned.generation_config, old_to_new)

    # verification on held-out texts
    old_tok = [tokenizer.convert_ids_to_tokens(e.ids) for e in
               tokenizer.backend_tokenizer.encode_batch(held_out, add_special_tokens=False)]
    new_enc = new_backend.encode_batch(held_out, add_special_tokens=False)
    same = [i for i, (o, n) in enumerate(zip(old_tok, new_enc)) if o == n.tokens]
    kept_set = set(keep_ids)
    seen = [i for i, o in enumerate(old_tok) if all(vocab.get(t) in kept_set for t in o)]
    pick = same[:args.verify_texts]
    longest = min(512, getattr(original.config, "max_position_embeddings", None) or 512)
    old_ids = [[vocab[t] for t in old_tok[i]][:longest] for i in pick]
    new_ids = [new_enc[i].ids[:longest] for i in pick]
    diff = max_logit_diff(original, pruned, old_ids, new_ids, torch.tensor(keep_ids)) if pick else None

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pruned.save_pretrained(out)
    new_tokenizer.save_pretrained(out)
    report = {
        "model": args.model, "corpus": args.corpus, "texts_counted": len(counted), "texts_held_out": len(held_out),
        "vocabulary": {"before": len(tokenizer), "after": len(keep_ids), "used_in_corpus": len(used),
                       "added_by_merge_closure": len(keep_tokens - used - byte_level - specials),
                       "merges_before": len(spec["model"]["merges"]),
                       "merges_after": len(json.loads(new_backend.to_str())["model"]["merges"])},
        "parameters": {"before": parameters_before, "after": sum(p.numel() for p in pruned.parameters())},
        "file_bytes": {"before": folder_bytes(args.model), "after": folder_bytes(out)},
        "held_out": {"texts": len(held_out), "same_tokens": len(same), "all_tokens_seen_in_counting": len(seen),
                     "same_tokens_where_all_seen": sum(1 for i in seen if i in set(same)),
                     "logits_compared_texts": len(pick), "max_logit_diff": diff},
        "options": asdict(args),
    }
    (out / "prune_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    v, h, p = report["vocabulary"], report["held_out"], report["parameters"]
    print(f"vocabulary {v['before']} -> {v['after']} tokens ({v['used_in_corpus']} used, "
          f"{v['added_by_merge_closure']} added by the merge closure); parameters {p['before']:,} -> {p['after']:,}")
    print(f"held-out texts: {h['same_tokens']} of {h['texts']} tokenised identically "
          f"({h['same_tokens_where_all_seen']} of the {h['all_tokens_seen_in_counting']} whose tokens were all "
          f"seen); logits max |diff| {diff} over {len(pick)} texts")
    print(f"saved to {out} (prune_report.json)")
    return report


if __name__ == "__main__":
    main()
