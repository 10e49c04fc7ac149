"""One request's decoding settings and the logit processors that apply them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.errors import UserError

MAX_LOGPROBS = 20  # alternatives per token a request may ask for (vLLM's default limit)


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
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k likeliest alternatives

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
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise UserError(f"logprobs must be in [0, {MAX_LOGPROBS}]")

    @property
    def plain_greedy(self) -> bool:
        return self.temperature == 0 and self.repetition_penalty == 1

    @property
    def needs_logits(self) -> bool:
        """Whether choosing (or reporting) a token needs its logits on the host, not only the argmax."""
        return not self.plain_greedy or self.logprobs is not None


TokenLogprob = tuple[float, list[tuple[int, float]]]  # the token's log-probability, the top alternatives'


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Log-probabilities of `tokens` [n] under `logits` [n, vocab] (the model's own distribution,
    before temperature or penalties, as OpenAI and vLLM report it), each with the `top` likeliest
    tokens. Both come from one float32 tensor, so a token that is the argmax has exactly the top
    alternative's value (what evaluation tools compare to call a continuation greedy)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top == 0:
        return [(value, []) for value in chosen]
    values, ids = logprobs.topk(top, dim=-1)
    return [(value, list(zip(row_ids, row_values)))
            for value, row_ids, row_values in zip(chosen, ids.tolist(), values.tolist())]


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
