"""Chaining: one model's layers spread over several GPUs of one host, one GPU busy at a time.

    python chatglm_lora/train.py ... --device_map balanced           # equal parameter bytes per GPU
    python chatglm_lora/train.py ... --device_map balanced_low_0     # GPU 0 (inputs, generation state) half-loaded
    python chatglm_lora/train.py ... --device_map 0:20GiB,1:30GiB    # at most this much per GPU

A 7B model in bf16 (13.5 GB of weights) plus its training activations may not fit one GPU;
chained over two, each GPU holds a contiguous run of decoder layers and the activations
flow from one to the next. It is one process: no torchrun, no DeepSpeed; only one GPU works
at any moment, so it buys memory, not speed.

The map (module name -> GPU index) is computed from the config alone, on a model built on
the `meta` device (`accelerate.init_empty_weights`), so the map of a 7B model costs no
memory and can be computed and tested on a CPU with made-up GPU sizes (`max_memory`).
Placement is accelerate's `infer_auto_device_map` (decoder layers are never split:
`model._no_split_modules`; tied weights stay together); what this module adds is the
per-GPU budget it places into, and checks of the result:
- accelerate's `get_balanced_memory` is not used: it gives every GPU but the last
  `total / n` plus 1.25 layers of slack and leaves the last one the remainder, so the last
  GPU, the one that also holds the LM head's logits, ends short of or over its share (a
  Llama-2-7B over 4 GPUs: 7.65 / 9 / 9 / 7.65 layer sizes), and its `low_zero` puts nothing
  at all on GPU 0 when the rest fits. Here the budgets come from cumulative targets over the
  model's placement units (each GPU's share rounded to whole layers at its boundary), so
  every GPU is within one layer of its share;
- the GPU that holds the LM head keeps `lm_head_reserve` bytes free for the logits (default:
  the size of the LM head's weight; a [tokens, vocab] logits tensor with its fp32 copy for
  the loss and its gradient is about that size at hidden_size / 5 tokens). With untied
  embeddings that is the last GPU; a tied LM head shares its weight with the input
  embedding, so both sit on the first GPU and the reserve is kept there;
- `infer_auto_device_map` keeps room on the first GPU for a layer offloaded to the CPU
  (`main_devices`); a chain never offloads, so a zero-byte placeholder device -1 in front
  takes that role and the first real GPU gets its whole budget;
- the result is checked: every parameter and buffer covered, no decoder layer split,
  devices non-decreasing along the model, the input embedding on the first GPU, nothing on
  "cpu" / "disk", no GPU over its memory. A model that does not fit is a `UserError`.

Findings behind "inputs and labels on the first GPU, nothing else to do" (read in the
installed sources: transformers 5.23, accelerate 1.15, peft 0.21):
- from_pretrained with a dict `device_map` of several devices calls accelerate's
  `dispatch_model` (transformers/modeling_utils.py:4456), which hooks every placed module to
  move its inputs to its own GPU and sets `model.hf_device_map` (accelerate/big_modeling.py:
  516); the top-level hook (accelerate/hooks.py:696, io_same_device) moves the call's inputs
  to the first GPU and returns the outputs (logits, loss) on the inputs' device.
- labels: the causal-LM loss moves them to the logits' device itself
  (transformers/loss/loss_utils.py:71, `shift_labels.to(logits.device)`; line 46 does the
  same for `num_items_in_batch`).
- Trainer: with `hf_device_map` on more than one device it sets `is_model_parallel`, does
  not move the model and forces n_gpu = 1 (no DataParallel) (transformers/trainer.py:
  459-465, 481-508); `is_parallelizable` / `model_parallel` are no longer read (gone from
  transformers 5.23). A PeftModel forwards `hf_device_map` to its base model.
- PEFT: each LoRA layer moves its new A/B weights to its base layer's device and dtype
  (peft/tuners/lora/layer.py:314 -> tuners_utils.py:2168
  `_move_adapter_to_device_of_base_layer`); trainable token rows likewise
  (peft/tuners/trainable_tokens/layer.py:160). But a module placed on its own (not inside a
  decoder layer: the LM head) carries its own device hook, and PEFT's wrapper goes around
  it: the wrapper computes lora_A(x) before the inner module's hook moves x, so x is still on
  the previous GPU ("mat2 is on cuda:1, different from other tensors on cuda:0", seen on 2
  H200s). `align_adapter_inputs` gives such wrappers the inner module's hook.
- resize_token_embeddings builds the new rows on the old weight's device and keeps the
  module, so its hook (transformers/modeling_utils.py:2819-2823).
- Not free: an index tensor passed as `logits_to_keep` is moved to the first GPU by the
  top-level hook while the hidden states it indexes are on the last one, and CUDA indexing
  refuses indices on another GPU; common.sft.ReplyLossTrainer passes a chained model a list.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
from collections.abc import Mapping

import torch
from torch import nn

from common.errors import UserError

logger = logging.getLogger(__name__)

STRATEGIES = ("balanced", "balanced_low_0", "memory")
LOW_0_WEIGHT = 0.5  # balanced_low_0: GPU 0's share relative to every other GPU's
FREE_MEMORY_SHARE = 0.9  # of a GPU's free memory, the rest for the CUDA context and fragmentation
GIB = 2**30


# ------------------------------------------------------------------------------ arguments
def parse_device_map(value: str) -> tuple[str, dict[int, int] | None]:
    """`--device_map` -> (strategy, max_memory): "balanced" / "balanced_low_0" -> (that, None);
    "0:20GiB,1:30GiB" -> ("memory", {0: bytes, 1: bytes}) (sizes as accelerate reads them:
    GiB, GB, MiB, MB or a byte count)."""
    from accelerate.utils import convert_file_size_to_int

    text = str(value).strip()
    if text in ("balanced", "balanced_low_0"):
        return text, None
    expected = ('expected balanced, balanced_low_0, or GPU sizes like "0:20GiB,1:30GiB" '
                "(GPU index:memory, comma-separated)")
    if ":" not in text:
        raise UserError(f"--device_map {value!r}: {expected}")
    max_memory: dict[int, int] = {}
    for item in text.split(","):
        index, _, size = item.strip().partition(":")
        if not re.fullmatch(r"\d+", index.strip()) or not size.strip():
            raise UserError(f"--device_map {value!r}: {item.strip()!r} is not GPU:size; {expected}")
        gpu = int(index)
        if gpu in max_memory:
            raise UserError(f"--device_map {value!r}: GPU {gpu} named twice")
        try:
            max_memory[gpu] = convert_file_size_to_int(size.strip())
        except ValueError:
            raise UserError(f"--device_map {value!r}: {size.strip()!r} is not a size (e.g. 20GiB, 500MB)") from None
        if max_memory[gpu] <= 0:
            raise UserError(f"--device_map {value!r}: GPU {gpu} needs a positive size")
    return "memory", max_memory


def require_gpus(max_memory: Mapping[int, int] | None = None) -> int:
    """Refuse a chained run that this machine cannot do; returns the number of visible GPUs."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible < 2:
        raise UserError(f"--device_map chains one model over several GPUs of this machine, but {visible} CUDA GPU"
                        f"{'' if visible == 1 else 's'} {'is' if visible == 1 else 'are'} visible: drop --device_map "
                        "(one GPU or the CPU holds the whole model)")
    if max_memory is not None:
        if len(max_memory) < 2:
            raise UserError("--device_map with sizes must name at least two GPUs, e.g. 0:20GiB,1:30GiB")
        absent = sorted(i for i in max_memory if i >= visible)
        if absent:
            raise UserError(f"--device_map names GPU {', '.join(map(str, absent))}, but only GPUs 0-{visible - 1} "
                            "are visible (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    return visible


def gpu_memory(num_devices: int | None = None) -> dict[int, int]:
    """FREE_MEMORY_SHARE of each visible GPU's free memory (the first `num_devices` GPUs)."""
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if visible == 0:
        raise UserError("no CUDA GPU is visible: give max_memory (e.g. {0: '20GiB', 1: '20GiB'}) to compute a device "
                        "map without GPUs")
    count = visible if num_devices is None else num_devices
    if not 1 <= count <= visible:
        raise UserError(f"asked for {count} GPUs, {visible} visible")
    return {i: int(torch.cuda.mem_get_info(i)[0] * FREE_MEMORY_SHARE) for i in range(count)}


def _resolve_memory(strategy: str, max_memory: Mapping | None, num_devices: int | None) -> dict[int, int]:
    from accelerate.utils import convert_file_size_to_int

    if strategy not in STRATEGIES:
        raise UserError(f"device map strategy {strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if max_memory is None:
        if strategy == "memory":
            raise UserError('strategy "memory" needs max_memory, e.g. {0: "20GiB", 1: "30GiB"}')
        return gpu_memory(num_devices)
    memory = {}
    for key, size in max_memory.items():
        if isinstance(key, bool) or not isinstance(key, int) or key < 0:
            raise UserError(f"max_memory keys are GPU indices (0, 1, ...), got {key!r}")
        try:
            memory[key] = convert_file_size_to_int(size)
        except ValueError:
            raise UserError(f"max_memory[{key}] = {size!r} is not a size (e.g. 20GiB, 500MB)") from None
    memory = dict(sorted(memory.items()))
    if num_devices is not None:
        if len(memory) < num_devices:
            raise UserError(f"num_devices={num_devices} but max_memory gives {len(memory)} GPUs")
        memory = dict(list(memory.items())[:num_devices])
    if not memory:
        raise UserError("max_memory names no GPU")
    return memory


# ----------------------------------------------------------------------------- the model
def _block_classes(model: nn.Module) -> list[str]:
    """Classes never split over two GPUs: the model's `_no_split_modules` (every transformers
    causal LM declares its decoder layer there), else the element class of its largest ModuleList."""
    declared = getattr(model, "_no_split_modules", None)
    if declared:
        return sorted(declared)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise UserError(f"{type(model).__name__} declares no _no_split_modules and has no list of layers to chain")
    largest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return sorted({type(m).__name__ for m in largest})


def _units(model: nn.Module, blocks: list[str]) -> list[str]:
    """The placement units in the order infer_auto_device_map meets them: a module of a block
    class or without children, or a parameter held directly by a module that has children
    (and, at the top level only, a buffer)."""
    units: list[str] = []

    def walk(prefix: str, module: nn.Module, top: bool) -> None:
        units.extend(f"{prefix}{name}" for name, _ in module.named_parameters(recurse=False))
        for name, child in module.named_children():
            if type(child).__name__ in blocks or not list(child.children()):
                units.append(f"{prefix}{name}")
            else:
                walk(f"{prefix}{name}.", child, False)
        if top:
            units.extend(f"{prefix}{name}" for name, _ in module.named_buffers(recurse=False))

    walk("", model, True)
    return units


def _embedding_names(model: nn.Module) -> tuple[str, str | None, bool]:
    """(input embedding's name, LM head's name or None, whether the two share their weight)."""
    names = {id(m): n for n, m in model.named_modules()}
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    return names[id(embedding)], names.get(id(head)) if head is not None else None, tied


def _entry(name: str, device_map: Mapping[str, object]) -> list[str]:
    """The device-map keys that cover the tensor or module `name` (a valid map has exactly one)."""
    return [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]


def device_bytes(model: nn.Module, device_map: Mapping[str, int], dtype: torch.dtype | None = None) -> dict[int, int]:
    """Bytes of parameters and buffers per device under `device_map` (tied weights counted once;
    floating-point tensors at `dtype`'s size when given)."""
    totals: dict[int, int] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        (key,) = _entry(name, device_map)
        size = torch.empty((), dtype=dtype).element_size() if dtype and tensor.is_floating_point() \
            else tensor.element_size()
        totals[device_map[key]] = totals.get(device_map[key], 0) + tensor.numel() * size
    return dict(sorted(totals.items()))


# ---------------------------------------------------------------------------- the budget
def _shares(need: float, weights: list[float], capacity: list[int]) -> list[float]:
    """`need` bytes split in proportion to `weights`, no device over its capacity (water-filling)."""
    shares = [0.0] * len(weights)
    open_ = set(range(len(weights)))
    while open_:
        total = sum(weights[i] for i in open_)
        tentative = {i: need * weights[i] / total for i in open_}
        full = [i for i in open_ if tentative[i] > capacity[i]]
        if not full:
            for i in open_:
                shares[i] = tentative[i]
            break
        for i in full:
            shares[i] = capacity[i]
            need -= capacity[i]
            open_.remove(i)
    return shares


def _plan(sizes: list[int], weights: list[float], capacity: list[int], reserved: list[int],
          fill: bool = False) -> list[int] | None:
    """Bytes per device when the units go in order, each device's boundary on the unit boundary
    nearest its share of what is left (shares re-cut after each device, so that a device pushed
    past its share by a large unit, an embedding say, takes it from the following devices
    rather than leaving the next one short). No device over its capacity less its reserve,
    none left empty while a unit fits it; `fill`: fill each device in turn. None: no fit."""
    limits = [c - r for c, r in zip(capacity, reserved)]
    total = sum(sizes)
    used = [0] * len(weights)
    device = placed = 0

    def boundary() -> float:  # where the current device should end, in bytes placed
        if fill:
            return float("inf")
        left = total - placed + sum(reserved[device:])
        return placed + _shares(left, weights[device:], capacity[device:])[0] - reserved[device]

    bound = boundary()
    for size in sizes:
        while device < len(weights) - 1 and (
                used[device] + size > limits[device] or (used[device] > 0 and placed + size / 2 > bound)):
            device += 1
            bound = boundary()
        if used[device] + size > limits[device]:
            return None
        used[device] += size
        placed += size
    return used


@contextlib.contextmanager
def _quiet_accelerate():
    # With made-up sizes on a machine without those GPUs (and for the placeholder -1) accelerate
    # warns "Device N is not available" once per GPU; the checks here say what matters.
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def build_device_map(model: nn.Module, num_devices: int | None = None, strategy: str = "balanced",
                     max_memory: Mapping[int, int | str] | None = None, *, dtype: torch.dtype | None = None,
                     lm_head_reserve: int | str | None = None) -> dict[str, int]:
    """A device map (module name -> GPU index) for a causal LM, which may sit on the meta device.

    strategy: "balanced" (equal bytes per GPU), "balanced_low_0" (GPU 0 gets LOW_0_WEIGHT of a
    share), "memory" (shares in proportion to `max_memory`). `max_memory` ({gpu: bytes or
    "20GiB"}) is each GPU's usable memory; None reads the visible GPUs' free memory (the first
    `num_devices`). `dtype`: size the floating-point weights at this dtype (default: as they
    are). `lm_head_reserve`: bytes kept free beside the LM head for its logits (default: the
    LM head weight's size). Raises UserError when the model does not fit."""
    from accelerate.utils import (
        check_tied_parameters_in_config,
        compute_module_sizes,
        convert_file_size_to_int,
        find_tied_parameters,
        infer_auto_device_map,
    )

    memory = _resolve_memory(strategy, max_memory, num_devices)
    gpus = list(memory)
    if check_tied_parameters_in_config(model) and not find_tied_parameters(model):
        model.tie_weights()  # a model built under init_empty_weights comes out untied (transformers 5.23)
    blocks = _block_classes(model)
    sizes = compute_module_sizes(model, dtype=dtype)
    embedding_name, head_name, tied = _embedding_names(model)

    head = model.get_output_embeddings()
    if lm_head_reserve is None:
        reserve = 0 if head is None else \
            head.weight.numel() * (torch.empty((), dtype=dtype or head.weight.dtype).element_size())
    else:
        reserve = convert_file_size_to_int(lm_head_reserve)
    head_gpu = gpus[0] if tied else gpus[-1]
    reserved = [reserve if gpu == head_gpu else 0 for gpu in gpus]
    capacity = [memory[gpu] for gpu in gpus]
    total = sizes[""]
    need = total + reserve

    def gib(n: float) -> str:
        return f"{n / GIB:.2f} GiB"

    if need > sum(capacity):
        raise UserError(f"the model does not fit: it needs {gib(need)} ({gib(total)} of weights + {gib(reserve)} kept "
                        f"free on GPU {head_gpu} for the LM head's logits) and the GPUs give {gib(sum(capacity))} ("
                        + ", ".join(f"{g}: {gib(memory[g])}" for g in gpus)
                        + "): add GPUs or memory, or load in a smaller dtype")
    short = [g for g, c, r in zip(gpus, capacity, reserved) if c <= r]
    if short:
        raise UserError(f"GPU {short[0]} has {gib(memory[short[0]])}, not more than the {gib(reserve)} kept free there "
                        "for the LM head's logits (lower lm_head_reserve or give it more memory)")

    if strategy == "memory":
        weights = [float(c) for c in capacity]
    else:
        weights = [LOW_0_WEIGHT if strategy == "balanced_low_0" and i == 0 else 1.0 for i in range(len(gpus))]
    limits = [c - r for c, r in zip(capacity, reserved)]
    unit_sizes = [sizes[u] for u in _units(model, blocks)]
    planned = _plan(unit_sizes, weights, capacity, reserved)
    if planned is None:  # the rounding to whole layers overflowed a full GPU: fill each GPU in turn
        planned = _plan(unit_sizes, weights, capacity, reserved, fill=True)
        if planned is None:
            raise UserError(f"the model ({gib(total)}) does not fit in whole layers (largest "
                            f"{gib(max(unit_sizes))}) into " + ", ".join(f"GPU {g}: {gib(m)}" for g, m in zip(gpus, limits))
                            + " (after the LM head's reserve): add GPUs or memory")
        logger.warning("%s: the GPUs are too full to balance; each is filled in turn", strategy)

    budget = {-1: 0}  # the placeholder that takes accelerate's CPU-offload reserve, see the module docstring
    budget.update({gpu: planned[i] for i, gpu in enumerate(gpus[:-1])})
    budget[gpus[-1]] = limits[-1]
    with _quiet_accelerate():
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=blocks, dtype=dtype)
    device_map = dict(device_map)  # accelerate returns an OrderedDict
    _check(model, device_map, blocks, gpus, limits, dtype, embedding_name, head_name if tied else None)
    return device_map


def _check(model: nn.Module, device_map: dict, blocks: list[str], gpus: list[int], limits: list[int],
           dtype: torch.dtype | None, embedding_name: str, tied_head: str | None) -> None:
    stray = sorted({str(d) for d in device_map.values() if d not in gpus})
    if stray:
        raise UserError(f"the model does not fit the GPUs given ({', '.join(map(str, gpus))}): accelerate put part "
                        f"of it on {', '.join(stray)}")
    for name in itertools.chain((n for n, _ in model.named_parameters(remove_duplicate=False)),
                                (n for n, _ in model.named_buffers())):
        if len(_entry(name, device_map)) != 1:
            raise RuntimeError(f"device map covers {name} {len(_entry(name, device_map))} times")
    block_names = [n for n, m in model.named_modules() if type(m).__name__ in blocks]
    split = [k for k in device_map for b in block_names if k.startswith(b + ".")]
    if split:
        raise RuntimeError(f"device map splits a layer: {split[0]}")
    position = {n: i for i, (n, _) in enumerate(model.named_modules())}
    tensor_names = [n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())]

    def order(key: str) -> float:  # a parameter key sorts right after its module
        return position[key] if key in position else position[key.rpartition(".")[0]] + 0.5

    # along the model: modules with tensors (a Dropout may sit anywhere), the tied LM head aside
    along = [device_map[k] for k in sorted(device_map, key=order)
             if k != tied_head and any(len(_entry(n, {k: 0})) for n in tensor_names)]
    if along != sorted(along):
        raise RuntimeError(f"device map goes back to an earlier GPU along the model: {along}")
    (first,) = _entry(embedding_name, device_map)
    if device_map[first] != min(device_map.values()):
        raise RuntimeError(f"the input embedding is on GPU {device_map[first]}, not on the chain's first GPU")
    used = device_bytes(model, device_map, dtype)
    for gpu, limit in zip(gpus, limits):
        if used.get(gpu, 0) > limit:
            raise UserError(f"GPU {gpu} would hold {used[gpu] / GIB:.2f} GiB, over its {limit / GIB:.2f} GiB")
    empty = [g for g in gpus if g not in used]
    if empty:
        logger.warning("nothing placed on GPU %s: the model is too small to chain over %d GPUs",
                       ", ".join(map(str, empty)), len(gpus))


def describe(model: nn.Module, device_map: Mapping[str, int], dtype: torch.dtype | None = None) -> str:
    """One line per GPU: its bytes, its decoder layers and the other modules on it."""
    blocks = _block_classes(model)
    block_names = {n for n, m in model.named_modules() if type(m).__name__ in blocks}
    used = device_bytes(model, device_map, dtype)
    lines = []
    for gpu, size in used.items():
        keys = [k for k, d in device_map.items() if d == gpu]
        layers = sum(1 for b in block_names if _entry(b, {k: 0 for k in keys}))
        others = [k for k in keys if k not in block_names and not any(b.startswith(k + ".") for b in block_names)]
        lines.append(f"GPU {gpu}: {size / GIB:.2f} GiB, {layers} layers" + (f" + {', '.join(others)}" if others else ""))
    return "\n".join(lines)


# ------------------------------------------------------------------------- load / dispatch
def input_device(model: nn.Module) -> torch.device:
    """Where the inputs (and labels) of a chained model go: its input embedding's device."""
    return model.get_input_embeddings().weight.device


def meta_model(model_name_or_path: str, dtype: torch.dtype | None = None, trust_remote_code: bool = False):
    """The model of a checkpoint's config with weights on the meta device (no memory, no reading)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def load_chained(model_name_or_path: str, device_map: str, dtype: torch.dtype | None = None, *,
                 lm_head_reserve: int | str | None = None, **from_pretrained_kwargs):
    """from_pretrained with the layers chained over the visible GPUs as `device_map` (a
    parse_device_map string) says; the map is computed on a meta copy first."""
    from transformers import AutoModelForCausalLM

    strategy, max_memory = parse_device_map(device_map)
    require_gpus(max_memory)
    meta = meta_model(model_name_or_path, dtype, from_pretrained_kwargs.get("trust_remote_code", False))
    mapping = build_device_map(meta, strategy=strategy, max_memory=max_memory, lm_head_reserve=lm_head_reserve)
    logger.info("chaining %s over %d GPUs (%s):\n%s", model_name_or_path, len(set(mapping.values())), device_map,
                describe(meta, mapping))
    return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype, device_map=mapping,
                                                **from_pretrained_kwargs)


def dispatch(model: nn.Module, device_map: str = "balanced", *, lm_head_reserve: int | str | None = None):
    """Chain a model already built (e.g. from a config, on the CPU) over the visible GPUs."""
    from accelerate import dispatch_model

    strategy, max_memory = parse_device_map(device_map)
    require_gpus(max_memory)
    mapping = build_device_map(model, strategy=strategy, max_memory=max_memory, lm_head_reserve=lm_head_reserve)
    logger.info("chaining the model over %d GPUs (%s):\n%s", len(set(mapping.values())), device_map,
                describe(model, mapping))
    return dispatch_model(model, device_map=mapping, main_device=min(mapping.values()),
                          skip_keys=getattr(model, "_skip_keys_device_placement", None))


def align_adapter_inputs(model: nn.Module) -> int:
    """After PEFT wrapped a chained model's modules: a wrapper whose inner module has its own
    device hook gets a hook moving its inputs to that GPU too (see the module docstring).
    Returns how many wrappers got one."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    count = 0
    for module in model.modules():
        inner = getattr(module, "base_layer", None)
        device = getattr(getattr(inner, "_hf_hook", None), "execution_device", None)
        if device is not None and not hasattr(module, "_hf_hook"):
            add_hook_to_module(module, AlignDevicesHook(execution_device=device))
            count += 1
    return count
