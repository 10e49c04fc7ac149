"""Text deltas of a generation: stop strings, half characters held back, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import queue
from collections.abc import Iterator
from typing import TYPE_CHECKING

from common.serving.batcher import _END
from common.serving.sampling import SamplingParams

if TYPE_CHECKING:
    from common.serving.engine import Engine


class _LoopDelivery:
    """Hands items from the decoder's thread to a stream's asyncio queue. `loop` and `put` are
    there for the decoder, which hands a step's tokens to all streams of a loop in one call."""

    def __init__(self, loop: asyncio.AbstractEventLoop, put):
        self.loop, self.put = loop, put

    def __call__(self, item) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody reads any more
            self.loop.call_soon_threadsafe(self.put, item)


class IncrementalText:
    """The text of a growing list of token ids, where each new token costs the decode of a few
    tokens, not of all (a stream of n tokens would otherwise decode n^2 / 2 tokens in all: with
    many clients, more host time per step than the GPU's step itself). The text up to a settled
    token is kept; what later tokens add is the decode of a short window ending at them minus
    the decode of the same window without them, so a tokenizer's context effects (a
    SentencePiece word's leading space, WordPiece's joining, a character split over byte
    tokens) come out as in a decode of everything."""

    WINDOW = 8  # tokens of context before the settled point

    def __init__(self, decode):
        self.decode = decode  # token ids -> display text
        self.ids: list[int] = []
        self.settled = 0  # tokens whose text is final
        self.settled_text = ""

    def extend(self, new: list[int]) -> str:
        self.ids.extend(new)
        start = max(0, self.settled - self.WINDOW)
        before = self.decode(self.ids[start:self.settled])
        after = self.decode(self.ids[start:])
        if after.startswith(before):
            text = self.settled_text + after[len(before):]
        else:  # the new tokens changed the window's earlier text: decode everything once
            text = self.decode(self.ids)
        if not text.endswith("\ufffd"):  # (half a character may still complete)
            self.settled, self.settled_text = len(self.ids), text
        return text


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
        self._detokenizer = IncrementalText(
            lambda ids: engine.clean(engine.tokenizer.decode(ids, skip_special_tokens=True)))
        self._ids = self._detokenizer.ids  # the tokens read so far
        self._text_so_far = ""
        self._emitted = ""
        self._ended = False
        self._stop_cut: int | None = None  # where a stop string cut the text
        if loop is None:
            self._queue: queue.Queue | asyncio.Queue = queue.Queue()
            deliver = self._queue.put
        else:
            self._queue = asyncio.Queue()
            deliver = _LoopDelivery(loop, self._queue.put_nowait)
        self._generation = engine.decoder.submit(prompt_ids, params, deliver)

    def cancel(self) -> None:
        self._generation.cancelled.set()
        self.engine.decoder.wake()

    def close(self) -> None:
        """Cancel and wait until the batcher has let the generation go."""
        self.cancel()
        self._generation.done.wait()

    @property
    def token_ids(self) -> list[int]:
        return self._generation.ids[self.prompt_tokens:]

    @property
    def reported_ids(self) -> list[int]:
        """The generated tokens the returned text is made of: after a stop string, those up to the
        first whose text reaches it (the stop string's own tokens left out, as OpenAI does);
        else all read, the end-of-text token included. Read after the stream ended."""
        if self._stop_cut is None:
            return list(self._ids)
        for n in range(len(self._ids) + 1):
            if len(self._detokenizer.decode(self._ids[:n])) \
                    >= self._stop_cut:
                return self._ids[:n]
        return list(self._ids)

    @property
    def logprobs(self):
        """(log-probability, top alternatives) of each of `reported_ids`, when params.logprobs was set."""
        return self._generation.logprobs[:len(self.reported_ids)]

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
            emitted = self._emitted
            text = self._text_so_far = self._detokenizer.extend(new)
            self.completion_tokens = len(self._ids)
            # half a multi-byte character, or a decode still settling: wait for more
            if not text.endswith("\ufffd") and text.startswith(emitted):
                cut = _find_stop(text, stop, start=max(0, len(emitted) - max(map(len, stop), default=0)))
                if cut is not None:
                    self.finish_reason, self._ended, self._stop_cut = "stop", True, cut
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
            text = self._text_so_far
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
