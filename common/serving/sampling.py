"""One request's decoding settings and the logit processors that apply them."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import UserError


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
