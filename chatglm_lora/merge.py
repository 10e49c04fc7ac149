"""Merge a LoRA adapter into its base model and save a plain checkpoint, verified.

    python chatglm_lora/merge.py --adapter outputs/chatglm_lora --output_dir outputs/chatglm_lora_merged
    python chatglm_lora/merge.py --adapter outputs/glm4_lora --base_model /models/glm-4-9b-chat-hf --dtype bfloat16
    python chatglm_lora/merge.py --adapter outputs/glm4_qlora --device cuda     # a QLoRA adapter (bitsandbytes)

The merged model needs no PEFT to load (`AutoModelForCausalLM.from_pretrained`) and
generates at the base model's cost. Before saving, the logits of base + adapter and of the
merged model are compared on a few conversations (rendered with the adapter's template):
the largest difference must be within --atol, else nothing is written. The comparison is
printed and saved as merge_report.json beside the model. The merged model carries the
adapter's chat template as Jinja and its end tokens in generation_config.json, so vLLM,
SGLang or `transformers serve` prompt it as it was trained.

A QLoRA adapter was trained over the NF4-quantised base, not over the saved weights: merged
into those, it would give a model that differs from the trained one by the quantisation error.
So its base is loaded in NF4 as training loaded it, base + adapter there is the reference,
and the adapter is merged into the dequantised NF4 weights (`--base_precision nf4`, chosen
automatically when the adapter's metrics.json says qlora; it needs a CUDA GPU and
bitsandbytes). The reference then runs its matmuls in --dtype (float32 by default), so the
check compares like with like.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoTokenizer

from common.errors import UserError, cli_main
from common.serving.loading import adapter_base, adapter_finetuning_type, load_adapter
from common.sft_train import nf4_config
from common.templates import encode_chat, get_template, resolve_template, save_chat_template

CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "判断下面这条评论的情感是正面还是负面：\n质量很好，物流也快"},
     {"role": "assistant", "content": "正面"}],
    [{"role": "system", "content": "你是一个乐于助人的助手。"},
     {"role": "user", "content": "请给下面的句子分词，词与词之间用“/”隔开：\n新华社北京一月一日电。"},
     {"role": "assistant", "content": "新华社/北京/一月/一日/电/。"}],
]


@torch.inference_mode()
def logits_of(model, batches: list[list[int]]) -> list[torch.Tensor]:
    return [model(input_ids=torch.tensor([ids], device=model.device)).logits.float().cpu() for ids in batches]


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", default="outputs/chatglm_lora", help="Adapter directory of train.py.")
    parser.add_argument("--base_model", default=None, help="Base model (default: the one the adapter names).")
    parser.add_argument("--output_dir", default="outputs/chatglm_lora_merged")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="Precision of the merge and of the saved weights.")
    parser.add_argument("--atol", type=float, default=None,
                        help="Largest allowed logit difference (default: 1e-3 for float32, 0.5 otherwise).")
    parser.add_argument("--base_precision", default="auto", choices=["auto", "nf4", "saved"],
                        help="The weights the adapter is merged into: nf4 = the base quantised as QLoRA trained over "
                        "it, then dequantised; saved = the base as saved; auto = nf4 for a QLoRA adapter (its "
                        "metrics.json says so), saved otherwise.")
    parser.add_argument("--device", default=None, help="Default: cuda for an NF4 base, cpu otherwise.")
    args = parser.parse_args(argv)

    adapter = Path(args.adapter)
    base = adapter_base(adapter, args.base_model)
    if base is None:
        raise UserError(f"{adapter} holds no LoRA adapter (adapter_config.json)")
    atol = args.atol if args.atol is not None else 1e-3 if args.dtype == "float32" else 0.5
    dtype = getattr(torch, args.dtype)

    precision = args.base_precision
    if precision == "auto":
        precision = "nf4" if adapter_finetuning_type(adapter) == "qlora" else "saved"
    device = args.device or ("cuda" if precision == "nf4" else "cpu")
    if precision == "nf4" and (importlib.util.find_spec("bitsandbytes") is None or not device.startswith("cuda")
                               or not torch.cuda.is_available()):
        raise UserError(f"{adapter} is a QLoRA adapter: it is merged into its NF4-quantised base (what it was trained "
                        "over), which needs a CUDA GPU (--device cuda) and the bitsandbytes package. "
                        "--base_precision saved merges it into the unquantised base instead: not the trained model")

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    template = resolve_template(None, tokenizer, adapter) or get_template("plain")
    if precision == "nf4":  # matmuls in --dtype, so the reference is as precise as the merge
        model = load_adapter(adapter, base, tokenizer, dtype, quantization_config=nf4_config(dtype),
                             device_map={"": device}).eval()
    else:
        model = load_adapter(adapter, base, tokenizer, dtype).to(device).eval()
    inputs = [encode_chat(tokenizer, template, c).input_ids for c in CHECK_CONVERSATIONS]
    with_adapter = logits_of(model, inputs)
    with model.disable_adapter():
        base_logits = logits_of(model, inputs)
    if precision == "nf4":  # the adapter off, the NF4 layers dequantised into plain ones, the adapter on again
        from peft import PeftModel

        plain = model.unload()
        plain.dequantize()
        model = PeftModel.from_pretrained(plain.to(dtype), adapter)
    merged = model.merge_and_unload()
    after = logits_of(merged, inputs)

    difference = max((a - b).abs().max().item() for a, b in zip(with_adapter, after))
    adapter_effect = max((a - b).abs().max().item() for a, b in zip(with_adapter, base_logits))
    report = {"adapter": str(adapter), "base_model": str(base), "base_precision": precision, "dtype": args.dtype,
              "tokens_compared": sum(map(len, inputs)), "max_abs_logit_difference": difference, "atol": atol,
              "adapter_effect_max_abs_logit_change": adapter_effect, "verified": difference <= atol}
    print(f"merged vs base + adapter: max |logit difference| {difference:.3g} over {report['tokens_compared']} "
          f"tokens (tolerance {atol:g}; the adapter itself moves logits by up to {adapter_effect:.3g})")
    if difference > atol:
        raise UserError("the merged model does not reproduce base + adapter: nothing saved")
    out = Path(args.output_dir)
    merged.config.use_cache = True
    merged.save_pretrained(out)
    save_chat_template(out, tokenizer, template)  # the adapter's template, as Jinja, and its end tokens as eos
    (out / "merge_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"verified; merged model saved to {out}")
    return report


if __name__ == "__main__":
    main()
