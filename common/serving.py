"""Serve any local causal LM: streamed generation, an OpenAI-compatible HTTP API and a
gradio chat UI. Every generative recipe's `serve.py` and `chatbot.py` are thin callers.

    python chinese_gpt2/serve.py --model outputs/chinese_gpt2           # http://127.0.0.1:8000/v1
    python chinese_gpt2/chatbot.py --model outputs/chinese_gpt2         # http://127.0.0.1:7860

The pieces, from the bottom up:
- `load_causal_lm`: model + tokenizer from a local directory (never downloads).
- `Batcher` (one per Engine, a background thread): decodes every running request together,
  one token each per step (continuous batching over a static `SlotCache`; on CUDA the step
  runs as CUDA graphs and greedy steps are pipelined). A request joins the running batch
  as soon as its prompt fits before the batch's current slot. Works for any model whose
  attention writes through the transformers Cache interface and takes position_ids
  (Llama, Qwen2, Mistral, GLM, GPT-2, ...; not BLOOM's ALiBi).
- `Engine.stream`: one generation, read as text deltas (`for`, or `async for` over
  `.deltas()` in an event loop); stop strings, a WordPiece-aware detokenizer, and
  cancellation (a client that goes away stops its generation at the next token).
- `create_app`: FastAPI app with `POST /v1/completions`, `POST /v1/chat/completions`
  (`stream: true` gives server-sent events in OpenAI's chunk format, ending with
  `data: [DONE]`), `GET /v1/models`, `GET /health`. Requests are validated (4xx with an
  OpenAI-style error body); at most `max_concurrent` generations run (decoded together) with
  at most `max_waiting` queued; beyond that the answer is 429, and a request that waited
  longer than `queue_timeout` gets 503. Nothing hangs.
- `build_chat_ui`: gradio chat with streaming, history, sampling sliders and a stop button.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import logging
import os
import queue
import random
import sys
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.errors import UserError
from common.templates import (
    JinjaTemplate,
    check_messages,
    encode_chat,
    get_template,
    registry_entry_of,
    saved_template_name,
    stop_criteria,
)
from common.tokenizer import display_cleaner

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported
logger = logging.getLogger(__name__)


# ------------------------------------------------------------------------ loading
def adapter_base(adapter_dir: str | Path, base_model: str | Path | None = None) -> Path | None:
    """The base model of a LoRA adapter directory (`base_model`, else the one the adapter
    names); None when `adapter_dir` holds no adapter."""
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        return None
    base = Path(base_model or json.loads(config.read_text())["base_model_name_or_path"])
    if not (base / "config.json").is_file():
        raise UserError(f"{adapter_dir} is a LoRA adapter of {base}, which is not a local model: "
                        "give its base with --base_model")
    return base


def adapter_finetuning_type(adapter_dir: str | Path) -> str | None:
    """finetuning_type (lora / qlora) of the run that wrote an adapter: its metrics.json, or that
    of the run a checkpoint-N folder belongs to; None when unknown."""
    for folder in (Path(adapter_dir), Path(adapter_dir).parent):
        if (folder / "metrics.json").is_file():
            return json.loads((folder / "metrics.json").read_text(encoding="utf-8")).get("finetuning_type")
    return None


def load_adapter(adapter_dir: str | Path, base: Path, tokenizer, dtype: torch.dtype, **load_kwargs):
    """A PeftModel: `base` (embeddings grown to the tokenizer when training added markers)
    with the adapter of `adapter_dir` over it, unmerged. `load_kwargs` go to the base's
    from_pretrained (merge.py: the NF4 quantisation a QLoRA adapter was trained over)."""
    from peft import PeftModel

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, trust_remote_code=False, **load_kwargs)
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return PeftModel.from_pretrained(model, adapter_dir)


def load_causal_lm(model_dir: str | Path, device: str | None = None, dtype: str = "auto",
                   base_model: str | Path | None = None):
    """A local causal LM and its tokenizer, in eval mode on `device` (default: cuda if
    present). dtype "auto" is bfloat16 on a GPU that supports it, float32 elsewhere.

    A LoRA adapter directory (adapter_config.json) is loaded over its base model (the one
    recorded in the adapter, or `base_model`) and merged into it: generation then costs
    what the base model's does."""
    model_dir = Path(model_dir)
    base = adapter_base(model_dir, base_model)
    if base is None and not (model_dir / "config.json").is_file():
        raise UserError(f"no model in {model_dir} (no config.json): train one first or give --model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        # SDPA's cuDNN backend builds an execution plan for every new key length and caches
        # it per thread: token-by-token decoding (a new length each step, a new thread per
        # request) then spent ~50 ms per token on plan building (H100: 13 vs 125 tokens/s).
        # The flash / memory-efficient kernels need no plans.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    if base is not None:
        if adapter_finetuning_type(model_dir) == "qlora":
            logger.warning("%s is a QLoRA adapter, served here over the unquantised base (not the NF4 weights it "
                           "was trained over): merge it first (chatglm_lora/merge.py) to serve the trained model",
                           model_dir)
        model = load_adapter(model_dir, base, tokenizer, getattr(torch, dtype)).merge_and_unload()
        logger.info("loaded the adapter %s over %s and merged it", model_dir, base)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), trust_remote_code=False)
    model.config.use_cache = True  # a checkpoint saved by training may carry use_cache=False
    return model.to(device).eval(), tokenizer


def context_length(model) -> int:
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"cannot tell the context length of {type(model).__name__}")


# --------------------------------------------------------------------- generation
DEFAULT_CACHE_LEN = 4096  # tokens per request held in the KV cache unless max_cache_len says otherwise
PREFILL_TOKENS = 16384  # prompts that join together are prefilled in one forward up to this many (padded) tokens


@dataclass
class SamplingParams:
    """One request's decoding settings. temperature 0 means greedy."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def check(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError("max_tokens must be at least 1")
        if not 0 <= self.temperature <= 2:
            raise UserError("temperature must be in [0, 2]")
        if not 0 < self.top_p <= 1:
            raise UserError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise UserError("top_k must be >= 0 (0 = off)")
        if not 0 < self.repetition_penalty <= 10:
            raise UserError("repetition_penalty must be in (0, 10]")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def plain_greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1


class SlotCache:
    """Key/value cache of `rows` generations decoded together, `length` slots per row.

    The model writes into it through `update`, the transformers Cache call its attention
    layers make. All rows advance in lock step: a decode step writes every row's new token at
    slot `position`. A request joining a running batch is prefilled into its row at the slots
    just before `position`, so its positions (always passed as position_ids) differ from its
    slots; the attention mask, built from each row's first slot, hides every other slot.
    Attention reads only the first `span` slots, a bucket of the length in use, so a step
    costs what the conversations' length costs, not what the whole cache would.
    """

    is_compileable = True

    def __init__(self, rows: int, length: int, device: torch.device):
        self.rows, self.length = rows, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.span = length
        self.prefill_at: tuple[torch.Tensor, int] | None = None  # (rows, first slot) while prompts are written

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # first write: the layer's own head count, head size and dtype
            for store, states in ((self.keys, key_states), (self.values, value_states)):
                shape = (self.rows, states.shape[1], self.length, states.shape[3])
                store.append(torch.zeros(shape, dtype=states.dtype, device=states.device))
                torch._dynamo.mark_static_address(store[-1])  # updated in place under CUDA graphs
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_at is None:
            keys.index_copy_(2, self.position, key_states)
            values.index_copy_(2, self.position, value_states)
            return keys[:, :, :self.span], values[:, :, :self.span]
        rows, first = self.prefill_at
        end = first + key_states.shape[2]
        keys[rows, :, first:end] = key_states
        values[rows, :, first:end] = value_states
        return keys[rows, :, :self.span], values[rows, :, :self.span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never needed: positions and the mask are always given

    def move_rows(self, target: SlotCache, rows: list[int], used: int) -> None:
        """Copy the first `used` slots of `rows` into rows 0, 1, ... of `target`."""
        for store, target_store in ((self.keys, target.keys), (self.values, target.values)):
            for layer, tensor in enumerate(store):
                target_store[layer][:len(rows), :, :used] = tensor[rows, :, :used]


def span_bucket(used: int, length: int) -> int:
    """Slots attention reads: 256, 512, 1024, ... (few shapes to compile), at most the cache."""
    span = 256
    while span < used:
        span *= 2
    return min(span, length)


@dataclass(eq=False)
class _Generation:
    """One request inside the batcher; its stream reads `queue`."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    deliver: Callable[[object], None]  # hands token lists, an error, then _END to the stream (any thread)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)  # prompt + generated: the repetition penalty's history
    first_slot: int = 0
    length: int = 0  # tokens in the cache (prompt + fed generated tokens)
    fed: int = 0  # decode steps launched for it
    generated: int = 0

    def finish(self, error: Exception | None = None) -> None:
        if not self.done.is_set():
            if error is not None:
                self.deliver(error)
            self.deliver(_END)
            self.done.set()


_END = object()


@dataclass(eq=False)
class _Step:
    """A launched decode step: which generation each row fed, and its results."""

    rows: list[_Generation | None]
    logits: torch.Tensor | None  # kept when some row samples
    next_ids: torch.Tensor | None  # the greedy tokens on the device, to feed the next step
    greedy: torch.Tensor  # the greedy tokens on the host, once `ready`
    ready: torch.cuda.Event | None = None


def _logit_processors(params: SamplingParams) -> list:
    """transformers' own processors, in generate's order: penalty, temperature, top-k, top-p."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = []
    if params.repetition_penalty != 1:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


class Batcher:
    """Decodes every running request of an Engine together, one token per request per step,
    in a background thread (continuous batching: a request joins the running batch as soon as
    its prompt fits before the current slot, else when the batch has drained; FIFO, so no
    request is passed over).

    Rows live in a SlotCache of 1 row while one request runs (the fastest shape for a single
    user) and of `max_batch` rows when more do; rows move between the two when the count
    changes. On CUDA the decode step is compiled with CUDA graphs (torch.compile
    "reduce-overhead"): a 7B model's step launches hundreds of small kernels, and launching
    them from Python costs more than the step itself. Prompts that arrive together are
    prefilled in one padded forward, not compiled (their lengths vary; they are compute-bound).
    """

    def __init__(self, model, stop_token_ids: list[int], max_batch: int, cache_length: int,
                 compile_decode: bool, on_tokens=None):
        self.model = model
        self.device = model.device
        self.stop_token_ids = set(stop_token_ids)
        self.max_batch = max_batch
        self.cache_length = cache_length
        self.on_tokens = on_tokens or (lambda n: None)
        self.widths = sorted({1, max_batch})
        forward = inspect.signature(model.forward).parameters
        if "position_ids" not in forward:  # rows' positions differ from their cache slots
            raise UserError(f"{type(model).__name__} takes no position_ids (ALiBi models such as BLOOM): "
                            "the batching engine cannot serve it")
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        try:
            self.caches = {w: SlotCache(w, cache_length, self.device) for w in self.widths}
            for cache in self.caches.values():  # allocate the cache now: a too-large one fails here
                self._prefill(cache, [0], [[0]], 1)
        except torch.OutOfMemoryError:
            raise UserError(f"no room on {self.device} for the KV cache of {max_batch} requests x {cache_length} "
                            "tokens: lower --max_concurrent or --max_cache_len") from None
        dtype = next(model.parameters()).dtype
        step = partial(_decode_step, model, dtype)
        if compile_decode:
            # Tuning the generated kernels' launch parameters: a 7B step at batch 1 on an H100 took
            # 5.9 instead of 6.3 ms (benchmarks/RESULTS.md), for a longer first compile.
            from torch._inductor import config as inductor_config

            inductor_config.coordinate_descent_tuning = True
            # one compiled function per cache: each sees one set of cache tensors (no guard churn)
            self.decode = {w: torch.compile(step, mode="reduce-overhead") for w in self.widths}
        else:
            self.decode = dict.fromkeys(self.widths, step)
        self.compiled = compile_decode
        self.width = 1
        self.rows: list[_Generation | None] = [None]
        self.position = 0  # the slot the next decode step writes
        self.in_flight: _Step | None = None  # a launched step whose tokens are not handed out yet
        self.waiting: deque[_Generation] = deque()
        self.condition = threading.Condition()
        self.closed = False
        # Python hands the GIL to a waiting thread every 5 ms by default: with streams' readers
        # and the HTTP server busy, the batcher would wait that long for it after every step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
        self.thread.start()

    # ------------------------------------------------------------ the public side
    def submit(self, prompt_ids: list[int], params: SamplingParams, deliver: Callable[[object], None]) -> _Generation:
        generator = torch.Generator(self.device)
        generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        generation = _Generation(list(prompt_ids), params, generator, deliver)
        with self.condition:
            if self.closed:
                raise UserError("the engine is closed")
            self.waiting.append(generation)
            self.condition.notify()
        return generation

    def wake(self) -> None:
        with self.condition:
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()

    # ------------------------------------------------------------- the loop
    @torch.inference_mode()
    def _run(self) -> None:
        if self.compiled:
            _cudagraph_state_for_this_thread()
        while True:
            with self.condition:
                while not self.closed and not self.waiting and not any(self.rows):
                    self.condition.wait()  # (nothing is in flight: it belongs to a row)
                if self.closed:
                    for generation in [*self.waiting, *filter(None, self.rows)]:
                        generation.finish(UserError("the engine was closed"))
                    return
                joining = self._take_joining()
            try:
                self._admit(joining)
                if any(self.rows):
                    self._step()
            except Exception as err:  # handed to every reader, which raises it in its request
                logger.exception("generation failed")
                for generation in [*joining, *filter(None, self.rows)]:
                    generation.finish(err)
                self.rows = [None] * self.width
                self.in_flight = None

    def _take_joining(self) -> list[_Generation]:
        """Requests from the head of the queue that can start now (the caller holds the lock)."""
        active = [g for g in self.rows if g is not None]
        joining: list[_Generation] = []
        while self.waiting and len(active) + len(joining) < self.max_batch:
            head = self.waiting[0]
            if head.cancelled.is_set():
                self.waiting.popleft().finish()
                continue
            if active:  # the running batch's slots before `position` must hold the prompt
                fits = len(head.prompt_ids) <= self.position and \
                    self.position + head.params.max_new_tokens <= self.cache_length
            else:  # a new batch: every prompt ends at the longest one's end
                start = max(len(g.prompt_ids) for g in [*joining, head])
                fits = all(start + g.params.max_new_tokens <= self.cache_length for g in [*joining, head])
            if not fits:
                break
            joining.append(self.waiting.popleft())
        return joining

    def _admit(self, joining: list[_Generation]) -> None:
        active = [g for g in self.rows if g is not None]
        if joining or any(g.cancelled.is_set() for g in active) or \
                self.width != next(w for w in self.widths if w >= len(active)):
            self._collect_in_flight()  # rows are about to change: settle the step they were fed to
        for row, generation in enumerate(self.rows):
            if generation is not None and generation.cancelled.is_set():
                generation.finish()
                self.rows[row] = None
        active = [g for g in self.rows if g is not None]
        if not active and joining:
            self.position = max(len(g.prompt_ids) for g in joining)
        self._resize(len(active) + len(joining))
        group: list[tuple[int, _Generation]] = []
        for generation in joining:
            row = self.rows.index(None)
            generation.first_slot = self.position - len(generation.prompt_ids)
            generation.length = len(generation.prompt_ids)
            generation.ids = list(generation.prompt_ids)
            self.rows[row] = generation
            longest = max(len(g.prompt_ids) for _, g in [*group, (row, generation)])
            if group and longest * (len(group) + 1) > PREFILL_TOKENS:
                self._prefill_group(group)
                group = []
            group.append((row, generation))
        if group:
            self._prefill_group(group)

    def _prefill_group(self, group: list[tuple[int, _Generation]]) -> None:
        logits = self._prefill(self.caches[self.width], [row for row, _ in group],
                               [g.prompt_ids for _, g in group], self.position)
        for i, (row, generation) in enumerate(group):
            self._emit(row, self._choose(generation, logits[i], None))

    def _resize(self, needed: int) -> None:
        """Use the smallest cache that holds `needed` rows, moving the running rows into it."""
        width = next(w for w in self.widths if w >= needed)
        if width == self.width:
            return
        rows = [r for r, g in enumerate(self.rows) if g is not None]
        self.caches[self.width].move_rows(self.caches[width], rows, self.position)
        self.rows = [self.rows[r] for r in rows] + [None] * (width - len(rows))
        self.width = width

    @torch.inference_mode()
    def _prefill(self, cache: SlotCache, rows: list[int], prompts: list[list[int]], end: int) -> torch.Tensor:
        """Write the prompts' keys/values into their rows, each ending at slot `end`, in one
        forward (shorter prompts padded on the left), and return the logits of each last
        position."""
        n = max(map(len, prompts))
        pads = torch.tensor([n - len(p) for p in prompts], device=self.device)[:, None]
        columns = torch.arange(n, device=self.device)[None]
        first_slot = end - n
        cache.span = span_bucket(end, cache.length)
        slots = torch.arange(cache.span, device=self.device)
        column_slots = first_slot + columns[..., None]  # [1, n, 1]: the slot each column writes
        # a prompt token sees its prompt up to itself; a padding column sees only its own slot
        visible = (slots <= column_slots) & (slots >= first_slot + pads[..., None])
        visible |= (slots == column_slots) & (columns < pads)[..., None]
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill_(~visible, torch.finfo(dtype).min)
        input_ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=self.device)
        cache.prefill_at = (torch.tensor(rows, device=self.device), first_slot)
        try:
            out = self.model(input_ids=input_ids, position_ids=(columns - pads).clamp(min=0),
                             attention_mask=mask[:, None], past_key_values=cache, use_cache=True, **self.keep_last)
        finally:
            cache.prefill_at = None
        return out.logits[:, -1]

    def _step(self) -> None:
        """Launch one decode step; collect the previous one while the GPU runs this one.

        While every row decodes greedily the step's tokens stay on the device and feed the
        next step directly, so the host reads step k's tokens (and streams them) while step
        k+1 runs: the GPU never waits for Python. A row that stops at step k (end of text)
        has had one token too many computed in step k+1, which is dropped. Rows that sample
        need their logits on the host, so then each step is collected before the next."""
        previous = self.in_flight
        rows = [g if g is not None and g.fed + 1 < g.params.max_new_tokens else None for g in self.rows]
        if not any(rows):  # the running rows wait only for their last tokens
            self._collect_in_flight()
            return
        pipelined = all(g.params.plain_greedy for g in rows if g is not None)
        on_device = [previous is not None and g is not None and previous.rows[r] is g for r, g in enumerate(rows)]
        cache = self.caches[self.width]
        # one host-to-device copy for the step's inputs: token (unless the device has it), position,
        # first visible slot (an empty row sees only its own slot: attention over nothing gives NaN)
        # (from pinned memory, asynchronously: a plain copy would wait for the step in flight)
        inputs = torch.tensor([[g.ids[-1] if g is not None and not dev else 0 for g, dev in zip(rows, on_device)],
                               [g.length if g is not None else 0 for g in rows],
                               [g.first_slot if g is not None else self.position for g in rows],
                               on_device], pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        input_ids = inputs[0] if not any(on_device) else torch.where(inputs[3].bool(), previous.next_ids, inputs[0])
        cache.position.fill_(self.position)
        cache.span = span_bucket(self.position + 1, cache.length)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        logits, greedy = self.decode[self.width](cache, input_ids[:, None], inputs[1, :, None], inputs[2])
        step = _Step(rows, None if pipelined else logits, greedy.clone() if pipelined else None,
                     torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=self.device.type == "cuda"))
        step.greedy.copy_(greedy, non_blocking=True)
        if self.device.type == "cuda":
            step.ready = torch.cuda.Event()
            step.ready.record()
        self.position += 1
        for generation in rows:
            if generation is not None:
                generation.length += 1
                generation.fed += 1
        self.in_flight = None
        if previous is not None:
            self._collect(previous)
        if pipelined:
            self.in_flight = step
        else:
            self._collect(step)

    def _collect_in_flight(self) -> None:
        if self.in_flight is not None:
            step, self.in_flight = self.in_flight, None
            self._collect(step)

    def _collect(self, step: _Step) -> None:
        """Hand a finished step's tokens to its rows' streams."""
        if step.ready is not None:
            step.ready.synchronize()  # without holding the GIL: readers and the server run meanwhile
        greedy = step.greedy.tolist()
        for row, generation in enumerate(step.rows):
            if generation is not None and self.rows[row] is generation:  # not finished since
                logits = None if step.logits is None else step.logits[row]
                self._emit(row, self._choose(generation, logits, greedy[row]))

    def _choose(self, generation: _Generation, logits: torch.Tensor | None, greedy: int | None) -> int:
        params = generation.params
        if params.plain_greedy and greedy is not None:
            return greedy
        scores = logits[None].float()
        history = torch.tensor([generation.ids], device=self.device)
        for processor in _logit_processors(params):
            scores = processor(history, scores)
        if params.temperature == 0:
            return int(scores.argmax())
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs[0], 1, generator=generation.generator))

    def _emit(self, row: int, token: int) -> None:
        generation = self.rows[row]
        generation.ids.append(token)
        generation.generated += 1
        generation.deliver([token])
        self.on_tokens(1)
        stopped = token in self.stop_token_ids and not generation.params.ignore_eos
        if stopped or generation.generated >= generation.params.max_new_tokens or generation.cancelled.is_set():
            generation.finish()
            self.rows[row] = None


def _cudagraph_state_for_this_thread() -> None:
    """torch.compile's CUDA-graph trees keep their state in thread-local storage, set up in the
    thread that imported them: when that was another thread (a `generate` with a static cache
    in the main thread, say), replaying graphs here would fail an assertion."""
    from torch._inductor import cudagraph_trees

    local = cudagraph_trees.local
    if not hasattr(local, "tree_manager_containers"):  # what the module does for its importing thread
        local.tree_manager_containers = {}
        local.tree_manager_locks = defaultdict(threading.Lock)
        torch._C._stash_obj_in_tls("tree_manager_containers", local.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", local.tree_manager_locks)


def _decode_step(model, dtype: torch.dtype, cache: SlotCache, input_ids, position_ids, first_slot):
    """One token for every row: logits and their argmax. The mask lets row r see slots
    first_slot[r] .. position (its prompt and what it generated)."""
    slots = torch.arange(cache.span, device=input_ids.device)
    visible = (slots >= first_slot[:, None]) & (slots <= cache.position)
    mask = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device).masked_fill_(~visible, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask[:, None, None, :],
                   past_key_values=cache, use_cache=True).logits[:, -1]
    return logits, logits.argmax(-1)


class GenerationStream:
    """Text deltas of one generation, which the engine's Batcher runs: iterate it (`for`, in
    a thread that may block) or, in an event loop, `async for` over `stream.deltas()` (what
    the server does: no thread per request, the batcher hands tokens to the loop directly).

    After iteration: `finish_reason` ("stop": end of text or a stop string; "length":
    max_new_tokens reached), `completion_tokens`, `token_ids`. `cancel()` (or leaving the
    loop early) stops the generation at its next token; `close()` also waits for that.
    """

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams,
                 loop: asyncio.AbstractEventLoop | None = None):
        self.engine = engine
        self.params = params
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self._ids: list[int] = []
        self._emitted = ""
        self._ended = False
        if loop is None:
            self._queue: queue.Queue | asyncio.Queue = queue.Queue()
            deliver = self._queue.put
        else:
            self._queue = asyncio.Queue()

            def deliver(item, put=self._queue.put_nowait):
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                    loop.call_soon_threadsafe(put, item)
        self._generation = engine.batcher.submit(prompt_ids, params, deliver)

    def cancel(self) -> None:
        self._generation.cancelled.set()
        self.engine.batcher.wake()

    def close(self) -> None:
        """Cancel and wait until the batcher has let the generation go."""
        self.cancel()
        self._generation.done.wait()

    @property
    def token_ids(self) -> list[int]:
        return self._generation.ids[self.prompt_tokens:]

    def __iter__(self) -> Iterator[str]:
        try:
            while not self._ended:
                items = [self._queue.get()]
                while not self._queue.empty():  # a busy reader takes what piled up at once
                    items.append(self._queue.get_nowait())
                yield from self._text(items)
        finally:
            self.cancel()

    async def deltas(self):
        try:
            while not self._ended:
                items = [await self._queue.get()]
                while not self._queue.empty():
                    items.append(self._queue.get_nowait())
                for delta in self._text(items):
                    yield delta
        finally:
            self.cancel()

    def _text(self, items: list) -> Iterator[str]:
        """The text deltas that newly arrived tokens add: stop strings cut, a tail that may
        begin a stop string or ends in half a character held back."""
        for item in items:
            if isinstance(item, Exception):
                raise item
        new = [token for item in items if item is not _END for token in item]
        stop = self.params.stop
        if new:
            ids, emitted = self._ids, self._emitted
            ids.extend(new)
            self.completion_tokens = len(ids)
            text = self.engine.clean(self.engine.tokenizer.decode(ids, skip_special_tokens=True))
            # half a multi-byte character, or a decode still settling: wait for more
            if not text.endswith("\ufffd") and text.startswith(emitted):
                cut = _find_stop(text, stop, start=max(0, len(emitted) - max(map(len, stop), default=0)))
                if cut is not None:
                    self.finish_reason, self._ended = "stop", True
                    self.cancel()
                    if cut > len(emitted):
                        yield text[len(emitted):cut]
                    return
                safe = len(text) - _partial_stop_length(text, stop)
                if safe > len(emitted):
                    yield text[len(emitted):safe]
                    self._emitted = text[:safe]
        if items[-1] is _END:
            self._ended = True
            ids = self._ids
            ended_by_eos = bool(ids) and ids[-1] in self.engine.stop_token_ids and not self.params.ignore_eos
            self.finish_reason = "stop" if ended_by_eos else "length"
            if ids:
                text = self.engine.clean(self.engine.tokenizer.decode(ids, skip_special_tokens=True))
                if text.startswith(self._emitted) and len(text) > len(self._emitted):
                    yield text[len(self._emitted):]


def _find_stop(text: str, stop: tuple[str, ...], start: int) -> int | None:
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _partial_stop_length(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest tail of `text` that begins a stop string: held back until
    the next tokens show whether the stop string follows."""
    best = 0
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Engine:
    """A model, its tokenizer and how to prompt it.

    `template` names an entry of common/templates.py; without one, the entry a tuned model's
    chat_template was generated from, else the tokenizer's own Jinja chat template, else
    "plain". Registry templates build prompts with `encode_chat`, the code training uses, so a
    tuned model is prompted token for token as it was trained; their stop markers that are
    single tokens end generation by id. With the tokenizer's own template, the special tokens
    it writes after a reply and generation_config.json's eos ids end generation.
    """

    def __init__(self, model, tokenizer, name: str, template: str | None = None, max_batch: int = 8,
                 max_cache_len: int | None = None, compile: bool | None = None):
        """`max_batch`: requests decoded together (more wait in the batcher's queue).
        `max_cache_len`: tokens (prompt + reply) a request may span, the KV cache's length;
        default the model's context, at most DEFAULT_CACHE_LEN. `compile`: CUDA graphs for
        the decode step; default on CUDA."""
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        if template in ("auto", "official"):  # the training recipes' words for "the model's own"
            template = None
        entry = registry_entry_of(getattr(tokenizer, "chat_template", None)) if template is None else None
        own = template is None and entry is None and bool(getattr(tokenizer, "chat_template", None))
        self.template = None if own else entry or get_template(template or "plain")
        stops_of = self.template
        if own:
            try:
                stops_of = JinjaTemplate(tokenizer)
            except UserError:  # a template we could not train on still renders prompts; eos ends them
                stops_of = None
        self.stop_token_ids, self.template_stops = stop_criteria(tokenizer, stops_of)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids + ([eos] if isinstance(eos, int) else
                                                                        list(eos or []))))
        if max_batch < 1 or (max_cache_len is not None and max_cache_len < 2):
            raise UserError("need max_batch >= 1 and max_cache_len >= 2")
        self.context_length = min(context_length(model), max_cache_len or DEFAULT_CACHE_LEN)
        self.clean = display_cleaner(tokenizer)
        self.max_batch = max_batch
        self.compile = model.device.type == "cuda" if compile is None else compile
        self.tokens_generated = 0  # by every generation since start, cancelled ones too
        self._batcher: Batcher | None = None
        self._lock = threading.Lock()

    def count_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_generated += n

    @property
    def batcher(self) -> Batcher:
        """Started at the first generation (it allocates the KV cache)."""
        with self._lock:
            if self._batcher is None:
                self._batcher = Batcher(self.model, self.stop_token_ids, self.max_batch, self.context_length,
                                        self.compile, self.count_tokens)
            return self._batcher

    def close(self) -> None:
        """Stop the batcher thread (running generations end with an error)."""
        if self._batcher is not None:
            self._batcher.close()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, name: str | None = None, template: str | None = None,
                        device: str | None = None, dtype: str = "auto", base_model: str | None = None,
                        **engine_options) -> Engine:
        """`template` default: the one the model was tuned with (its chat template, or an older
        output's sft_template.json), if any.
        `engine_options`: max_batch, max_cache_len, compile (see __init__)."""
        model, tokenizer = load_causal_lm(model_dir, device, dtype, base_model)
        return cls(model, tokenizer, name or Path(model_dir).resolve().name, template or saved_template_name(model_dir),
                   **engine_options)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> tuple[list[int], tuple[str, ...]]:
        """Prompt ids of a conversation (ending with a user turn) and the template's text stops."""
        if self.template is None:
            check_messages(messages)
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.encode(prompt), ()
        return encode_chat(self.tokenizer, self.template, messages, add_generation_prompt=True).input_ids, \
            self.template_stops

    def room(self, prompt_ids: list[int]) -> int:
        """How many tokens may still be generated after this prompt."""
        return self.context_length - len(prompt_ids)

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               loop: asyncio.AbstractEventLoop | None = None) -> GenerationStream:
        """A generation of `prompt_ids`; `loop`: read it with `async for` in that event loop."""
        params.check()
        if not prompt_ids:
            raise UserError("the prompt is empty")
        if params.max_new_tokens > self.room(prompt_ids):
            raise UserError(
                f"the prompt has {len(prompt_ids)} tokens and max_tokens is {params.max_new_tokens}: "
                f"together over the {self.context_length} tokens a request may span "
                "(the model's context, or the server's --max_cache_len)"
            )
        return GenerationStream(self, prompt_ids, params, loop)

    def complete(self, prompt: str, params: SamplingParams) -> str:
        return "".join(self.stream(self.encode(prompt), params))


# ------------------------------------------------------------------- HTTP server
@dataclass
class ServerSettings:
    max_concurrent: int = 8  # generations decoded together in one batch (the engine's max_batch)
    max_waiting: int = 8  # queued requests beyond those; more get 429
    queue_timeout: float = 60.0  # seconds a queued request waits before 503
    max_request_bytes: int = 1_000_000
    default_max_tokens: int = 256  # when a request gives none (capped by the room left in the context)
    cors: list[str] = field(default_factory=list)
    defaults: SamplingParams = field(default_factory=SamplingParams)  # for what a request leaves out


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def _error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Limiter:
    """At most `max_concurrent` generations at once; at most `max_waiting` more queue (FIFO)."""

    def __init__(self, max_concurrent: int, max_waiting: int, timeout: float):
        self.semaphore = asyncio.Semaphore(max_concurrent)
        self.max_waiting = max_waiting
        self.timeout = timeout
        self.waiting = 0
        self.active = 0

    async def acquire(self) -> None:
        if self.semaphore.locked() and self.waiting >= self.max_waiting:
            raise ApiError(429, f"server busy: {self.active} generations running and {self.waiting} waiting; "
                                "retry later", kind="rate_limit_error")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.semaphore.acquire(), self.timeout)
        except TimeoutError:
            raise ApiError(503, f"no generation slot within {self.timeout:g} s; retry later",
                           kind="server_overloaded") from None
        finally:
            self.waiting -= 1
        self.active += 1

    def release(self) -> None:
        self.active -= 1
        self.semaphore.release()


class _SlotStreamingResponse(StreamingResponse):
    """An event stream that gives its generation slot back however the response ends,
    also when the client is gone before the first byte (then the body never runs)."""

    def __init__(self, content, limiter: Limiter):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.limiter = limiter

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # runs the body's cleanup: its generation stops
            self.limiter.release()


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # newer name of max_tokens in the chat API
    temperature: float | None = None  # None: the server's default
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: bool | int | None = None
    # Extensions that vLLM and others accept too.
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Common):
    messages: list[ChatMessage]


def _message_text(message: ChatMessage, i: int) -> str:
    if isinstance(message.content, str):
        return message.content
    texts = []
    for part in message.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    limiter = Limiter(settings.max_concurrent, settings.max_waiting, settings.queue_timeout)
    app = FastAPI(title=f"{engine.name} (OpenAI-compatible)", description=__doc__)
    if settings.cors:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["*"], allow_headers=["*"])

    @app.middleware("http")
    async def limit_body_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_request_bytes):
            return JSONResponse(_error_body(f"request body over {settings.max_request_bytes} bytes",
                                            "invalid_request_error"), status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return JSONResponse(_error_body(err.message, err.kind, err.param), status_code=err.status)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        return JSONResponse(_error_body(str(err), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in err.errors())
        return JSONResponse(_error_body(problems or "invalid request", "invalid_request_error"), status_code=400)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": engine.name, "context_length": engine.context_length,
                "active": limiter.active, "waiting": limiter.waiting, "tokens_generated": engine.tokens_generated}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": 0, "owned_by": "local",
             "max_model_len": engine.context_length},
        ]}

    def sampling_params(body: _Common, prompt_ids: list[int], extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        if body.model not in (None, engine.name):
            raise ApiError(404, f"model '{body.model}' not found; this server has '{engine.name}'",
                           kind="not_found_error", param="model")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported; "
                                "use repetition_penalty", param="presence_penalty")
        if body.logprobs:
            raise ApiError(400, "logprobs are not supported", param="logprobs")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.room(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, the model's context is "
                                f"{engine.context_length}", param="prompt")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None:
            max_tokens = min(settings.default_max_tokens, room)
        elif not 1 <= max_tokens <= room:
            raise ApiError(400, f"max_tokens must be in [1, {room}]: the prompt has {len(prompt_ids)} tokens "
                                f"of the model's context of {engine.context_length}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        defaults = settings.defaults

        def given(value, default):
            return default if value is None else value

        params = SamplingParams(max_tokens, given(body.temperature, defaults.temperature),
                                given(body.top_p, defaults.top_p), given(body.top_k, defaults.top_k),
                                given(body.repetition_penalty, defaults.repetition_penalty),
                                tuple(stop) + extra_stop, body.seed, body.ignore_eos)
        try:
            params.check()
        except UserError as err:
            raise ApiError(400, str(err)) from None
        return params

    async def respond(request: Request, body: _Common, prompt_ids: list[int], params: SamplingParams,
                      chat: bool, final_body):
        """Run one generation in a slot: as server-sent events, or one JSON answer at the end."""
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: str | None = None, finish_reason: str | None = None, opening: bool = False) -> str:
            if chat:
                message = {"role": "assistant", "content": ""} if opening else (
                    {"content": delta} if delta is not None else {})
                choice = {"index": 0, "delta": message, "logprobs": None, "finish_reason": finish_reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish_reason}
            return _sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                         "created": created, "model": engine.name, "choices": [choice]})

        async def deltas(generation: GenerationStream):
            """The generation's text pieces; stops it when the client goes away."""
            try:
                async for delta in generation.deltas():
                    yield delta
                    if await request.is_disconnected():
                        logger.info("%s: client went away; generation stopped", request_id)
                        return
            finally:
                await anyio.to_thread.run_sync(generation.close)

        await limiter.acquire()  # 429 / 503 come before anything else is sent
        if not body.stream:
            try:
                generation = engine.stream(prompt_ids, params, asyncio.get_running_loop())
                text = "".join([delta async for delta in deltas(generation)])
            finally:
                limiter.release()
            answer = final_body(text, generation.finish_reason)
            return JSONResponse({"id": request_id, "created": created, "model": engine.name, **answer,
                                 "usage": _usage(generation)})

        async def events():
            generation = engine.stream(prompt_ids, params, asyncio.get_running_loop())
            if chat:
                yield chunk(opening=True)
            try:
                async for delta in deltas(generation):
                    yield chunk(delta)
            except Exception as err:  # the 200 status is sent already: report the failure in the stream
                yield _sse(_error_body(f"generation failed: {err}", "server_error"))
                return
            finally:  # also when the response is aborted with this generator suspended mid-stream
                await anyio.to_thread.run_sync(generation.close)
            yield chunk(finish_reason=generation.finish_reason)
            if (body.stream_options or {}).get("include_usage"):
                yield _sse({"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
                            "created": created, "model": engine.name, "choices": [], "usage": _usage(generation)})
            yield "data: [DONE]\n\n"

        return _SlotStreamingResponse(events(), limiter)

    # ------------------------------------------------------------- /v1/completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request", param="prompt")
        prompt = prompts[0]
        if not prompt.strip():
            raise ApiError(400, "the prompt is empty", param="prompt")
        prompt_ids = engine.encode(prompt)
        params = sampling_params(body, prompt_ids)

        def final_body(text: str, finish_reason: str) -> dict:
            return {"object": "text_completion", "choices": [
                {"index": 0, "text": (prompt if body.echo else "") + text, "logprobs": None,
                 "finish_reason": finish_reason}]}

        return await respond(request, body, prompt_ids, params, chat=False, final_body=final_body)

    # -------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise ApiError(400, "messages need at least one non-empty user message", param="messages")
        prompt_ids, template_stop = engine.chat_ids(messages)
        params = sampling_params(body, prompt_ids, template_stop)

        def final_body(text: str, finish_reason: str) -> dict:
            return {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                 "finish_reason": finish_reason}]}

        return await respond(request, body, prompt_ids, params, chat=True, final_body=final_body)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(generation: GenerationStream) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}


# ---------------------------------------------------------------------- chat UI
def _history_text(content) -> str:
    """gradio hands message content over as a string or as a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    if isinstance(content, list):
        return "".join(_history_text(part) for part in content)
    return ""


def fit_conversation(engine: Engine, messages: list[dict], max_new_tokens: int) -> tuple[list[int], tuple[str, ...]]:
    """Prompt ids for the conversation, dropping the oldest turns (never the system message
    or the last user message) until prompt and reply fit in the context."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while True:
        ids, stop = engine.chat_ids(system + turns)
        if len(ids) + max_new_tokens <= engine.context_length:
            return ids, stop
        if len(turns) <= 1:
            raise UserError(f"the message is {len(ids)} tokens long; with {max_new_tokens} new tokens it does "
                            f"not fit the model's context of {engine.context_length}: shorten it or lower max tokens")
        turns = turns[2:]  # the oldest exchange


def build_chat_ui(engine: Engine, title: str, description: str = "", defaults: SamplingParams | None = None,
                  system_prompt: str = "", examples: list[str] | None = None):
    """A gradio ChatInterface over `engine`: streamed replies, multi-turn history, sampling
    sliders, and a stop button that stops the generation itself, not only the display."""
    import gradio as gr

    defaults = defaults or SamplingParams()
    max_new = max(1, engine.context_length // 2)

    def reply(message: str, history: list[dict], system: str, max_new_tokens: float, temperature: float,
              top_p: float, top_k: float, repetition_penalty: float):
        messages = [{"role": "system", "content": system}] if system.strip() else []
        messages += [{"role": m["role"], "content": _history_text(m["content"])} for m in history
                     if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        if not message.strip():
            raise gr.Error("Type a message first.")
        params = SamplingParams(int(max_new_tokens), temperature, top_p, int(top_k), repetition_penalty)
        try:
            prompt_ids, stop = fit_conversation(engine, messages, params.max_new_tokens)
            params.stop = stop
            generation = engine.stream(prompt_ids, params)
        except UserError as err:
            raise gr.Error(str(err)) from None
        text = ""
        try:  # gradio closes this generator when the user presses stop: the finally cancels
            for delta in generation:
                text += delta
                yield text
        finally:
            generation.cancel()
        if not text:
            yield "（模型没有生成内容 / the model produced no text）"

    inputs = [
        gr.Textbox(system_prompt, label="System prompt"),
        gr.Slider(1, max_new, min(defaults.max_new_tokens, max_new), step=1, label="Max new tokens"),
        gr.Slider(0.0, 2.0, defaults.temperature, step=0.05, label="Temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, defaults.top_p, step=0.05, label="Top-p"),
        gr.Slider(0, 200, defaults.top_k, step=1, label="Top-k (0 = off)"),
        gr.Slider(1.0, 2.0, defaults.repetition_penalty, step=0.01, label="Repetition penalty"),
    ]
    return gr.ChatInterface(
        reply, title=title, description=description, additional_inputs=inputs,
        additional_inputs_accordion=gr.Accordion("Generation settings", open=False),
        examples=[[e, system_prompt, *[i.value for i in inputs[1:]]] for e in examples or []] or None,
        fill_height=True, api_name="chat",
    )


# ------------------------------------------------------------- command lines
def _model_arguments(parser: argparse.ArgumentParser, default_model: str) -> None:
    parser.add_argument("--model", "--model_name_or_path", default=default_model, help="Local model directory (config.json, weights, tokenizer).")
    parser.add_argument("--template", default=None,
                        help="Chat template from common/templates.py; default: the one the model was tuned with, "
                             "else the tokenizer's own, else 'plain'.")
    parser.add_argument("--base_model", default=None,
                        help="Base model of a LoRA adapter given as --model (default: the one the adapter names).")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if present).")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 = this machine only; 0.0.0.0 = everyone.")
    parser.add_argument("--max_cache_len", type=int, default=None,
                        help=f"Tokens (prompt + reply) one request may span; the KV cache holds this many per "
                             f"request decoded together. Default: the model's context, at most {DEFAULT_CACHE_LEN}.")
    parser.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                        help="CUDA graphs for the decode step (auto: on CUDA). The first request at each batch "
                             "size then takes a minute to compile; later ones run several times faster.")


def _engine_options(args: argparse.Namespace, max_batch: int) -> dict:
    return {"max_batch": max_batch, "max_cache_len": args.max_cache_len,
            "compile": None if args.compile == "auto" else args.compile == "true"}


def _sampling_arguments(parser: argparse.ArgumentParser, defaults: SamplingParams, title: str) -> None:
    group = parser.add_argument_group(title)
    group.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument("--temperature", type=float, default=defaults.temperature, help="0 = greedy.")
    group.add_argument("--top_p", type=float, default=defaults.top_p)
    group.add_argument("--top_k", type=int, default=defaults.top_k, help="0 = off.")
    group.add_argument("--repetition_penalty", type=float, default=defaults.repetition_penalty)


def _sampling_defaults(args: argparse.Namespace) -> SamplingParams:
    defaults = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.repetition_penalty)
    defaults.check()
    return defaults


def run_server(argv: list[str] | None, default_model: str, description: str,
               defaults: SamplingParams | None = None) -> None:
    """The `serve.py` of a generative recipe. `defaults`: sampling settings for what a
    request leaves out (OpenAI's defaults, temperature 1, when None)."""
    import uvicorn

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(parser, default_model)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served_model_name", default=None, help="Name in /v1/models (default: the folder name).")
    limits = ServerSettings()
    parser.add_argument("--max_concurrent", type=int, default=limits.max_concurrent,
                        help="Generations decoded together in one batch.")
    parser.add_argument("--max_waiting", type=int, default=limits.max_waiting,
                        help="Requests queued beyond those; more are answered 429.")
    parser.add_argument("--queue_timeout", type=float, default=limits.queue_timeout,
                        help="Seconds a queued request waits for a slot before 503.")
    parser.add_argument("--max_request_bytes", type=int, default=limits.max_request_bytes)
    parser.add_argument("--default_max_tokens", type=int, default=limits.default_max_tokens,
                        help="max_tokens of a request that gives none.")
    parser.add_argument("--cors", nargs="*", default=[], help="Origins allowed to call from a browser.")
    _sampling_arguments(parser, defaults or SamplingParams(),
                        "sampling defaults (for what a request leaves out; --max_new_tokens is not used)")
    args = parser.parse_args(argv)
    if args.max_concurrent < 1 or args.max_waiting < 0 or args.queue_timeout <= 0:
        raise UserError("need --max_concurrent >= 1, --max_waiting >= 0 and --queue_timeout > 0")
    engine = Engine.from_pretrained(args.model, args.served_model_name, args.template, args.device, args.dtype,
                                    args.base_model, **_engine_options(args, args.max_concurrent))
    settings = ServerSettings(args.max_concurrent, args.max_waiting, args.queue_timeout, args.max_request_bytes,
                              args.default_max_tokens, args.cors, _sampling_defaults(args))
    print(f"serving '{engine.name}' at http://{args.host}:{args.port}/v1 (OpenAI-compatible)", flush=True)
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info")


def run_chatbot(argv: list[str] | None, default_model: str, description: str, title: str,
                defaults: SamplingParams | None = None, examples: list[str] | None = None) -> None:
    """The `chatbot.py` of a generative recipe."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_arguments(parser, default_model)
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--system_prompt", default="", help="Initial system prompt (editable in the UI).")
    parser.add_argument("--max_concurrent", type=int, default=4, help="Chats answered at once (decoded together).")
    _sampling_arguments(parser, defaults or SamplingParams(), "initial generation settings (the UI's sliders change them)")
    args = parser.parse_args(argv)
    defaults = _sampling_defaults(args)
    engine = Engine.from_pretrained(args.model, None, args.template, args.device, args.dtype, args.base_model,
                                    **_engine_options(args, args.max_concurrent))
    url = f"http://{args.host}:{args.port}"
    # the docstring's first paragraph names the default address: the page shows the real one
    summary = description.split("\n\n")[0].replace("http://127.0.0.1:7860", url)
    demo = build_chat_ui(engine, title, summary, defaults, args.system_prompt, examples)
    print(f"chatbot for '{engine.name}' at {url}", flush=True)
    demo.queue(default_concurrency_limit=args.max_concurrent).launch(server_name=args.host, server_port=args.port,
                                                   share=False, show_error=True)
