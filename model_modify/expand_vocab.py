"""Expand a Llama-style model's sentencepiece vocabulary with pieces learned from a Chinese corpus.

    python model_modify/expand_vocab.py --model /models/llama-2-7b --corpus 'zh/*.txt' --output_dir outputs/llama_zh
    python model_modify/expand_vocab.py --model outputs/demo_spm_model --corpus builtin --output_dir outputs/expanded

Chinese-LLaMA's recipe: train a sentencepiece model (BPE) on the corpus, append the pieces the
base `tokenizer.model` lacks (each with the score the new model gave it, so new pieces keep
their own merge order), and give the model one new embedding row and LM-head row per piece.
New rows start (`--init`) from `subtokens` (default: the mean of the rows of the pieces the
base tokenizer splits the new piece into, so the new token starts where its old spelling
pointed) or `mean` (the mean of all rows). Writes the model, `tokenizer.model` and a
`tokenizer.json` built from it (common/spm.py), and `expand_report.json`:
- tokens per Chinese character on held-out texts, before and after;
- the model unchanged where nothing changed: for held-out texts the new tokenizer splits as
  the old one did, the expanded model's logits over the old vocabulary equal the original
  model's (the old rows are untouched; checked, not assumed).
Follow-up training of the new rows (+ LoRA) goes through model_clm (README).
A model with only a fast tokenizer (tokenizer.json, e.g. a byte-level BPE) gets the learned
multi-character Chinese pieces it splits as added tokens instead (matched in the text before
its own model runs; their rows initialised the same way).
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from common.config import parse_args
from common.data import corpus_texts, split_held_out
from common.errors import UserError, cli_main
from common.spm import SP_NORMAL, read_sp_proto, sentencepiece_to_tokenizers

HAN = re.compile(r"[\u3400-\u9fff]")


@dataclass
class ExpandArguments:
    model: str = field(metadata={"help": "Local causal LM folder with a sentencepiece tokenizer.model (or a fast "
                                         "tokenizer: pieces become added tokens)."})
    output_dir: str = field(metadata={"help": "Where the expanded model and tokenizer go."})
    corpus: list[str] = field(default_factory=lambda: ["builtin"], metadata={
        "help": "Text files / folders / globs (.txt, .jsonl `text`, .csv `content`), or builtin, builtin:news, builtin:reviews."})
    column: str | None = None
    sp_vocab_size: int = field(default=4000, metadata={"help": "Size of the sentencepiece model trained on the "
                                                       "corpus (its new pieces are added)."})
    character_coverage: float = field(default=0.9995, metadata={"help": "Share of the corpus's characters the "
                                                                "sentencepiece model must cover (0.98-1)."})
    max_sentences: int = field(default=200_000, metadata={"help": "Texts the sentencepiece trainer reads at most."})
    init: str = field(default="subtokens", metadata={"help": "New rows: subtokens (mean of the rows of the old "
                                                     "pieces spelling the new one) or mean (of all rows)."})
    held_out_ratio: float = 0.05
    verify_texts: int = 100
    seed: int = 42


def chinese_chars(text: str) -> int:
    return len(HAN.findall(text))


def train_sentencepiece(texts: list[str], vocab_size: int, coverage: float):
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                       model_type="bpe", character_coverage=coverage, split_digits=True,
                                       byte_fallback=False, minloglevel=2, num_threads=2)
    except RuntimeError as err:  # e.g. fewer pieces than the characters to cover
        raise UserError(f"training the corpus's sentencepiece model failed: {str(err).splitlines()[-1]} "
                        "(raise --sp_vocab_size or lower --character_coverage)") from None
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    return proto


def add_pieces(base, learned) -> list[str]:
    """Append to `base` (in place) the normal pieces of `learned` it lacks; returns them."""
    have = {p.piece for p in base.pieces}
    added = []
    for p in learned.pieces:
        if p.type == SP_NORMAL and p.piece not in have:
            new = base.pieces.add()
            new.piece, new.score, new.type = p.piece, p.score, SP_NORMAL
            added.append(p.piece)
    return added


def hf_tokenizer(backend, base_tokenizer):
    from transformers import PreTrainedTokenizerFast

    special = {k: v for k, v in base_tokenizer.special_tokens_map.items() if isinstance(v, str)}
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                   add_bos_token=getattr(base_tokenizer, "add_bos_token", False),
                                   add_eos_token=getattr(base_tokenizer, "add_eos_token", False), **special)


@torch.no_grad()
def init_new_rows(model, old_size: int, spellings: list[list[int]], how: str) -> None:
    """Rows old_size.. of the input embedding (and of an untied LM head) from the old rows."""
    tables = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not tables[0]:
        tables.append(head.weight)
    for table in tables:
        mean = table[:old_size].mean(0)
        for k, ids in enumerate(spellings):
            table[old_size + k] = table[ids].mean(0) if how == "subtokens" and ids else mean


@cli_main
def main(argv: list[str] | None = None) -> dict:
    (args,) = parse_args([ExpandArguments], argv, description=__doc__)
    from transformers import AutoModelForCausalLM

    from common.tokenizer import load_tokenizer

    if args.init not in ("subtokens", "mean"):
        raise UserError(f"--init must be subtokens or mean, got {args.init}")
    base_tokenizer = load_tokenizer(args.model, add_special_tokens=False)
    texts = list(corpus_texts(args.corpus, args.column))
    counted, held_out = split_held_out(texts, args.held_out_ratio, args.seed)
    learned = train_sentencepiece(counted[:args.max_sentences], args.sp_vocab_size, args.character_coverage)
    sp_path = Path(args.model, "tokenizer.model")
    proto = None
    if sp_path.is_file():  # sentencepiece: the pieces join the model (merged by score, as its own pieces)
        base_proto = read_sp_proto(sp_path)
        old_backend = sentencepiece_to_tokenizers(base_proto)
        proto = read_sp_proto(sp_path)
        added = add_pieces(proto, learned)
        new_backend = sentencepiece_to_tokenizers(proto)
    else:  # a fast tokenizer only: the multi-character Chinese pieces it splits become added tokens
        if not base_tokenizer.is_fast:
            raise UserError(f"{args.model}: neither a tokenizer.model nor a fast tokenizer (tokenizer.json)")
        old_backend = Tokenizer.from_str(base_tokenizer.backend_tokenizer.to_str())
        candidates = dict.fromkeys(p.piece.replace("▁", "") for p in learned.pieces if p.type == SP_NORMAL)
        added = [c for c in candidates if len(c) >= 2 and HAN.search(c)
                 and len(old_backend.encode(c, add_special_tokens=False).ids) > 1]
        new_backend = Tokenizer.from_str(old_backend.to_str())
        new_backend.add_tokens(added)
    if not added:
        raise UserError("the corpus's sentencepiece model has no piece the base vocabulary lacks")
    old_size = old_backend.get_vocab_size(with_added_tokens=True)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    original = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    rows = model.get_input_embeddings().num_embeddings
    if rows < old_size:
        raise UserError(f"{args.model}: {rows} embedding rows for {old_size} tokens")
    model.resize_token_embeddings(max(rows, old_size + len(added)), mean_resizing=False)
    spellings = [old_backend.encode(piece.replace("▁", " "), add_special_tokens=False).ids for piece in added]
    init_new_rows(model, old_size, spellings, args.init)

    def per_char(backend) -> float:
        chars = sum(chinese_chars(t) for t in held_out)
        tokens = sum(len(e.ids) for e in backend.encode_batch(held_out, add_special_tokens=False))
        return tokens / max(1, chars)

    old_ids = [e.ids for e in old_backend.encode_batch(held_out, add_special_tokens=False)]
    new_ids = [e.ids for e in new_backend.encode_batch(held_out, add_special_tokens=False)]
    same = [i for i, (a, b) in enumerate(zip(old_ids, new_ids)) if a == b and a]
    worst = None
    longest = min(512, getattr(model.config, "max_position_embeddings", None) or 512)
    with torch.no_grad():
        for i in same[:args.verify_texts]:
            ids = torch.tensor([old_ids[i][:longest]])
            diff = float((model(input_ids=ids).logits[0, :, :old_size]
                          - original(input_ids=ids).logits[0, :, :old_size]).abs().max())
            worst = diff if worst is None else max(worst, diff)

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if proto is not None:
        (out / "tokenizer.model").write_bytes(proto.SerializeToString())
    hf_tokenizer(new_backend, base_tokenizer).save_pretrained(out)
    report = {
        "model": args.model, "corpus": args.corpus, "texts_counted": len(counted), "texts_held_out": len(held_out),
        "vocabulary": {"before": old_size, "after": old_size + len(added), "added": len(added),
                       "examples": added[:20], "how": "sentencepiece pieces" if proto is not None else "added tokens"},
        "init": args.init,
        "tokens_per_chinese_char": {"before": round(per_char(old_backend), 4), "after": round(per_char(new_backend), 4)},
        "unchanged": {"held_out_texts_split_as_before": len(same), "compared": min(len(same), args.verify_texts),
                      "max_logit_diff_old_vocabulary": worst},
        "options": asdict(args),
    }
    (out / "expand_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    t = report["tokens_per_chinese_char"]
    print(f"vocabulary {old_size} -> {old_size + len(added)} (+{len(added)} pieces, e.g. {' '.join(added[:8])}); "
          f"tokens per Chinese character on held-out text {t['before']} -> {t['after']}")
    print(f"{len(same)} held-out texts split as before; their logits over the old vocabulary max |diff| {worst}")
    print(f"saved to {out} (expand_report.json)")
    return report


if __name__ == "__main__":
    main()
