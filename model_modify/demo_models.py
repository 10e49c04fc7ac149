"""Two small stand-in models for the built-in demo (no model hub here), random weights:

    python model_modify/demo_models.py        # -> outputs/model_modify/bpe_base, outputs/model_modify/spm_base

- `bpe_base`: a GPT-2 (4 x 256, tied head) with a byte-level BPE of --bpe_vocab tokens learned on
  People's Daily: BLOOM's situation in small, a vocabulary much larger than what the reviews use
  (prune_vocab.py --corpus reviews).
- `spm_base`: a Llama (4 x 256) with a Llama-style sentencepiece tokenizer (BPE, byte fallback)
  of --spm_vocab pieces learned on People's Daily and little else: Chinese mostly splits into
  single characters (expand_vocab.py adds the corpus's multi-character pieces).
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/model_modify")
    parser.add_argument("--bpe_vocab", type=int, default=30000)
    parser.add_argument("--spm_vocab", type=int, default=8000, help="At most (single characters + bytes).")
    args = parser.parse_args()
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    from common.corpora import load_peoples_daily
    from common.spm import sentencepiece_to_tokenizers

    news = load_peoples_daily()
    out = Path(args.output_dir)
    torch.manual_seed(0)

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(news, trainers.BpeTrainer(vocab_size=args.bpe_vocab, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                          show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=256, n_layer=4, n_head=4, n_positions=512,
                               bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
                    ).save_pretrained(out / "bpe_base")
    tokenizer.save_pretrained(out / "bpe_base")

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(news), model_writer=buffer, vocab_size=args.spm_vocab,
                                   model_type="bpe", byte_fallback=True, character_coverage=0.9995,
                                   max_sentencepiece_length=1, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=2)  # single characters: every one the news uses
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(buffer.getvalue())
    (out / "spm_base").mkdir(parents=True, exist_ok=True)
    (out / "spm_base" / "tokenizer.model").write_bytes(buffer.getvalue())
    PreTrainedTokenizerFast(tokenizer_object=sentencepiece_to_tokenizers(proto), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(out / "spm_base")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(proto.pieces), hidden_size=256, intermediate_size=688,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=1024, tie_word_embeddings=False)).save_pretrained(out / "spm_base")
    print(f"wrote {out / 'bpe_base'} ({len(tokenizer)} byte-level BPE tokens) and {out / 'spm_base'} "
          f"({len(proto.pieces)} sentencepiece pieces)")


if __name__ == "__main__":
    main()
