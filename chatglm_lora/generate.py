"""Ask a tuned model (LoRA adapter or merged checkpoint) one question per prompt.

    python chatglm_lora/generate.py "判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快"
    python chatglm_lora/generate.py --model outputs/chatglm_lora_merged --file questions.txt --temperature 0.7
    python chatglm_lora/generate.py --model outputs/chatglm_lora --base_model /models/glm-4-9b-chat-hf "你好"

Each prompt is one user turn (after `--system`, if given), rendered with the template the
model was tuned with (the chat template it carries; `--template` overrides) by the same code as training
and the server, and answered through the server's generation path (stop tokens included).
A literal "\\n" in a prompt becomes a line break. Greedy unless --temperature > 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common.data import read_lines
from common.errors import UserError, cli_main
from common.serving.engine import Engine
from common.serving.sampling import SamplingParams

DEFAULT_MODEL = "outputs/chatglm_lora"


@cli_main
def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="*", help="Questions, one user turn each.")
    parser.add_argument("--file", type=Path, help="A UTF-8 file with one question per line.")
    parser.add_argument("--model", "--model_name_or_path", default=DEFAULT_MODEL, help="Adapter or model directory.")
    parser.add_argument("--base_model", default=None, help="Base of an adapter (default: the one it names).")
    parser.add_argument("--template", default=None, help="Chat template (default: the one the model was tuned with).")
    parser.add_argument("--system", default="", help="System prompt.")
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy.")
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0, help="0 = off.")
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=42, help="Makes sampling repeatable.")
    parser.add_argument("--device", default=None, help="cuda, cpu ... (default: cuda if present).")
    args = parser.parse_args(argv)

    prompts = [p.replace("\\n", "\n") for p in args.prompts + (read_lines(args.file) if args.file else [])]
    if not prompts:
        raise UserError("no prompt: give prompts as arguments or --file")
    engine = Engine.from_pretrained(args.model, template=args.template, device=args.device, base_model=args.base_model)
    replies = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": prompt}]
        ids, stop = engine.chat_ids(messages)
        params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k,
                                args.repetition_penalty, stop, args.seed)
        generation = engine.stream(ids, params)
        try:
            replies.append("".join(generation))
        finally:
            generation.close()  # join the generation thread: none may outlive the interpreter
        print(f"Q: {prompt}\nA: {replies[-1]}\n", flush=True)
    return replies


if __name__ == "__main__":
    main()
