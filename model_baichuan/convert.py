"""Convert a Baichuan-7B / Baichuan2-7B checkpoint into a plain Llama checkpoint.

    python model_baichuan/convert.py --input /models/Baichuan2-7B-Chat --output outputs/baichuan2_7b_chat_llama
    python model_baichuan/convert.py --input /models/Baichuan-7B --output outputs/baichuan_7b_llama --dtype bfloat16

Baichuan ships its models as remote code (`modeling_baichuan.py`, `trust_remote_code=True`).
The 7B models are Llama in all but names, so the result loads with
`LlamaForCausalLM.from_pretrained(output)` / `AutoTokenizer.from_pretrained(output)` and
runs with every Llama kernel, PEFT, TRL and serving path, without remote code:
- `self_attn.W_pack` [3h, h] holds q, k, v rows in that order, each laid out per head as
  Llama's q_proj / k_proj / v_proj: a row split, no permutation. Rotary embeddings are
  Llama's (base 10000, rotate-half); `rotary_emb.inv_freq` buffers are dropped.
- Baichuan2's `NormHead` L2-normalises each row of lm_head.weight at run time; checkpoints
  store it unnormalised. Llama's head is a plain linear layer, so the normalisation is baked
  into the saved weight (computed in float32). `--norm_head auto` reads the source's
  modeling_baichuan.py (`class NormHead`), else the vocabulary size (125696 = Baichuan2).
  Baichuan-7B (v1) has a plain head.
- Baichuan-13B / Baichuan2-13B use ALiBi position biases, which Llama cannot express: they
  are refused, not converted into a model that would silently give wrong logits.
- The sentencepiece `tokenizer.model` becomes a `tokenizer.json` (BPE with byte fallback,
  the proto's own whitespace and dummy-prefix rules) that gives sentencepiece's ids;
  `<reserved_106>` / `<reserved_107>` (Baichuan2-Chat's user / assistant markers, ids 195 / 196)
  are special tokens, so the baichuan2 chat template can be written as text.

Weights are streamed shard by shard (safetensors read tensor by tensor, .bin memory-mapped):
peak memory is about one output shard (--max_shard_size, 5 GB), never the whole model. The
output is safetensors (an output shard per input file, split further where larger; an index
when more than one), config.json, generation_config.json and the tokenizer, whose
chat_template is the --template entry as Jinja (what SFT, chat and serving read).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from common.errors import UserError, cli_main
from common.spm import SP_BPE, SP_UNIGRAM, read_sp_proto, sentencepiece_to_tokenizers
from common.templates import TEMPLATES, get_template, save_template_name

logger = logging.getLogger("model_baichuan.convert")

BAICHUAN2_VOCAB_SIZE = 125696
ROPE_THETA = 10000.0
NORM_HEAD_EPS = 1e-12  # torch.nn.functional.normalize's default, which NormHead uses
CHAT_MARKERS = ("<reserved_106>", "<reserved_107>")  # Baichuan2-Chat: user turn, assistant turn

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
DROPPED_SUFFIXES = ("self_attn.rotary_emb.inv_freq",)  # recomputed by Llama from rope_theta

# Baichuan2-Chat's generation_config.json, used when the source has none. user_token_id and
# assistant_token_id are no GenerationConfig fields: the template names those markers.
DEFAULT_GENERATION = {
    "do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05,
    "max_new_tokens": 2048, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}

# Checked before anything is written: sentencepiece and the converted tokenizer agree on these.
TOKENIZER_SAMPLES = (
    "今天天气很好，我们去公园散步吧。", "Baichuan2-7B 于2023年9月6日发布，价格：￥199.00元",
    "  two leading spaces,   three inside, one trailing ", "第一行\n第二行\n\n\t缩进", "表情😀和生僻字龘𠀀",
)


# ------------------------------------------------------------------ source config
def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def read_source_config(source: Path) -> dict:
    if not source.is_dir():
        raise UserError(f"input directory not found: {source}")
    path = source / "config.json"
    if not path.is_file():
        raise UserError(f"{source} holds no config.json: expected a Baichuan checkpoint directory")
    config = read_json(path)
    if config.get("model_type") != "baichuan":
        raise UserError(f"{path}: model_type is {config.get('model_type')!r}, expected 'baichuan' "
                        "(this script converts Baichuan-7B / Baichuan2-7B checkpoints)")
    required = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size")
    missing = [key for key in required if not isinstance(config.get(key), int)]
    if missing:
        raise UserError(f"{path}: missing or non-integer {', '.join(missing)}")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise UserError(f"{path}: hidden_size {config['hidden_size']} is not a multiple of "
                        f"num_attention_heads {config['num_attention_heads']}")
    return config


def modeling_source(source: Path) -> str | None:
    path = source / "modeling_baichuan.py"
    return path.read_text(encoding="utf-8", errors="replace") if path.is_file() else None


def refuse_alibi(source: Path, config: dict) -> None:
    """The 13B models add ALiBi biases to the attention scores instead of rotating q and k;
    Llama has no such bias, so a converted 13B model would run but give wrong logits."""
    code = (modeling_source(source) or "").lower()
    reasons = []
    # A RoPE modeling file that merely mentions ALiBi (in a comment) is not an ALiBi model.
    if "alibi" in code and "rotary" not in code:
        reasons.append("its modeling_baichuan.py builds ALiBi attention biases")
    if "max_position_embeddings" not in config:
        reasons.append("its config.json has no max_position_embeddings (13B configs only have model_max_length)")
    if config["hidden_size"] == 5120 and config["num_hidden_layers"] == 40:
        reasons.append("hidden_size 5120 with 40 layers is the 13B shape")
    if reasons:
        raise UserError(
            f"{source} looks like Baichuan-13B / Baichuan2-13B: {'; '.join(reasons)}. The 13B models use ALiBi "
            "position biases, not rotary embeddings, and cannot be converted to Llama: only the 7B models "
            "(Baichuan-7B, Baichuan2-7B-Base/-Chat) can; this recipe does not support 13B.")


def decide_norm_head(source: Path, config: dict, option: str) -> bool:
    if option != "auto":
        decision, why = option == "true", "--norm_head " + option
    elif (code := modeling_source(source)) is not None:
        decision = re.search(r"^class\s+NormHead\b", code, re.MULTILINE) is not None
        why = f"modeling_baichuan.py {'defines' if decision else 'has no'} class NormHead"
    else:
        decision = config["vocab_size"] == BAICHUAN2_VOCAB_SIZE
        why = (f"no modeling_baichuan.py; vocab_size {config['vocab_size']} "
               f"{'is' if decision else 'is not'} Baichuan2's {BAICHUAN2_VOCAB_SIZE}")
    logger.info("lm_head: %s (%s)", "Baichuan2 NormHead, rows L2-normalised into the weight" if decision
                else "plain linear head, copied as is", why)
    return decision


# ------------------------------------------------------------------ weights: plan
@dataclass
class WeightPlan:
    files: list[Path]
    format: str  # "safetensors" or "bin"
    dtype: torch.dtype  # the dtype holding most of the source's parameters
    dropped: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def weight_files(source: Path) -> tuple[list[Path], str]:
    for fmt, single, index in (("safetensors", "model.safetensors", "model.safetensors.index.json"),
                               ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (source / index).is_file():
            weight_map = read_json(source / index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise UserError(f"{source / index}: no weight_map")
            files = [source / name for name in dict.fromkeys(weight_map.values())]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{source / index} names shards that are missing: {', '.join(missing[:5])}")
            return files, fmt
        if (source / single).is_file():
            return [source / single], fmt
    raise UserError(f"{source} holds no weights: expected model.safetensors, pytorch_model.bin, or shards with "
                    "model.safetensors.index.json / pytorch_model.bin.index.json")


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A .bin state dict, memory-mapped: tensors are read from disk only when used."""
    try:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            logger.warning("%s is in torch's legacy format: loading it without mmap", path.name)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise UserError(f"cannot read {path}: {err}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def tensor_infos(path: Path, fmt: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of one file's tensors, without reading their data."""
    if fmt == "safetensors":
        infos = {}
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    dtype = piece.get_dtype()
                    infos[name] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES.get(dtype, dtype))
        except Exception as err:  # safetensors raises its own error type for broken headers
            raise UserError(f"cannot read {path}: {err}") from None
        return infos
    state = load_bin(path)
    return {name: (tuple(t.shape), t.dtype) for name, t in state.items()}


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    per_layer = {
        "self_attn.W_pack.weight": (3 * h, h), "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    shapes = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{suffix}": shape for suffix, shape in per_layer.items()})
    return shapes


def plan_weights(source: Path, config: dict) -> WeightPlan:
    """Check every tensor name and shape before anything is written."""
    files, fmt = weight_files(source)
    expected = expected_shapes(config)
    found: dict[str, tuple[int, ...]] = {}
    where: dict[str, str] = {}
    params_by_dtype: dict[torch.dtype, int] = {}
    unexpected, dropped = [], 0
    for path in tqdm(files, desc="reading shard headers", unit="shard", disable=len(files) == 1):
        for name, (shape, dtype) in tensor_infos(path, fmt).items():
            if name.endswith(DROPPED_SUFFIXES):
                dropped += 1
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            if name in found:
                raise UserError(f"tensor {name} appears twice: in {where[name]} and {path.name}")
            found[name], where[name] = shape, path.name
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise UserError(f"{path.name}: tensor {name} has dtype {dtype}, expected a floating point dtype")
            params_by_dtype[dtype] = params_by_dtype.get(dtype, 0) + torch.Size(shape).numel()
    if unexpected:
        raise UserError(f"{source}: {len(unexpected)} unexpected tensor name(s), e.g. {', '.join(unexpected[:5])}. "
                        "Expected Baichuan-7B names (model.layers.N.self_attn.W_pack.weight, ...); is this a "
                        "Baichuan checkpoint, and does config.json's num_hidden_layers match it?")
    missing = [name for name in expected if name not in found]
    if missing:
        layers = sorted({int(m.group(1)) for name in missing if (m := LAYER_NAME.fullmatch(name))})
        detail = f" (layers {', '.join(map(str, layers[:10]))}{' ...' if len(layers) > 10 else ''} incomplete)" \
            if layers else ""
        raise UserError(f"{source}: {len(missing)} tensor(s) missing{detail}, e.g. {', '.join(missing[:5])}")
    wrong = [f"{name} {list(found[name])} (expected {list(shape)})"
             for name, shape in expected.items() if found[name] != shape]
    if wrong:
        raise UserError(f"{source}: tensor shapes do not match config.json: {'; '.join(wrong[:3])}")
    dtype = max(params_by_dtype, key=params_by_dtype.get)
    if len(params_by_dtype) > 1:
        logger.info("source dtypes %s; auto dtype is %s", {str(k): v for k, v in params_by_dtype.items()}, dtype)
    return WeightPlan(files=files, format=fmt, dtype=dtype, dropped=dropped, shapes=found)


# ------------------------------------------------------------------ weights: convert
def convert_tensor(name: str, tensor: torch.Tensor, hidden_size: int, norm_head: bool,
                   dtype: torch.dtype) -> list[tuple[str, torch.Tensor]]:
    """One Baichuan tensor -> its Llama tensor(s) in `dtype`; every result owns its storage
    (safetensors refuses tensors that share memory, as q, k and v views of W_pack would)."""
    if name.endswith("self_attn.W_pack.weight"):
        prefix = name[: -len("W_pack.weight")]
        q, k, v = tensor.split(hidden_size, dim=0)
        return [(f"{prefix}{proj}.weight", part.to(dtype, copy=True))
                for proj, part in (("q_proj", q), ("k_proj", k), ("v_proj", v))]
    if name == "lm_head.weight" and norm_head:
        normalised = torch.nn.functional.normalize(tensor.float(), p=2.0, dim=1, eps=NORM_HEAD_EPS)
        return [(name, normalised.to(dtype))]
    return [(name, tensor.to(dtype).contiguous())]


def source_tensors(path: Path, fmt: str):
    """(name, tensor) of one file, one at a time for safetensors."""
    if fmt == "safetensors":
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    else:
        state = load_bin(path)
        while state:
            name = next(iter(state))
            yield name, state.pop(name)


def convert_weights(plan: WeightPlan, output: Path, config: dict, norm_head: bool, dtype: torch.dtype,
                    max_shard_bytes: int) -> dict[str, int]:
    """Convert file by file. An output shard ends with its input file or at max_shard_bytes,
    whichever comes first, so memory stays bounded even for a single 15 GB pytorch_model.bin."""
    shard_tensors: list[list[str]] = []  # names per written shard, in order
    total_size = 0
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            save_file(shard, str(output / f"partial-{len(shard_tensors):05d}.safetensors"), metadata={"format": "pt"})
            shard_tensors.append(list(shard))
            shard, shard_bytes = {}, 0

    for path in tqdm(plan.files, desc="converting", unit="file"):
        for name, tensor in source_tensors(path, plan.format):
            if name.endswith(DROPPED_SUFFIXES):
                continue
            for new_name, new_tensor in convert_tensor(name, tensor, config["hidden_size"], norm_head, dtype):
                size = new_tensor.numel() * new_tensor.element_size()
                if shard and shard_bytes + size > max_shard_bytes:
                    flush()
                shard[new_name] = new_tensor
                shard_bytes += size
                total_size += size
            del tensor
        flush()

    # Names carry the shard count, known only now.
    n = len(shard_tensors)
    names = ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    weight_map = {}
    for i, (file_name, tensor_names) in enumerate(zip(names, shard_tensors)):
        (output / f"partial-{i:05d}.safetensors").replace(output / file_name)
        weight_map.update(dict.fromkeys(tensor_names, file_name))
    if n > 1:
        index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (output / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"tensors": len(weight_map), "bytes": total_size, "files": n}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--max_shard_size {text!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    power = " KMGT".index(unit[0]) if unit != "B" else 0
    return int(number * (1024 if "I" in unit else 1000) ** power)


# ------------------------------------------------------------------ config files
def llama_config(config: dict, dtype: torch.dtype):
    heads = config["num_attention_heads"]
    return LlamaConfig(
        architectures=["LlamaForCausalLM"],
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=config["hidden_size"] // heads,
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config["max_position_embeddings"],
        initializer_range=config.get("initializer_range", 0.02),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        use_cache=True,
        pad_token_id=config.get("pad_token_id", 0),
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        tie_word_embeddings=False,
        # transformers 5 spells RoPE settings as rope_parameters (a bare rope_theta is only
        # accepted as a legacy alias); 5.17 and 5.23 both take this form.
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        attention_bias=False,
        mlp_bias=False,
        dtype=str(dtype).removeprefix("torch."),
    )


def generation_config(source: Path, config: dict):
    path = source / "generation_config.json"
    if path.is_file():
        values = read_json(path)
        logger.info("generation config: from %s", path)
    else:
        values = {**DEFAULT_GENERATION, **{k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                           if isinstance(config.get(k), int)}}
        logger.info("generation config: %s has none, using Baichuan2-Chat's defaults", source)
    fields = GenerationConfig().to_dict()
    kept = {k: v for k, v in values.items() if k in fields and not k.startswith("_") and k != "transformers_version"}
    left_out = sorted(set(values) - set(kept) - {"transformers_version", "_from_model_config"})
    if left_out:
        logger.info("generation config: left out %s (no GenerationConfig fields)", ", ".join(left_out))
    if not kept.get("do_sample", False):
        # transformers refuses to save sampling settings that greedy decoding would ignore
        ignored = [k for k in SAMPLING_ONLY if k in kept]
        for key in ignored:
            del kept[key]
        if ignored:
            logger.info("generation config: do_sample is off, left out %s", ", ".join(ignored))
    generation = GenerationConfig(**kept)
    try:
        generation.validate(strict=True)
    except ValueError as err:
        raise UserError(f"{path if path.is_file() else 'generation settings'}: {err}") from None
    return generation


# ------------------------------------------------------------------ tokenizer
def special_token_text(value, default: str) -> str:
    """A special token from tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else default


def convert_tokenizer(source: Path, config: dict):
    """The converted tokenizer (not yet saved), or None when the source has no tokenizer.model."""
    sp_path = source / "tokenizer.model"
    if not sp_path.is_file():
        logger.warning("%s has no tokenizer.model: no tokenizer written; copy one into the output", source)
        return None
    proto = read_sp_proto(sp_path)
    backend = sentencepiece_to_tokenizers(proto, special_pieces=CHAT_MARKERS)
    if backend.get_vocab_size(with_added_tokens=True) != len(proto.pieces):
        raise UserError(f"{sp_path}: the converted vocabulary has {backend.get_vocab_size()} tokens, "
                        f"sentencepiece {len(proto.pieces)}")
    if len(proto.pieces) > config["vocab_size"]:
        raise UserError(f"{sp_path} has {len(proto.pieces)} pieces but the model only {config['vocab_size']} "
                        "embedding rows")
    settings_path = source / "tokenizer_config.json"
    settings = read_json(settings_path) if settings_path.is_file() else {}
    unk = special_token_text(settings.get("unk_token"), "<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=special_token_text(settings.get("bos_token"), "<s>"),
        eos_token=special_token_text(settings.get("eos_token"), "</s>"),
        unk_token=unk,
        pad_token=special_token_text(settings.get("pad_token"), unk),  # Baichuan pads with <unk> (id 0)
        # BaichuanTokenizer adds neither by default; its chat format has no <s>.
        add_bos_token=bool(settings.get("add_bos_token", False)),
        add_eos_token=bool(settings.get("add_eos_token", False)),
        model_max_length=settings.get("model_max_length", config["max_position_embeddings"]),
        clean_up_tokenization_spaces=False,
        # registered as special tokens: skipped by decode(skip_special_tokens=True), never split
        extra_special_tokens=[t for t in CHAT_MARKERS if t in backend.get_vocab()],
    )
    for name in ("bos", "eos", "unk", "pad"):
        token = getattr(tokenizer, f"{name}_token")
        if token not in backend.get_vocab():
            raise UserError(f"{sp_path}: the {name} token {token!r} is not in the vocabulary")
    compare_with_sentencepiece(sp_path, tokenizer)
    spec = proto.normalizer_spec
    logger.info("tokenizer: %d pieces (%s), add_dummy_prefix %s, remove_extra_whitespaces %s%s",
                len(proto.pieces), {SP_BPE: "BPE", SP_UNIGRAM: "unigram"}[proto.trainer_spec.model_type],
                spec.add_dummy_prefix, spec.remove_extra_whitespaces,
                "; special: " + ", ".join(f"{t}={tokenizer.convert_tokens_to_ids(t)}" for t in CHAT_MARKERS
                                         if t in backend.get_vocab()))
    return tokenizer


def compare_with_sentencepiece(sp_path: Path, tokenizer) -> None:
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_path))
    for text in TOKENIZER_SAMPLES:
        expected, got = sp.encode(text), tokenizer(text, add_special_tokens=False)["input_ids"]
        if expected != got:
            raise UserError(f"{sp_path}: the converted tokenizer splits {text!r} differently from sentencepiece "
                            f"({got[:12]} vs {expected[:12]}); please report this model")


# ------------------------------------------------------------------ output directory
def prepare_output(output: Path, source: Path, overwrite: bool) -> None:
    if output.resolve() == source.resolve():
        raise UserError("--output must differ from --input")

    def is_model_file(path: Path) -> bool:
        return path.name == "config.json" or path.name.startswith(("model", "partial-")) and \
            (path.suffix == ".safetensors" or path.name.endswith(".index.json"))

    old = sorted(p for p in output.iterdir() if is_model_file(p)) if output.is_dir() else []
    if old and not overwrite:
        raise UserError(f"{output} already holds a model ({', '.join(p.name for p in old[:3])}): "
                        "choose another --output or pass --overwrite")
    for path in old:
        path.unlink()  # stale shards of an earlier conversion would not match the new index
    output.mkdir(parents=True, exist_ok=True)


def verify(output: Path) -> None:
    """Load the result as a user would (no remote code) and continue a prompt greedily."""
    model, info = AutoModelForCausalLM.from_pretrained(output, trust_remote_code=False, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise UserError(f"{output}: the converted checkpoint does not load cleanly: {problems}")
    if not (output / "tokenizer.json").is_file():
        print("verify: the model loads cleanly (no tokenizer to try a prompt with)")
        return
    tokenizer = AutoTokenizer.from_pretrained(output, trust_remote_code=False)
    prompt = "中国的首都是"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        logits = model(**inputs).logits
        if not torch.isfinite(logits).all():
            raise UserError(f"{output}: the converted model gives non-finite logits")
        new = model.generate(**inputs, max_new_tokens=16, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    print(f"verify: loads cleanly; greedy continuation of {prompt!r}: {tokenizer.decode(new)!r}")


@cli_main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="Baichuan-7B / Baichuan2-7B checkpoint directory.")
    parser.add_argument("--output", required=True, help="Directory for the Llama checkpoint.")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="Precision of the saved weights (auto: that of the source tensors).")
    parser.add_argument("--norm_head", default="auto", choices=["auto", "true", "false"],
                        help="Bake Baichuan2's NormHead (row-normalised lm_head) into the weight. auto: yes when "
                             "modeling_baichuan.py defines NormHead, else when vocab_size is 125696.")
    parser.add_argument("--template", default="baichuan2", choices=[*sorted(TEMPLATES), "none"],
                        help="Chat template written into the tokenizer (as Jinja) for SFT, chat and serving (none: skip).")
    parser.add_argument("--max_shard_size", default="5GB",
                        help="Largest output shard (an output shard also ends with each input file); "
                             "bounds the memory the conversion needs.")
    parser.add_argument("--overwrite", action="store_true", help="Replace a model already in --output.")
    parser.add_argument("--verify", action="store_true",
                        help="Afterwards load the result with transformers (needs RAM for the whole model) and "
                             "continue a prompt.")
    args = parser.parse_args(argv)
    source, output = Path(args.input), Path(args.output)

    max_shard_bytes = parse_size(args.max_shard_size)
    config = read_source_config(source)
    refuse_alibi(source, config)
    norm_head = decide_norm_head(source, config, args.norm_head)
    plan = plan_weights(source, config)
    dtype = plan.dtype if args.dtype == "auto" else DTYPES[args.dtype]
    logger.info("weights: %d %s file(s), %d tensors (%d rotary buffers dropped), saved as %s", len(plan.files),
                plan.format, len(plan.shapes), plan.dropped, dtype)
    # Everything that can fail on bad input is checked before the long part.
    tokenizer = convert_tokenizer(source, config)
    generation = generation_config(source, config)
    template = get_template(args.template) if args.template != "none" else None

    prepare_output(output, source, args.overwrite)
    stats = convert_weights(plan, output, config, norm_head, dtype, max_shard_bytes)
    llama_config(config, dtype).save_pretrained(output)
    generation.save_pretrained(output)
    written = ["config.json", "generation_config.json"]
    if tokenizer is not None:
        if template is not None:  # as Jinja, so that any serving stack prompts it the same way
            tokenizer.chat_template = template.jinja()
        tokenizer.save_pretrained(output)
        # Tools that read sentencepiece directly (llama.cpp's converter) look for it;
        # transformers prefers tokenizer.json.
        shutil.copyfile(source / "tokenizer.model", output / "tokenizer.model")
        written += ["tokenizer.json", "tokenizer_config.json", "tokenizer.model"]
    if template is not None and tokenizer is None:  # no tokenizer to carry it: the older record
        save_template_name(output, template.name)
        written.append("sft_template.json")

    weights = "model.safetensors" if stats["files"] == 1 else \
        f"{stats['files']} shards + model.safetensors.index.json"
    size = f"{stats['bytes'] / 2**30:.2f} GiB" if stats["bytes"] >= 2**30 else f"{stats['bytes'] / 2**20:.1f} MiB"
    print(f"wrote {output}: {weights} ({stats['tensors']} tensors, {size} {str(dtype).removeprefix('torch.')}), "
          f"{', '.join(written)}; lm_head {'normalised (NormHead)' if norm_head else 'as is'}")
    print(f"load it without remote code: AutoModelForCausalLM.from_pretrained('{output}') and "
          f"AutoTokenizer.from_pretrained('{output}')"
          + ("" if args.verify else "; add --verify (with --overwrite) to load it here and continue a prompt"))
    if args.verify:
        verify(output)
    return {"output": str(output), "norm_head": norm_head, "dtype": str(dtype), **stats}


if __name__ == "__main__":
    main()
