"""`Engine`: a model, its tokenizer, how to prompt it, and the decoder thread that runs its generations."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path
from typing import Literal

import torch

from common.errors import UserError
from common.serving.batcher import Batcher, SequentialDecoder, batcher_refusal, span_bucket
from common.serving.loading import context_length, load_causal_lm, prepare_weights
from common.serving.runtime import (
    apply_serving_settings,
    freeze_what_warm_up_left,
    load_compile_cache,
    save_compile_cache,
)
from common.serving.sampling import SamplingParams, TokenLogprob, token_logprobs
from common.serving.text import GenerationStream
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

DEFAULT_CACHE_LEN = 4096  # tokens per request held in the KV cache unless max_cache_len says otherwise
logger = logging.getLogger(__name__)


class Engine:
    """A model, its tokenizer and how to prompt it.

    `template` names an entry of common/templates.py; without one, the entry a tuned model's
    chat_template was generated from, else the tokenizer's own Jinja chat template, else
    "plain". Registry templates build prompts with `encode_chat`, the code training uses, so a
    tuned model is prompted token for token as it was trained; their stop markers that are
    single tokens end generation by id. With the tokenizer's own template, the special tokens
    it writes after a reply and generation_config.json's eos ids end generation.

    Generations run in a decoder thread: the Batcher where the model allows it, else the
    SequentialDecoder (see common/serving/batcher.py), with the same interface.
    """

    def __init__(self, model, tokenizer, name: str, template: str | None = None, max_batch: int = 8,
                 max_cache_len: int | None = None, compile: bool | None = None,
                 decoder: Literal["auto", "batch", "sequential"] = "auto"):
        """`max_batch`: requests decoded together (more wait in the batcher's queue).
        `max_cache_len`: tokens (prompt + reply) a request may span, the KV cache's length;
        default the model's context, at most DEFAULT_CACHE_LEN. `compile`: CUDA graphs for
        the decode step; default on CUDA. `decoder`: "auto" batches every model the Batcher
        can drive and decodes the others one request at a time; "sequential" forces that
        (a model whose own cache the Batcher's SlotCache cannot stand in for)."""
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
        positions = context_length(model)  # None: no position table (ALiBi)
        self.context_length = min(positions or max_cache_len or DEFAULT_CACHE_LEN, max_cache_len or DEFAULT_CACHE_LEN)
        self.clean = display_cleaner(tokenizer)
        self.max_batch = max_batch
        self.compile = model.device.type == "cuda" if compile is None else compile
        apply_serving_settings(model.device, self.compile)
        refusal = batcher_refusal(model)
        if decoder == "batch" and refusal:
            raise UserError(f"{refusal}: the batching decoder cannot serve it; use the sequential one")
        if decoder == "auto" and refusal:
            logger.warning("%s: served one request at a time (the sequential decoder)", refusal)
        self.batched = decoder == "batch" or (decoder == "auto" and refusal is None)
        self.tokens_generated = 0  # by every generation since start, cancelled ones too
        self._decoder: Batcher | SequentialDecoder | None = None
        self._lock = threading.Lock()

    def count_tokens(self, n: int) -> None:
        with self._lock:
            self.tokens_generated += n

    @property
    def decoder(self) -> Batcher | SequentialDecoder:
        """Started at the first generation (the Batcher allocates the KV cache)."""
        with self._lock:
            if self._decoder is None:
                if self.batched:
                    self._decoder = Batcher(self.model, self.stop_token_ids, self.max_batch, self.context_length,
                                            self.compile, self.count_tokens)
                else:
                    self._decoder = SequentialDecoder(self.model, self.stop_token_ids, self.count_tokens)
            return self._decoder

    def warm_up(self, compile_cache: str | Path | None = None) -> float:
        """Run every decode shape a request can meet (each cache width x attention span) once,
        and one prompt's prefill (one graph for every prompt length), so that compiling them
        (minutes for a 7B model, the first time; torch.compile caches the kernels on this
        machine's disk for later starts) is paid before the server reports healthy, not by its
        first users. `compile_cache`: a file of compiled kernels, loaded
        first if it exists and written afterwards (runtime.load_compile_cache: copied to another
        machine with the same GPU, torch and triton, it spares that machine the compiling).
        Compiling leaves about a million objects behind: they are collected or frozen at the end
        (runtime.freeze_what_warm_up_left), so that the garbage collector's full passes do not
        stop the server under load. Returns the seconds it took."""
        if not self.batched:
            return 0.0
        start = time.perf_counter()
        if compile_cache and self.compile:
            load_compile_cache(compile_cache)
        decoder = self.decoder
        spans = sorted({span_bucket(n, self.context_length) for n in range(2, self.context_length + 1)})
        greedy = SamplingParams(max_new_tokens=2, temperature=0, ignore_eos=True)
        for smaller, width in zip([0, *decoder.widths], decoder.widths):
            for span in spans:
                prompt = [0] * max(1, min(span - 2, self.context_length - 2))  # its one decode step reads `span` slots
                with decoder.condition:  # they join together: `width` rows are the smallest for one more than `smaller`
                    streams = [GenerationStream(self, prompt, greedy) for _ in range(smaller + 1)]
                for stream in streams:
                    for _ in stream:
                        pass
                logger.info("warm-up: %d row(s) x %d slots done after %.1f s", width, span, time.perf_counter() - start)
        if compile_cache and self.compile:
            save_compile_cache(compile_cache)
        if self.compile:
            freeze_what_warm_up_left()
        return time.perf_counter() - start

    def close(self) -> None:
        """Stop the decoder thread (running generations end with an error)."""
        if self._decoder is not None:
            self._decoder.close()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, name: str | None = None, template: str | None = None,
                        device: str | None = None, dtype: str = "auto", base_model: str | None = None,
                        quantize: str = "none", fuse_projections: str = "auto", matvec: str = "auto",
                        decode_attention: str = "auto", **engine_options) -> Engine:
        """`template` default: the one the model was tuned with (its chat template, or an older
        output's sft_template.json), if any. `fuse_projections` ("auto", "on", "off"): q/k/v and
        gate/up merged into one product each after loading (an adapter merged first; fusing.py,
        loading.fuse_wanted). `quantize`: the weights quantised after that (see
        loading.quantize_weights). `matvec`: what multiplies one row of activations by a weight,
        `decode_attention`: the decode step's attention (loading.prepare_weights).
        `engine_options`: max_batch, max_cache_len, compile, decoder (see __init__)."""
        model, tokenizer = load_causal_lm(model_dir, device, dtype, base_model)
        prepare_weights(model, quantize, fuse_projections, matvec, decode_attention)
        return cls(model, tokenizer, name or Path(model_dir).resolve().name, template or saved_template_name(model_dir),
                   **engine_options)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def vocab_size(self) -> int:
        """Token ids the model takes: its embedding rows."""
        return self.model.get_input_embeddings().num_embeddings

    def token_text(self, token: int) -> str:
        """One token as text, as logprobs report it (half a character shows as U+FFFD)."""
        return self.clean(self.tokenizer.decode([token]))

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

    def prompt_logprobs(self, prompt_ids: list[int], top: int) -> list[TokenLogprob]:
        """Log-probability of each prompt token after the first given the ones before it, with
        the `top` likeliest alternatives (what `echo` with `logprobs` reports): one forward in
        the decoder's thread, between its steps. Blocks; call it off the event loop."""
        if not 2 <= len(prompt_ids) <= self.context_length:
            raise UserError(f"scoring a prompt needs 2 to {self.context_length} tokens, not {len(prompt_ids)}")

        @torch.inference_mode()
        def score() -> list[TokenLogprob]:
            ids = torch.tensor([prompt_ids], device=self.model.device)
            logits = self.model(input_ids=ids, use_cache=False).logits[0, :-1]
            return token_logprobs(logits, ids[0, 1:], top)

        return self.decoder.call(score)
