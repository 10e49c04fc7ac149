"""The decoders: background threads that turn queued requests into tokens.

`Batcher` (the fast one) runs continuous batching over a static `SlotCache`: every running
request decoded together, one token each per step; on CUDA the step runs as CUDA graphs and
greedy steps are pipelined. It drives any model whose attention writes through the
transformers Cache interface and takes position_ids (Llama, Qwen2, Mistral, GLM, GPT-2, ...).
`SequentialDecoder` (the fallback) runs one request at a time through the model's own cache:
BLOOM (ALiBi, no position_ids) and models with caches of their own. Both take the same
requests, sample the same way, report log-probabilities and run jobs (prompt scoring) between
steps, so the Engine and the server above them do not care which one runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import random
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common.errors import UserError
from common.serving.sampling import SamplingParams, TokenLogprob, _logit_processors, token_logprobs

logger = logging.getLogger(__name__)

PREFILL_TOKENS = 16384  # prompts that join together are prefilled in one forward up to this many (padded) tokens

# Attention kernels the compiled decode step may use, cuDNN's first: on its masked one-query
# shapes it reads the KV cache at about the copy bandwidth (H200, 64 rows x 512 slots, 32
# layers: 4.2 ms against 8.2 ms for the memory-efficient kernel; benchmarks/profile_decode_step.py).
# The step has few shapes (cache width x span bucket), so cuDNN builds few plans; everywhere
# else (prefill, scoring, the sequential decoder: a new key length at every call) it stays off
# (runtime.py).
DECODE_ATTENTION = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


class SlotCache:
    """Key/value cache of `rows` generations decoded together, `length` slots per row.

    The model writes into it through `update`, the transformers Cache call its attention
    layers make. Every row holds its request from slot 0, so a token's slot is its position:
    a decode step writes row r's new token at slot `position[r]`, and a request joins any free
    row at the next step whatever the other rows' lengths. Attention reads only the first
    `span` slots, a bucket of the longest row, so a step costs what the conversations' length
    costs, not what the whole cache would; the mask hides each row's slots after its own.
    """

    is_compileable = True

    def __init__(self, rows: int, length: int, device: torch.device):
        self.rows, self.length = rows, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.position = torch.zeros(rows, dtype=torch.long, device=device)  # the slot each row writes next
        self.row_index = torch.arange(rows, device=device)
        self.span = length
        self.prefill_at: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, slot of each column) while prompts are written

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == len(self.keys):  # first write: the layer's own head count, head size and dtype
            for store, states in ((self.keys, key_states), (self.values, value_states)):
                shape = (self.rows, states.shape[1], self.length, states.shape[3])
                store.append(torch.zeros(shape, dtype=states.dtype, device=states.device))
                torch._dynamo.mark_static_address(store[-1])  # updated in place under CUDA graphs
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.prefill_at is None:
            # (an indexed write, which inductor does in place; it copied the whole cache for a
            # scatter_: 64 streams at 3,961 instead of 8,721 tokens/s on an H200)
            keys[self.row_index, :, self.position] = key_states[:, :, 0]
            values[self.row_index, :, self.position] = value_states[:, :, 0]
            return keys[:, :, :self.span], values[:, :, :self.span]
        rows, slots = self.prefill_at  # [g, 1], [g, n]: indexed, the cache's dims come out as [g, n, heads, size]
        keys[rows, :, slots] = key_states.transpose(1, 2)
        values[rows, :, slots] = value_states.transpose(1, 2)
        return key_states, value_states  # a prompt starts at slot 0: it attends to its own columns only

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never needed: positions and the mask are always given

    def first_rows(self, rows: int) -> SlotCache:
        """A cache of this one's first `rows` rows (views of its tensors: no memory of its own)."""
        if rows == self.rows:
            return self
        view = SlotCache(rows, self.length, self.position.device)
        for store, view_store in ((self.keys, view.keys), (self.values, view.values)):
            for tensor in store:
                view_store.append(tensor[:rows])
                torch._dynamo.mark_static_address(view_store[-1])
        return view

    def move_rows(self, target: SlotCache, rows: list[int], used: int) -> None:
        """Copy the first `used` slots of `rows` into rows 0, 1, ... of `target` (nothing to copy
        when they are already there: a cache and the larger one it is part of share their rows)."""
        if rows == list(range(len(rows))) and target.keys[0].data_ptr() == self.keys[0].data_ptr():
            return
        for store, target_store in ((self.keys, target.keys), (self.values, target.values)):
            for layer, tensor in enumerate(store):
                target_store[layer][:len(rows), :, :used] = tensor[rows, :, :used]


def batch_widths(max_batch: int) -> list[int]:
    """The batch widths the decode step is compiled for (one CUDA graph each): 1, `max_batch`, and
    a quarter of it when that is 8 or more. A step runs at the smallest width that holds its
    requests, and its attention reads every row of that width: at 64 rows x 256 slots of a 7B
    model that is 8.6 GB a step beside the weights' 13.5, so 2 to 16 requests run faster in 16
    rows. The widths are the first rows of one cache (no memory of their own)."""
    quarter = max_batch // 4
    return sorted({1, max_batch, *([quarter] if quarter >= 8 else [])})


def span_bucket(used: int, length: int) -> int:
    """Slots attention reads: 256, 512, 1024, ... (few shapes to compile), at most the cache."""
    span = 256
    while span < used:
        span *= 2
    return min(span, length)


@dataclass(eq=False)
class _Generation:
    """One request inside a decoder; `deliver` hands its tokens to its stream."""

    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    deliver: Callable[[object], None]  # hands token lists, an error, then _END to the stream (any thread)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)  # prompt + generated: the repetition penalty's history
    length: int = 0  # tokens in the cache (prompt + fed generated tokens): the slot its next token goes to
    fed: int = 0  # decode steps launched for it
    generated: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per generated token, when params.logprobs is set

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
    logits: torch.Tensor | None  # kept when some row samples or reports log-probabilities
    next_ids: torch.Tensor | None  # the greedy tokens on the device, to feed the next step
    greedy: torch.Tensor  # the greedy tokens on the host, once `ready`
    ready: torch.cuda.Event | None = None


def attention_kinds(model) -> set[str]:
    """What its layers attend to, as transformers' masks say: "full_attention" (every earlier
    token), "sliding_attention" (the last `config.sliding_window` tokens, itself included:
    Mistral, a Qwen2 with use_sliding_window), or another kind (chunked, ...). Per layer from
    `config.layer_types` where the config has them, else from `config.sliding_window`."""
    config = model.config
    sliding = getattr(config, "sliding_window", None) is not None
    return set(getattr(config, "layer_types", None) or ["sliding_attention" if sliding else "full_attention"])


def attention_window(model) -> int | None:
    """The sliding window every layer attends within; None when they see every earlier token."""
    return model.config.sliding_window if attention_kinds(model) == {"sliding_attention"} else None


def batcher_refusal(model) -> str | None:
    """Why the Batcher cannot drive `model` (None when it can)."""
    if "position_ids" not in inspect.signature(model.forward).parameters:  # a padded prefill: positions are not columns
        return f"{type(model).__name__} takes no position_ids (ALiBi models such as BLOOM)"
    kinds = attention_kinds(model)
    if len(kinds) > 1 or kinds - {"full_attention", "sliding_attention"}:  # its one mask is each layer's
        return f"{type(model).__name__} has layers that attend to different spans ({', '.join(sorted(kinds))})"
    return None


def _cache_argument(model) -> str:
    """The forward argument that takes the KV cache: `cache` from transformers 5.24 on, else past_key_values."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _put_all(puts: list[tuple[Callable[[object], None], object]]) -> None:
    for put, item in puts:
        put(item)


class _Decoder:
    """What both decoders share: the request queue, the background thread, jobs run between
    steps, and choosing and handing out each token."""

    thread_name = "decoder"

    def __init__(self, model, stop_token_ids: list[int], on_tokens=None):
        self.model = model
        self.device = model.device
        self.stop_token_ids = set(stop_token_ids)
        self.on_tokens = on_tokens or (lambda n: None)
        forward = inspect.signature(model.forward).parameters
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}
        self.cache_argument = _cache_argument(model)
        self.waiting: deque[_Generation] = deque()
        self.outbox: list[tuple[Callable[[object], None], list[int]]] = []  # tokens of this step, not yet handed out
        self.jobs: deque[tuple[Callable[[], object], Future]] = deque()
        self.condition = threading.Condition()
        self.closed = False

    def _start(self) -> None:
        # The thread runs in a copy of this one's context: torch.compile's settings (torch._dynamo.config,
        # torch._inductor.config: runtime.apply_serving_settings' and the user's) are per thread from torch
        # 2.12 on, and the decode steps compile in this thread, which would otherwise see the defaults.
        context = contextvars.copy_context()
        self.thread = threading.Thread(target=context.run, args=(self._run,), name=self.thread_name, daemon=True)
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

    def call(self, function: Callable[[], object]):
        """`function()` run in the decoder's thread between two steps, its result returned here
        (blocking): work on the model, such as scoring a prompt, then never runs beside a step."""
        future: Future = Future()
        with self.condition:
            if self.closed:
                raise UserError("the engine is closed")
            self.jobs.append((function, future))
            self.condition.notify()
        return future.result()

    def wake(self) -> None:
        with self.condition:
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()

    # ------------------------------------------------------------- the loop's pieces
    def _run(self) -> None:
        raise NotImplementedError

    def _take_jobs(self) -> list[tuple[Callable[[], object], Future]]:
        jobs = list(self.jobs)  # (the caller holds the lock)
        self.jobs.clear()
        return jobs

    @staticmethod
    def _run_jobs(jobs: list[tuple[Callable[[], object], Future]]) -> None:
        for function, future in jobs:
            try:
                future.set_result(function())
            except Exception as err:  # raised in the caller's thread
                future.set_exception(err)

    def _choose(self, generation: _Generation, logits: torch.Tensor | None, greedy: int | None) -> int:
        params = generation.params
        if not params.needs_logits and greedy is not None:
            return greedy
        scores = logits[None].float()
        history = torch.tensor([generation.ids], device=self.device)
        for processor in _logit_processors(params):
            scores = processor(history, scores)
        if params.temperature == 0:
            token = int(scores.argmax())
        else:
            probs = torch.softmax(scores, dim=-1)
            token = int(torch.multinomial(probs[0], 1, generator=generation.generator))
        if params.logprobs is not None:
            generation.logprobs += token_logprobs(logits[None], torch.tensor([token], device=logits.device),
                                                  params.logprobs)
        return token

    def _hand_out(self, generation: _Generation, token: int) -> bool:
        """Give `token` to its stream; True when the generation has ended with it."""
        generation.ids.append(token)
        generation.generated += 1
        self.outbox.append((generation.deliver, [token]))
        self.on_tokens(1)
        stopped = token in self.stop_token_ids and not generation.params.ignore_eos
        if stopped or generation.generated >= generation.params.max_new_tokens or generation.cancelled.is_set():
            self._flush()  # its tokens before its end
            generation.finish()
            return True
        return False

    def _flush(self) -> None:
        """Hand the tokens of a step to their streams: one wake-up per event loop for all its
        streams (a thread-safe call writes to the loop's wake-up pipe: one per token and step
        adds up with many clients), thread-queue streams directly."""
        by_loop: dict = defaultdict(list)
        for deliver, item in self.outbox:
            loop = getattr(deliver, "loop", None)
            if loop is None:
                deliver(item)
            else:
                by_loop[loop].append((deliver.put, item))
        self.outbox.clear()
        for loop, puts in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
                loop.call_soon_threadsafe(_put_all, puts)


class SequentialDecoder(_Decoder):
    """The fallback decoder: one request at a time (FIFO), token by token through the model's
    own cache (whatever kind its forward returns), no position_ids or custom masks needed. So
    BLOOM's ALiBi and models with caches of their own are served correctly, with the same
    sampling, stops, cancellation and log-probabilities as the Batcher, but not fast:
    concurrent requests wait their turn."""

    thread_name = "sequential-decoder"

    def __init__(self, model, stop_token_ids: list[int], on_tokens=None):
        super().__init__(model, stop_token_ids, on_tokens)
        self._start()

    @torch.inference_mode()
    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not self.waiting and not self.jobs:
                    self.condition.wait()
                if self.closed:
                    for generation in self.waiting:
                        generation.finish(UserError("the engine was closed"))
                    return
                jobs = self._take_jobs()
                generation = self.waiting.popleft() if self.waiting else None
            self._run_jobs(jobs)
            if generation is not None:
                try:
                    self._generate(generation)
                except Exception as err:  # handed to the reader, which raises it in its request
                    logger.exception("generation failed")
                    self._flush()
                    generation.finish(err)

    def _generate(self, generation: _Generation) -> None:
        generation.ids = list(generation.prompt_ids)
        input_ids = torch.tensor([generation.prompt_ids], device=self.device)
        cache = None
        while not generation.cancelled.is_set():
            out = self.model(input_ids=input_ids, use_cache=True, **{self.cache_argument: cache}, **self.keep_last)
            cache = out["cache"] if "cache" in out else out["past_key_values"]
            finished = self._hand_out(generation, self._choose(generation, out.logits[0, -1], None))
            self._flush()
            if finished:
                return
            input_ids = torch.tensor([[generation.ids[-1]]], device=self.device)
        generation.finish()


class Batcher(_Decoder):
    """Decodes every running request of an Engine together, one token per request per step,
    in a background thread (continuous batching: a request joins the running batch at the next
    step while fewer than `max_batch` run, whatever its prompt's length; FIFO, so no request
    is passed over). Each row holds its request from slot 0 and writes at its own slot, so
    every request the Engine accepts fits its row, whatever the others are doing.

    Rows live in a SlotCache of 1 row while one request runs (the fastest shape for a single
    user), of a quarter of `max_batch` rows (`batch_widths`) while no more than that run, and of
    `max_batch` rows when more do; the smaller caches are the first rows of the largest, and the
    running rows move to the first rows when the width changes. On CUDA the decode step is
    compiled with CUDA graphs (torch.compile "reduce-overhead"; "max-autotune" for one row): a
    7B model's step launches hundreds of small kernels, and launching them from Python costs
    more than the step itself. A prompt that arrives alone is prefilled through one compiled
    graph for every length (no CUDA graphs); prompts that arrive together in one padded eager
    forward (their launches are shared).
    """

    thread_name = "batcher"

    def __init__(self, model, stop_token_ids: list[int], max_batch: int, cache_length: int,
                 compile_decode: bool, on_tokens=None):
        super().__init__(model, stop_token_ids, on_tokens)
        refusal = batcher_refusal(model)
        if refusal:
            raise UserError(f"{refusal}: the batching engine cannot serve it (SequentialDecoder can)")
        self.max_batch = max_batch
        self.cache_length = cache_length
        self.window = attention_window(model)  # the masks' (None: every earlier slot)
        self.widths = batch_widths(max_batch)
        self.compiled = compile_decode
        self.prefill_eager = partial(_prefill_forward, model, self.cache_argument, self.keep_last)
        # One prompt's prefill, compiled once for every prompt length (no CUDA graphs): run eagerly,
        # a 7B model's forward over a short prompt waits on Python launching its kernels one by one
        # (a 32-token prompt's first token came 46 ms after the request on an H200, where reading the
        # weights takes 3.2: benchmarks/RESULTS.md). Prompts that join together stay eager.
        self.prefill_one = torch.compile(self.prefill_eager) if compile_decode else self.prefill_eager
        self.prefill_ran = False  # whether prefill_one has run once (compiled, when compile_decode)
        try:
            self.largest = SlotCache(max_batch, cache_length, self.device)  # prompts are written through it
            self._prefill([0], [[0]])  # allocate the cache now: a too-large one fails here
            self.caches = {w: self.largest.first_rows(w) for w in self.widths}
        except torch.OutOfMemoryError:
            raise UserError(f"no room on {self.device} for the KV cache of {max_batch} requests x {cache_length} "
                            "tokens: lower --max_concurrent or --max_cache_len") from None
        dtype = next(model.parameters()).dtype
        step = partial(_decode_step, model, dtype, self.cache_argument, self.window)
        if compile_decode:
            # one compiled function per cache: each sees one set of cache tensors (no guard churn).
            # One row's matrix products become reductions that inductor generates (coordinate-descent
            # tuning, runtime.py); "max-autotune" (CUDA graphs too) tries more launch configurations
            # for them: a 7B layer's products 1.04x / 1.16x faster in two runs on an H200, the 8-bit
            # ones 1.05-1.17x, for about the same compile time (benchmarks/quantized_matvec.py)
            self.decode = {w: torch.compile(step, mode="max-autotune" if w == 1 else "reduce-overhead")
                           for w in self.widths}
        else:
            self.decode = dict.fromkeys(self.widths, step)
        self.width = 1
        self.rows: list[_Generation | None] = [None]
        self.in_flight: _Step | None = None  # a launched step whose tokens are not handed out yet
        self._start()

    # ------------------------------------------------------------- the loop
    @torch.inference_mode()
    def _run(self) -> None:
        if self.compiled:
            _cudagraph_state_for_this_thread()
        while True:
            with self.condition:
                while not self.closed and not self.waiting and not self.jobs and not any(self.rows):
                    self.condition.wait()  # (nothing is in flight: it belongs to a row)
                if self.closed:
                    for generation in [*self.waiting, *filter(None, self.rows)]:
                        generation.finish(UserError("the engine was closed"))
                    return
                jobs = self._take_jobs()
                joining = self._take_joining()
            self._run_jobs(jobs)
            try:
                self._admit(joining)
                if any(self.rows):
                    self._step()
            except Exception as err:  # handed to every reader, which raises it in its request
                logger.exception("generation failed")
                self._flush()
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
            else:
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
        self._resize(sum(g is not None for g in self.rows) + len(joining))
        group: list[tuple[int, _Generation]] = []
        for generation in joining:
            row = self.rows.index(None)
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
        logits = self._prefill([row for row, _ in group], [g.prompt_ids for _, g in group])
        for i, (row, generation) in enumerate(group):
            self._emit(row, self._choose(generation, logits[i], None))
        self._flush()

    def _resize(self, needed: int) -> None:
        """Use the smallest cache that holds `needed` rows, moving the running rows into it."""
        width = next(w for w in self.widths if w >= needed)
        if width == self.width:
            return
        rows = [r for r, g in enumerate(self.rows) if g is not None]
        self.caches[self.width].move_rows(self.caches[width], rows, max((self.rows[r].length for r in rows), default=0))
        self.rows = [self.rows[r] for r in rows] + [None] * (width - len(rows))
        self.width = width

    @torch.inference_mode()
    def _prefill(self, rows: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Write the prompts' keys/values into their rows from slot 0, in one forward, and
        return the logits of each last position. Shorter prompts are padded on the left; a
        padding column writes a slot after its prompt (overwritten by the row's decode steps
        before the mask lets anything see it) and sees only itself. Each prompt attends to its
        own columns (what it just wrote), so the mask is over columns, not cache slots."""
        n = max(map(len, prompts))
        pads = torch.tensor([n - len(p) for p in prompts], device=self.device)[:, None]
        columns = torch.arange(n, device=self.device)[None]
        column_slots = (columns - pads) % n  # [g, n]: a prompt token's slot is its position
        earlier = columns[..., None] > columns[:, None]  # [1, n (query), n (key)]
        if self.window is not None:
            earlier &= columns[..., None] - columns[:, None] < self.window
        visible = torch.eye(n, dtype=torch.bool, device=self.device) | (earlier & (columns >= pads)[:, None])
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device).masked_fill_(~visible, torch.finfo(dtype).min)
        mask = mask[:, None]  # [g, 1 (heads), n, n]
        input_ids = torch.tensor([[0] * (n - len(p)) + p for p in prompts], device=self.device)
        position_ids = (columns - pads).clamp(min=0)
        forward = self.prefill_eager
        if len(prompts) == 1 and n > 1 and self.compiled:
            forward = self.prefill_one
            for tensor, dim in ((input_ids, 1), (position_ids, 1), (mask, 2), (mask, 3), (column_slots, 1)):
                torch._dynamo.mark_dynamic(tensor, dim)  # one graph for every length (but 1)
        self.largest.prefill_at = (torch.tensor(rows, device=self.device)[:, None], column_slots)
        try:
            logits = forward(self.largest, input_ids, position_ids, mask)
        except Exception:
            if forward is self.prefill_eager or self.prefill_ran:
                raise
            # (inductor compiles at the first call, the warm-up's: a model it cannot compile for
            # every length is still served, its prompts prefilled eagerly)
            logger.warning("compiling the prefill failed: prompts are prefilled eagerly", exc_info=True)
            logits = self.prefill_eager(self.largest, input_ids, position_ids, mask)
            self.prefill_one = self.prefill_eager
        finally:
            self.largest.prefill_at = None
        self.prefill_ran |= forward is self.prefill_one
        return logits

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
        pipelined = all(not g.params.needs_logits for g in rows if g is not None)
        on_device = [previous is not None and g is not None and previous.rows[r] is g for r, g in enumerate(rows)]
        cache = self.caches[self.width]
        # one host-to-device copy for the step's inputs: token (unless the device has it) and
        # position = slot (an empty row writes and sees slot 0 only: attention over nothing gives NaN)
        # (from pinned memory, asynchronously: a plain copy would wait for the step in flight)
        inputs = torch.tensor([[g.ids[-1] if g is not None and not dev else 0 for g, dev in zip(rows, on_device)],
                               [g.length if g is not None else 0 for g in rows],
                               on_device], pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        input_ids = inputs[0] if not any(on_device) else torch.where(inputs[2].bool(), previous.next_ids, inputs[0])
        cache.position.copy_(inputs[1])
        cache.span = span_bucket(max(g.length for g in rows if g is not None) + 1, cache.length)
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()
        with sdpa_kernel(DECODE_ATTENTION) if self.device.type == "cuda" else contextlib.nullcontext():
            logits, greedy = self.decode[self.width](cache, input_ids[:, None], inputs[1, :, None])
        step = _Step(rows, None if pipelined else logits, greedy.clone() if pipelined else None,
                     torch.empty(greedy.shape, dtype=greedy.dtype, pin_memory=self.device.type == "cuda"))
        step.greedy.copy_(greedy, non_blocking=True)
        if self.device.type == "cuda":
            step.ready = torch.cuda.Event()
            step.ready.record()
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
        self._flush()

    def _emit(self, row: int, token: int) -> None:
        if self._hand_out(self.rows[row], token):
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


def _prefill_forward(model, cache_argument: str, keep_last: dict, cache: SlotCache, input_ids, position_ids, mask):
    """The logits of each prompt's last column (Batcher._prefill)."""
    return model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, use_cache=True,
                 **{cache_argument: cache}, **keep_last).logits[:, -1]


def _decode_step(model, dtype: torch.dtype, cache_argument: str, window: int | None, cache: SlotCache, input_ids,
                 position_ids):
    """One token for every row: logits and their argmax. Row r writes slot position_ids[r]
    (= cache.position[r]) and sees the slots up to it (its prompt and what it generated), the
    last `window` of them for a model with a sliding window."""
    slots = torch.arange(cache.span, device=input_ids.device)
    visible = slots <= position_ids
    if window is not None:
        visible &= slots > position_ids - window
    mask = torch.zeros(visible.shape, dtype=dtype, device=input_ids.device).masked_fill_(~visible, torch.finfo(dtype).min)
    logits = model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask[:, None, None, :],
                   use_cache=True, **{cache_argument: cache}).logits[:, -1]
    return logits, logits.argmax(-1)
