"""The OpenAI-compatible HTTP API over an Engine (FastAPI).

`POST /v1/completions`, `POST /v1/chat/completions` (`stream: true` gives server-sent events in
OpenAI's chunk format, ending with `data: [DONE]`), `GET /v1/models`, `GET /health`.
`/v1/completions` takes a prompt as text or token ids and reports `logprobs` (each token's
log-probability and its top alternatives) and `echo` (the prompt's tokens and theirs too) as
OpenAI's legacy API and vLLM do, so evaluation tools (lm-evaluation-harness's
`local-completions`) can score continuations; the chat API reports `logprobs` / `top_logprobs`. Requests
are validated (4xx with an OpenAI-style error body); at most `max_concurrent` generations run
(decoded together) with at most `max_waiting` queued; beyond that the answer is 429, and a
request that waited longer than `queue_timeout` gets 503. Nothing hangs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from common.errors import UserError
from common.serving.engine import Engine
from common.serving.sampling import MAX_LOGPROBS, SamplingParams, TokenLogprob
from common.serving.text import GenerationStream

logger = logging.getLogger(__name__)
DISCONNECT_CHECK_S = 0.05  # how often a generation asks whether its client is still there


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


class _BodyLimit:
    """413 for a request that declares a body over `max_bytes`, before anything reads it. Plain
    ASGI: an `@app.middleware("http")` function would pass every event of every stream through a
    task and a queue of its own (Starlette's BaseHTTPMiddleware): 64 streaming clients of a
    tiny model on the CPU got 1.28x more tokens/s without it (benchmarks/RESULTS.md)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                response = JSONResponse(_error_body(f"request body over {self.max_bytes} bytes", "invalid_request_error"),
                                        status_code=413)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


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
    # Extensions that vLLM and others accept too.
    top_k: int | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]  # text or token ids; one prompt per request
    echo: bool = False
    logprobs: int | None = None


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[dict]


class ChatRequest(_Common):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None


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

    app.add_middleware(_BodyLimit, max_bytes=settings.max_request_bytes)

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

    def sampling_params(body: _Common, prompt_ids: list[int], extra_stop: tuple[str, ...] = (),
                        logprobs: int | None = None, min_tokens: int = 1) -> SamplingParams:
        if body.model not in (None, engine.name):
            raise ApiError(404, f"model '{body.model}' not found; this server has '{engine.name}'",
                           kind="not_found_error", param="model")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        if body.presence_penalty or body.frequency_penalty:
            raise ApiError(400, "presence_penalty and frequency_penalty are not supported; "
                                "use repetition_penalty", param="presence_penalty")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        if logprobs is not None and body.stream:
            raise ApiError(400, "logprobs are reported without stream only", param="logprobs")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        room = engine.room(prompt_ids)
        if room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, the model's context is "
                                f"{engine.context_length}", param="prompt")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        if max_tokens is None:
            max_tokens = min(settings.default_max_tokens, room)
        elif not min_tokens <= max_tokens <= room:
            raise ApiError(400, f"max_tokens must be in [{min_tokens}, {room}]: the prompt has {len(prompt_ids)} "
                                f"tokens of the model's context of {engine.context_length}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4:
            raise ApiError(400, "at most 4 stop sequences", param="stop")
        defaults = settings.defaults

        def given(value, default):
            return default if value is None else value

        # (max_tokens 0, scoring an echoed prompt: nothing is generated, the other settings are still checked)
        params = SamplingParams(max(max_tokens, 1), given(body.temperature, defaults.temperature),
                                given(body.top_p, defaults.top_p), given(body.top_k, defaults.top_k),
                                given(body.repetition_penalty, defaults.repetition_penalty),
                                tuple(stop) + extra_stop, body.seed, body.ignore_eos, logprobs)
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

        async def deltas(generation: GenerationStream, watch: bool = True):
            """The generation's text pieces; stops it when the client goes away (`watch`: asked at
            most every DISCONNECT_CHECK_S: the question costs a receive and a cancel scope, which
            per token adds up with many clients). An event stream does not ask: Starlette's
            StreamingResponse listens for the disconnect itself and cancels the stream."""
            checked = time.monotonic()
            try:
                async for delta in generation.deltas():
                    yield delta
                    if watch and time.monotonic() - checked > DISCONNECT_CHECK_S:
                        checked = time.monotonic()
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
                answer = await final_body(text, generation)  # in the slot: it may score the prompt
            finally:
                limiter.release()
            return JSONResponse({"id": request_id, "created": created, "model": engine.name, **answer,
                                 "usage": _usage(generation)})

        async def events():
            generation = engine.stream(prompt_ids, params, asyncio.get_running_loop())
            if chat:
                yield chunk(opening=True)
            try:
                async for delta in deltas(generation, watch=False):
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

    def completion_logprobs(entries: list[tuple[int, TokenLogprob | None]]) -> dict:
        """OpenAI's legacy logprobs object; text_offset counts characters of the returned text."""
        tokens, values, tops, offsets = [], [], [], []
        offset = 0
        for token, scored in entries:
            text = engine.token_text(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            if scored is None:  # the first prompt token: nothing before it to predict it from
                values.append(None)
                tops.append(None)
                continue
            value, top = scored
            values.append(value)
            alternatives = {engine.token_text(t): v for t, v in top}
            alternatives.setdefault(text, value)  # the token itself is always listed, as vLLM does
            tops.append(alternatives)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    async def echoed_prompt(prompt_ids: list[int], top: int | None) -> list[tuple[int, TokenLogprob | None]]:
        if top is None:
            return []
        scored = await anyio.to_thread.run_sync(engine.prompt_logprobs, prompt_ids, top) if len(prompt_ids) > 1 else []
        return [(prompt_ids[0], None), *zip(prompt_ids[1:], scored)]

    # ------------------------------------------------------------- /v1/completions
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) or \
            (body.prompt and isinstance(body.prompt[0], int)) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "give one prompt per request", param="prompt")
        prompt = prompts[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ApiError(400, "the prompt is empty", param="prompt")
            prompt_ids = engine.encode(prompt)
        else:
            prompt_ids = list(prompt)
            if any(not 0 <= token < engine.vocab_size for token in prompt_ids):
                raise ApiError(400, f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
            prompt = engine.clean(engine.tokenizer.decode(prompt_ids))
        if body.echo and body.stream:
            raise ApiError(400, "echo is answered without stream only", param="echo")
        scoring_only = body.echo and (body.max_tokens == 0 or body.max_completion_tokens == 0)
        params = sampling_params(body, prompt_ids, logprobs=body.logprobs, min_tokens=0 if body.echo else 1)
        top = body.logprobs if body.echo else None

        async def final_body(text: str, generation: GenerationStream | None) -> dict:
            logprobs = None
            if body.logprobs is not None:
                generated = [] if generation is None else list(zip(generation.reported_ids, generation.logprobs))
                logprobs = completion_logprobs(await echoed_prompt(prompt_ids, top) + generated)
            return {"object": "text_completion", "choices": [
                {"index": 0, "text": (prompt if body.echo else "") + text, "logprobs": logprobs,
                 "finish_reason": "length" if generation is None else generation.finish_reason}]}

        if scoring_only:  # nothing to generate: the prompt's log-probabilities, in a slot like any request
            await limiter.acquire()
            try:
                answer = await final_body("", None)
            finally:
                limiter.release()
            return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.name,
                                 **answer, "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 0,
                                                     "total_tokens": len(prompt_ids)}})
        return await respond(request, body, prompt_ids, params, chat=False, final_body=final_body)

    # -------------------------------------------------------- /v1/chat/completions
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": _message_text(m, i)} for i, m in enumerate(body.messages)]
        if not any(m["role"] == "user" and m["content"].strip() for m in messages):
            raise ApiError(400, "messages need at least one non-empty user message", param="messages")
        prompt_ids, template_stop = engine.chat_ids(messages)
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params = sampling_params(body, prompt_ids, template_stop, logprobs=(body.top_logprobs or 0) if body.logprobs
                                 else None)

        def chat_token(token: int, value: float) -> dict:
            text = engine.token_text(token)
            return {"token": text, "logprob": value, "bytes": list(text.encode())}

        async def final_body(text: str, generation: GenerationStream) -> dict:
            logprobs = None
            if body.logprobs:
                logprobs = {"content": [
                    {**chat_token(token, value), "top_logprobs": [chat_token(t, v) for t, v in top]}
                    for token, (value, top) in zip(generation.reported_ids, generation.logprobs)]}
            return {"object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                 "finish_reason": generation.finish_reason}]}

        return await respond(request, body, prompt_ids, params, chat=True, final_body=final_body)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(generation: GenerationStream) -> dict:
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
            "total_tokens": generation.prompt_tokens + generation.completion_tokens}
