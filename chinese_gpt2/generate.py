"""Generate Chinese text with a trained GPT-2 (or any local causal LM with its tokenizer).

    python chinese_gpt2/generate.py "中共中央总书记" "新华社北京电"
    python chinese_gpt2/generate.py --file prompts.txt --strategy sample --temperature 0.8 --top_p 0.9
    python chinese_gpt2/generate.py "今天" --strategy beam --num_beams 4 --max_new_tokens 40

Strategies: greedy, sample (temperature, top-k, top-p) and beam search; all take a
repetition penalty. Output is the prompt plus its continuation, without the spaces that a
WordPiece decode puts between Chinese characters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import set_seed

from common.data import read_lines
from common.errors import UserError, cli_main
from common.serving.loading import load_causal_lm
from common.serving.runtime import apply_serving_settings
from common.tokenizer import display_cleaner

DEFAULT_MODEL = "outputs/chinese_gpt2"

def generation_settings(strategy: str, max_new_tokens: int, temperature: float = 1.0, top_k: int = 50,
                        top_p: float = 1.0, repetition_penalty: float = 1.0, num_beams: int = 4) -> dict:
    """Keyword arguments for `model.generate`, checked so that a bad value is a clear error."""
    if max_new_tokens < 1:
        raise UserError("max_new_tokens must be at least 1")
    if repetition_penalty <= 0:
        raise UserError("repetition_penalty must be > 0")
    settings = {"max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty}
    if strategy == "greedy":
        return {**settings, "do_sample": False, "num_beams": 1}
    if strategy == "beam":
        if num_beams < 2:
            raise UserError("beam search needs num_beams >= 2")
        return {**settings, "do_sample": False, "num_beams": num_beams, "early_stopping": True}
    if strategy == "sample":
        if temperature <= 0:
            raise UserError("temperature must be > 0 (use --strategy greedy for deterministic output)")
        if not 0 < top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if top_k < 0:
            raise UserError("top_k must be >= 0 (0 = off)")
        return {**settings, "do_sample": True, "temperature": temperature, "top_k": top_k, "top_p": top_p}
    raise UserError(f"unknown strategy '{strategy}' (greedy, sample, beam)")


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], settings: dict) -> list[str]:
    """Continue each prompt on its own (no padding, so no left-padding pitfalls)."""
    clean = display_cleaner(tokenizer)
    outputs = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
        if ids.shape[1] == 0:
            raise UserError(f"prompt {prompt!r} has no tokens")
        room = model.config.max_position_embeddings - ids.shape[1]
        if room < 1:
            raise UserError(f"prompt of {ids.shape[1]} tokens leaves no room in the model's context "
                            f"of {model.config.max_position_embeddings}")
        generated = model.generate(
            ids, **{**settings, "max_new_tokens": min(settings["max_new_tokens"], room)},
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(prompt + clean(tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)))
    return outputs


@cli_main
def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="Texts to continue.")
    parser.add_argument("--file", type=Path, help="A UTF-8 file with one prompt per line.")
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="Model directory (train.py's output_dir).")
    parser.add_argument("--strategy", default="greedy", choices=["greedy", "sample", "beam"])
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=50)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--num_beams", type=int, default=4)
    parser.add_argument("--seed", type=int, default=42, help="Makes sampling repeatable.")
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if present).")
    args = parser.parse_args(argv)

    prompts = list(args.prompts)
    if args.file:
        prompts += read_lines(args.file)
    if not prompts:
        raise UserError("no prompt: give prompts as arguments or --file")
    settings = generation_settings(args.strategy, args.max_new_tokens, args.temperature, args.top_k,
                                   args.top_p, args.repetition_penalty, args.num_beams)
    model, tokenizer = load_causal_lm(args.model, args.device)
    apply_serving_settings(model.device, compile_decode=False)
    set_seed(args.seed)
    texts = generate(model, tokenizer, prompts, settings)
    for text in texts:
        print(text)
    return texts


if __name__ == "__main__":
    main()
