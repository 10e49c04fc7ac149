"""What the benchmarks build at random: model shapes (transformers config keyword arguments) for
random weights, and token sources of random ids."""

import json
from pathlib import Path

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
# Baichuan2-7B as model_baichuan/convert.py writes it (a Llama): Llama-2-7B's blocks, a 125,696-token vocabulary
BAICHUAN2_7B = LLAMA2_7B | dict(vocab_size=125696)
# GLM-4-9B (GlmForCausalLM, the -hf checkpoints): 2 key/value heads, half rotary, fused gate_up, 151,552 tokens
GLM4_9B = dict(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
               num_attention_heads=32, num_key_value_heads=2, head_dim=128, partial_rotary_factor=0.5,
               attention_bias=True, max_position_embeddings=8192, rms_norm_eps=1.5625e-07)


def write_synthetic_source(path: Path, train_tokens: int, vocab_size: int, valid_tokens: int = 65536,
                           seed: int = 0) -> None:
    """common/shards.py's layout (what prepare_data.py writes) with uniformly random ids and a
    BERT-style tokenizer of exactly `vocab_size` tokens."""
    import numpy as np
    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[BOS]", "[EOS]"]
    tokens = special + [chr(c) for c in range(33, 127)]
    tokens += [chr(0x4E00 + i) for i in range(vocab_size - len(tokens))]
    tokenizer = BertTokenizer(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=False,
                              bos_token="[BOS]", eos_token="[EOS]")
    assert len(tokenizer) == vocab_size
    tokenizer.save_pretrained(path / "tokenizer")
    rng = np.random.default_rng(seed)
    counts = {}
    for split, n in (("train", train_tokens), ("valid", valid_tokens)):
        (path / split).mkdir(parents=True, exist_ok=True)
        rng.integers(0, vocab_size, size=n, dtype=np.uint16).tofile(path / split / "00000.bin")
        counts[f"{split}_tokens"] = n
    index = {"format": 1, "dtype": "uint16", "vocab_size": vocab_size, "eos_token_id": tokenizer.eos_token_id,
             "tokenizer": "tokenizer", "done": {"0": counts}, "complete": True, "synthetic": "uniform random ids"}
    (path / "index.json").write_text(json.dumps(index, indent=1) + "\n")
