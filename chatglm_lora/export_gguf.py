"""Export a merged (or full) model to GGUF for llama.cpp and Ollama, with llama.cpp's own converter.

    python chatglm_lora/merge.py --adapter outputs/qwen_lora --output_dir outputs/qwen_merged
    python chatglm_lora/export_gguf.py --model outputs/qwen_merged                 # f16 + q8_0
    python chatglm_lora/export_gguf.py --model /models/glm-4-9b-chat-hf --outtype q8_0 --output_dir outputs/glm4_gguf
    python chatglm_lora/export_gguf.py --model outputs/qwen_merged --llama_cpp ~/src/llama.cpp  # another llama.cpp

Nothing here converts tensors: the script checks the model directory, then runs llama.cpp's
`convert_hf_to_gguf.py` once per --outtype, with llama.cpp's own `gguf-py` first on the path
(the `gguf` on PyPI may be older than the converter). By default that converter is the one in
the pinned llama-cpp-python 0.3.36 sdist (llama.cpp commit 0c1e570), which `make real-artefacts`
extracts into `.cache/real_artefacts/llama_cpp/`; --llama_cpp takes any llama.cpp checkout.
Verified here (tests/test_export_gguf.py): Llama (LlamaForCausalLM), Qwen2 (Qwen2ForCausalLM)
and GLM-4 (GlmForCausalLM); other architectures the converter knows are passed on unchecked.

The GGUF carries the model's tokenizer and its chat template (`tokenizer.chat_template`, the
template the model was tuned with, as merge.py saved it): after the export the first file is
read back with gguf-py and the template compared with the model's; a GGUF that would prompt
the model differently is an error. A LoRA adapter is refused (merge it first: merge.py).
For GlmForCausalLM the converter reads three settings from ChatGLM's config keys, which a GLM-4
`-hf` config lacks (context length, RoPE base, norm epsilon): the model's own values are written
into the GGUF instead, with gguf-py as llama.cpp's gguf_set_metadata.py does; a head size other
than hidden / heads, which that converter does not record, is refused. The files, their sizes and the
checks are printed and saved as gguf_report.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from common.errors import UserError, cli_main

logger = logging.getLogger(__name__)

# The converter as `make real-artefacts` extracts it from the pinned llama-cpp-python sdist.
DEFAULT_LLAMA_CPP = Path(__file__).resolve().parents[1] / ".cache" / "real_artefacts" / "llama_cpp"
OUTTYPES = {"f16": "F16", "q8_0": "Q8_0"}  # llama.cpp's names, as in its own file names
VERIFIED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "GlmForCausalLM")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable JSON ({err})") from None


def check_model_dir(model: Path, trust_remote_code: bool) -> dict:
    """The model's config.json, after refusing what the converter cannot turn into a faithful GGUF."""
    if not model.is_dir():
        raise UserError(f"{model}: no such directory (give a merged or full model directory with --model)")
    weights = [f for f in model.glob("*.safetensors") if not f.name.startswith("adapter_")] + \
        list(model.glob("pytorch_model*.bin"))  # not adapter_model.*, not training_args.bin
    if (model / "adapter_config.json").is_file() and not weights:
        raise UserError(f"{model} is a LoRA adapter, not a model: merge it into its base first, e.g.\n"
                        f"  python chatglm_lora/merge.py --adapter {model} --output_dir {model}_merged\n"
                        f"then export the merged directory: --model {model}_merged")
    if not (model / "config.json").is_file():
        raise UserError(f"{model} holds no config.json: not a Hugging Face model directory "
                        "(expected config.json, *.safetensors and the tokenizer files, as merge.py writes them)")
    if not weights:
        raise UserError(f"{model} holds no weights (*.safetensors or pytorch_model*.bin)")
    if not (model / "tokenizer.json").is_file() and not (model / "tokenizer.model").is_file():
        raise UserError(f"{model} holds no tokenizer (tokenizer.json or tokenizer.model): the GGUF must carry one")
    config = read_json(model / "config.json")
    tokenizer_config = read_json(model / "tokenizer_config.json") if (model / "tokenizer_config.json").is_file() else {}
    if ("auto_map" in config or "auto_map" in tokenizer_config) and not trust_remote_code:
        raise UserError(f"{model} names its own Python code (auto_map), which the converter would run "
                        "(it loads tokenizers with trust_remote_code=True): pass --trust_remote_code if you trust it")
    if "GlmForCausalLM" in config.get("architectures", []):
        check_glm(model, config)
    return config


def check_glm(model: Path, config: dict) -> None:
    """llama.cpp's converter writes a GlmForCausalLM (GLM-4-9B -hf) with ChatGLM's layout: head size
    hidden / heads (GLM-4-9B: 4096 / 32 = 128), nowhere else recorded. Another head size would load in
    llama.cpp and compute something else: refused rather than silently wrong."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise UserError(f"{model}: head_dim {head_dim} x {heads} heads != hidden_size {hidden}; llama.cpp's converter "
                        "writes a GlmForCausalLM as if they were equal, so its GGUF would compute something else")


def glm_settings(config: dict) -> dict[str, float]:
    """The GGUF values the converter takes from ChatGLM's config keys (`seq_length`, `layernorm_epsilon`,
    `rope_ratio`), which a GlmForCausalLM config does not have: it would write the hidden size as the context
    length, 1e-5 as the norm epsilon (GLM-4-9B: 1.5625e-07) and 10000 as the RoPE base, whatever the model says.
    These are the model's own values, written over the converter's (gguf-py, as llama.cpp's gguf_set_metadata.py)."""
    rope = config.get("rope_parameters") or {}
    settings = {"context_length": config.get("max_position_embeddings"),
                "attention.layer_norm_rms_epsilon": config.get("rms_norm_eps"),
                "rope.freq_base": rope.get("rope_theta", config.get("rope_theta"))}
    return {key: value for key, value in settings.items() if value is not None}


def find_converter(llama_cpp: Path) -> Path:
    script = llama_cpp / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"llama.cpp's converter not found: {script} does not exist. `make real-artefacts` extracts it "
                        "from the pinned llama-cpp-python sdist into .cache/real_artefacts/llama_cpp/ (if make finds "
                        "nothing to do, run `python tests/real_artefacts.py`); or pass --llama_cpp PATH to a llama.cpp "
                        "checkout (its requirements/requirements-convert_hf_to_gguf.txt lists what it needs)")
    if not (llama_cpp / "gguf-py" / "gguf" / "__init__.py").is_file():
        raise UserError(f"{llama_cpp} has convert_hf_to_gguf.py but no gguf-py/gguf/: not a complete llama.cpp tree")
    return script


def run_converter(script: Path, model: Path, outtype: str, outfile: Path, extra: list[str]) -> None:
    """One converter run, its output passed through; its known refusals become one clear message."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(script.parent / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NO_LOCAL_GGUF", None)  # else the converter would take the pip gguf, which may not match it
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local directory: nothing is downloaded
    command = [sys.executable, str(script), str(model), "--outtype", outtype, "--outfile", str(outfile), *extra]
    logger.info("running %s", " ".join(command))
    tail: collections.deque[str] = collections.deque(maxlen=60)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          encoding="utf-8", errors="replace") as process:
        for line in process.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    if process.returncode == 0:
        return
    outfile.unlink(missing_ok=True)
    text = "".join(tail)
    if "BPE pre-tokenizer was not recognized" in text:
        raise UserError(f"{model}: llama.cpp does not know this tokenizer (the converter identifies a BPE tokenizer "
                        "by its ids on a test string, and these are not among the ones llama.cpp implements). "
                        "Export a model that keeps its released tokenizer (GLM-4, Qwen2/2.5/3, Llama-3, ...): the "
                        "recipes' built-in demo models use vocabularies built here, which llama.cpp cannot run")
    if " is not supported" in text:
        raise UserError(f"{model}: llama.cpp's converter does not support this architecture "
                        f"({text.strip().splitlines()[-1]})")
    raise UserError(f"llama.cpp's converter failed on {model} (exit status {process.returncode}); its last lines:\n"
                    + "".join(list(tail)[-15:]))


def model_chat_template(model: Path, trust_remote_code: bool) -> str | None:
    """The template transformers (and so training and our server) would use: the GGUF must carry it."""
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code).chat_template
    return template.get("default") if isinstance(template, dict) else template  # named templates: the default


def read_gguf(llama_cpp: Path, path: Path, settings: dict[str, float] | None) -> dict:
    """What a GGUF says about itself, read with the converter's own gguf-py; `settings` (key -> value,
    without the architecture prefix) are written over the converter's values first. A reader of a
    150k-token vocabulary takes about 8 s (every string is a field part)."""
    if str(llama_cpp / "gguf-py") not in sys.path:
        sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    reader = GGUFReader(path, "r+" if settings else "r")

    def text(key: str) -> str | None:
        field = reader.fields.get(key)
        return None if field is None else bytes(field.parts[field.data[0]]).decode("utf-8")

    architecture = text("general.architecture")
    corrected = {}
    for key, value in (settings or {}).items():
        field = reader.fields.get(f"{architecture}.{key}")
        if field is None:
            raise UserError(f"{path}: no {architecture}.{key} in the GGUF (a converter other than the one verified?)")
        part = field.parts[field.data[0]]
        if not same_float32(part[0], value):
            corrected[key] = {"converter": part[0].item(), "model": value}
            part[0] = value
    reader.data.flush()
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"architecture": architecture, "tensors": len(reader.tensors), "tokenizer_model": text("tokenizer.ggml.model"),
            "tokenizer_pre": text("tokenizer.ggml.pre"), "tokens": None if tokens is None else len(tokens.data),
            "chat_template": text("tokenizer.chat_template"), **({"corrected": corrected} if settings else {})}


def same_float32(stored, value: float) -> bool:
    return abs(float(stored) - value) <= 1e-6 * abs(value)  # float32 storage of a float64 setting


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "--model_name_or_path", required=True,
                        help="Merged (merge.py) or full model directory: config.json, safetensors, tokenizer.")
    parser.add_argument("--outtype", nargs="+", default=["f16", "q8_0"], choices=list(OUTTYPES),
                        help="One GGUF per type: f16 (16-bit floats, lossless for float16 weights) and/or q8_0 "
                        "(8-bit blocks, about half the size). Default: both.")
    parser.add_argument("--output_dir", default=None, help="Default: outputs/<model directory name>_gguf.")
    parser.add_argument("--name", default=None,
                        help="File name stem: <name>-F16.gguf, <name>-Q8_0.gguf (default: the model directory name).")
    parser.add_argument("--llama_cpp", type=Path, default=DEFAULT_LLAMA_CPP,
                        help="llama.cpp tree holding convert_hf_to_gguf.py and gguf-py/ (default: the one "
                        "`make real-artefacts` extracts, .cache/real_artefacts/llama_cpp).")
    parser.add_argument("--trust_remote_code", action="store_true",
                        help="Allow a model that names its own code (auto_map); the converter runs it.")
    parser.add_argument("--converter_args", nargs=argparse.REMAINDER, default=[],
                        help="Everything after this is passed to convert_hf_to_gguf.py as it is (e.g. --use-temp-file).")
    args = parser.parse_args(argv)

    model = Path(args.model)
    config = check_model_dir(model, args.trust_remote_code)
    script = find_converter(args.llama_cpp)
    architecture = ",".join(config.get("architectures") or ["?"])
    if architecture not in VERIFIED:
        logger.warning("%s is not among the architectures verified here (%s): the converter decides",
                       architecture, ", ".join(VERIFIED))
    template = model_chat_template(model, args.trust_remote_code)
    if template is None:
        logger.warning("%s has no chat template: the GGUF will carry none and llama.cpp / Ollama will guess one",
                       model)
    name = args.name or model.resolve().name
    out = Path(args.output_dir or Path("outputs") / f"{name}_gguf")
    out.mkdir(parents=True, exist_ok=True)

    files = {}
    for outtype in dict.fromkeys(args.outtype):
        path = out / f"{name}-{OUTTYPES[outtype]}.gguf"
        start = time.perf_counter()
        run_converter(script, model, outtype, path, args.converter_args)
        files[outtype] = {"path": str(path), "bytes": path.stat().st_size,
                          "seconds": round(time.perf_counter() - start, 1)}

    settings = glm_settings(config) if architecture == "GlmForCausalLM" else None
    summaries = {}
    for outtype, info in files.items():  # the tokenizer and template are the same in each: read the first
        if settings or not summaries:
            summaries[outtype] = read_gguf(args.llama_cpp, Path(info["path"]), settings)
            if settings:
                info["corrected"] = summaries[outtype].pop("corrected")
    summary = next(iter(summaries.values()))
    if template is None and summary["chat_template"] is not None:
        logger.warning("the converter added a chat template the model does not have (llama.cpp's default for it)")
    elif summary["chat_template"] != template:
        raise UserError(f"{next(iter(files.values()))['path']}: its chat template differs from {model}'s "
                        f"({'missing' if summary['chat_template'] is None else 'other text'}): "
                        "llama.cpp would prompt the model differently from training")
    report = {"model": str(model), "architecture": architecture, "converter": str(script), "files": files,
              "gguf": {k: v for k, v in summary.items() if k != "chat_template"},
              "chat_template_included": template is not None}
    (out / "gguf_report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    for outtype, info in files.items():
        fixed = ", ".join(f"{k} {v['converter']:g} -> {v['model']:g}" for k, v in info.get("corrected", {}).items())
        print(f"{outtype}: {info['path']} ({info['bytes'] / 2**20:.1f} MiB, {info['seconds']} s)"
              + (f"; set to the model's values: {fixed}" if fixed else ""))
    print(f"GGUF architecture {summary['architecture']}, {summary['tensors']} tensors, tokenizer "
          f"{summary['tokenizer_model']}/{summary['tokenizer_pre']} ({summary['tokens']} tokens), chat template: "
          + ("included, equal to the model's" if template is not None else "none from the model"))
    return report


if __name__ == "__main__":
    main()
