"""``create_app()``: the FastAPI app of ``barkgpt serve``, an OpenAI-compatible API over one model.

Routes hand token ids to the :class:`~barkgpt.server.scheduler.Scheduler` (which owns the model
in its own thread) and turn the tokens it streams back into text with
:class:`~barkgpt.generate.TextDecoder` (incremental UTF-8, stop strings held back). Every error,
ours or FastAPI's, leaves as OpenAI's ``{"error": {"message", "type", "param", "code"}}``, as
llama-cpp-python's ``server/errors.py`` does. Nothing happens at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from barkgpt.common import BarkError
from barkgpt.generate import TextDecoder, TextGenerator
from barkgpt.server import protocol as P
from barkgpt.server.scheduler import QueueFull, SamplingParams, Scheduler

log = logging.getLogger("barkgpt.server")

MAX_BODY_BYTES = 1 << 20  # 1 MiB: larger request bodies get 413
DRAIN_MAX_BYTES = 64 << 20  # a refused body up to 64 MiB is read and dropped before the 413
RETRY_AFTER_S = 1  # the Retry-After of a 429
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
PUBLIC_PATHS = {"/health"}  # reachable without the API key


@dataclass
class ServerSettings:
    """What ``barkgpt serve`` passes to :func:`create_app`."""

    model_name: str = "barkgpt"  # the id in /v1/models
    api_key: str | None = None  # None: no authentication
    max_batch_size: int = 16  # requests decoded together
    max_queue: int = 256  # requests waiting for a row; more get 429
    cors_origins: list[str] = field(default_factory=list)  # empty: CORS off
    max_body_bytes: int = MAX_BODY_BYTES


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = P.ErrorResponse(error=P.ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.code))
        return JSONResponse(body.model_dump(), status_code=self.status, headers=self.headers)


class _Guard:
    """ASGI middleware: the API key (constant-time compare) and the body-size cap, before routing."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if self.api_key is not None and scope["path"] not in PUBLIC_PATHS and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                err = ApiError(401, "missing or wrong API key; send it as 'Authorization: Bearer KEY'",
                               "authentication_error", code="invalid_api_key")
                return await err.response()(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            await self._drain(receive, int(length))
            return await self._too_large().response()(scope, receive, send)
        # Read the body here (at most max_body_bytes), so a chunked body without Content-Length
        # is capped too, then hand it on; later receive() calls (disconnects) pass through.
        messages, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            size += len(message.get("body", b""))
            if size > self.max_body_bytes:
                if message.get("more_body"):
                    await self._drain(receive, size)
                return await self._too_large().response()(scope, receive, send)
            messages.append(message)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _drain(receive, length: int) -> None:
        """Read and drop a refused body (up to ``DRAIN_MAX_BYTES``) so the 413 reaches a client
        that sends its whole body before reading, instead of a connection reset."""
        if length > DRAIN_MAX_BYTES:
            return
        read = 0
        while read <= DRAIN_MAX_BYTES:
            message = await receive()
            read += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    def _too_large(self) -> ApiError:
        return ApiError(413, f"the request body is over {self.max_body_bytes} bytes", code="request_too_large")


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (``GET /metrics``, text format).

    Requests by route and status, prompt and generated tokens, time to first token and
    inter-token latency (seconds), and running/waiting requests (read from the scheduler when
    scraped). Names follow vLLM's ``vllm:*`` metrics with a ``barkgpt_`` prefix.
    """

    ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
              "/generate", "/tokenize", "/detokenize"}

    def __init__(self, running, waiting):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("barkgpt_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.prompt_tokens = Counter("barkgpt_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("barkgpt_generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram("barkgpt_time_to_first_token_seconds", "request arrival to first token", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("barkgpt_inter_token_latency_seconds", "time between two tokens of a request", registry=r,
                             buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
        Gauge("barkgpt_requests_running", "requests in the decode batch", registry=r).set_function(running)
        Gauge("barkgpt_requests_waiting", "requests queued for the decode batch", registry=r).set_function(waiting)

    def route(self, path: str) -> str:
        """A bounded route label: known routes as is, ``/v1/models/{id}``, else ``other``."""
        if path in self.ROUTES:
            return path
        return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"

    def render(self) -> bytes:
        """The registry in Prometheus text format."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class _CountRequests:
    """ASGI middleware (outermost): counts every response by route and status."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(self.metrics.route(scope["path"]), str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(generator: TextGenerator, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``generator``'s model; its scheduler thread runs while the app does.

    Args:
        generator: the model and its tokenizer (see :func:`barkgpt.generate.load_generator`).
        settings: name, API key, batch and queue sizes, CORS origins, body cap.
    """
    settings = settings or ServerSettings()
    tokenizer, block_size, name = generator.tokenizer, generator.block_size, settings.model_name
    state = {"scheduler": None, "started": time.time()}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler = Scheduler(generator.model, [tokenizer.eos_id], settings.max_batch_size, settings.max_queue)
        scheduler.start()
        state["scheduler"] = scheduler
        yield
        state["scheduler"] = None
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="BarkGPT", version="0.1.0", lifespan=lifespan)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(_Guard, api_key=settings.api_key, max_body_bytes=settings.max_body_bytes)
    sched_count = lambda attr: (lambda: getattr(state["scheduler"], attr) if state["scheduler"] else 0)  # noqa: E731
    metrics = ServerMetrics(sched_count("running"), sched_count("waiting"))
    app.add_middleware(_CountRequests, metrics=metrics)  # added last: runs first, sees 401/413 too

    # ---- errors: one shape for all -----------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(BarkError)
    async def _bark_error(request, exc: BarkError):
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = "the body is not valid JSON", None
        return ApiError(400, f"{param}: {msg}" if param else msg, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return ApiError(404, f"no route {request.method} {request.url.path}", "not_found_error").response()
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        log.exception("unhandled error")
        return ApiError(500, "internal server error", "server_error").response()

    # ---- helpers -----------------------------------------------------------------------------

    def scheduler() -> Scheduler:
        s = state["scheduler"]
        if s is None or not s.alive:
            raise ApiError(503, "the model is not ready yet", "service_unavailable_error", code="not_ready")
        return s

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{name}'",
                           "not_found_error", param="model", code="model_not_found")

    def sampling_for(ids: list[int], sampling: dict) -> SamplingParams:
        """Fill ``max_new_tokens`` (None: the rest of the context) and check the prompt fits."""
        room = block_size - len(ids)
        want = sampling["max_new_tokens"]
        if room < 1 or (want is not None and want > room):
            asked = f" and max_tokens is {want}" if want is not None else ""
            raise ApiError(400, f"the prompt has {len(ids)} tokens{asked}, but the model's context is "
                                f"{block_size} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens" if want is not None and room >= 1 else "prompt",
                           code="context_length_exceeded")
        return SamplingParams(**{**sampling, "max_new_tokens": want or room})

    async def encode(text: str) -> list[int]:
        """Prompt text -> ids off the event loop; an empty prompt starts from <EOS>."""
        if not text:
            return [tokenizer.eos_id]
        return await asyncio.to_thread(tokenizer.encode, text)

    def submit_all(jobs: list[tuple[list[int], SamplingParams]]) -> list:
        sched, reqs = scheduler(), []
        try:
            for ids, params in jobs:
                reqs.append(sched.submit(ids, params))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return reqs

    def prepare(body: P.Request, prompts: list[list[int]]) -> list[_Choice]:
        """Check each prompt fits, then submit ``n`` requests per prompt; choices come prompt-major, as OpenAI's."""
        jobs = []
        for ids in prompts:
            base = sampling_for(ids, body.sampling())
            for j in range(body.n):
                seed = None if base.seed is None else (base.seed + j) % 2**64  # n samples must differ
                jobs.append((ids, SamplingParams(**{**base.__dict__, "seed": seed})))
        reqs = submit_all(jobs)
        return [_Choice(r, tokenizer, body.stop, i, len(r.ids) if i % body.n == 0 else 0, metrics) for i, r in enumerate(reqs)]

    async def chat_prompt(body: P.ChatCompletionRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def ids_of(prompt) -> list[int]:
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.vocab_size})", param="prompt")
        return list(prompt) or [tokenizer.eos_id]

    # ---- routes ------------------------------------------------------------------------------

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        s = scheduler()
        return {"status": "ok", "model": name, "uptime_s": round(time.time() - state["started"], 3),
                "running": s.running, "waiting": s.waiting}

    def card() -> P.ModelCard:
        return P.ModelCard(id=name, created=int(state["started"]), max_model_len=block_size)

    @app.get("/v1/models", response_model=P.ModelList)
    async def list_models():
        return P.ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def get_model(model_id: str):
        check_model(model_id)
        return card()

    @app.post("/v1/completions", response_model=P.CompletionResponse)
    async def completions(body: P.CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [await encode(p) if isinstance(p, str) else ids_of(p) for p in body.prompts()]
        choices = prepare(body, prompts)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish, usage=None):
            cs = [] if i is None else [P.CompletionChoice(text=text, index=i, finish_reason=finish)]
            return P.CompletionResponse(id=rid, created=created, model=name, choices=cs, usage=usage)

        if body.stream:
            return _sse(_stream_choices(choices, chunk, body.include_usage, first=None))
        await _collect(choices, request)
        return P.CompletionResponse(id=rid, created=created, model=name, usage=_usage(choices), choices=[
            P.CompletionChoice(text=c.text, index=c.index, finish_reason=c.finish_reason) for c in choices])

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        choices = prepare(body, [await chat_prompt(body)])
        for c in choices:
            c.lstrip = True  # the reply continues the template's "Assistant:"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish, usage=None, role=None):
            cs = [] if i is None else [P.ChatChunkChoice(
                index=i, delta=P.DeltaMessage(role=role, content=None if finish else text), finish_reason=finish)]
            return P.ChatCompletionChunk(id=rid, created=created, model=name, choices=cs, usage=usage)

        if body.stream:
            return _sse(_stream_choices(choices, chunk, body.include_usage, first="assistant"))
        await _collect(choices, request)
        return P.ChatCompletionResponse(id=rid, created=created, model=name, usage=_usage(choices), choices=[
            P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text), finish_reason=c.finish_reason)
            for c in choices])

    @app.post("/generate", response_model=P.GenerateResponse)
    async def generate(body: P.GenerateRequest, request: Request):
        ids = await encode(body.prompt)
        choices = [_Choice(r, tokenizer, body.stop, 0, len(ids), metrics) for r in submit_all([(ids, sampling_for(ids, body.sampling()))])]
        await _collect(choices, request)
        return P.GenerateResponse(message=choices[0].text)

    @app.post("/tokenize", response_model=P.TokenizeResponse)
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        ids = await asyncio.to_thread(tokenizer.encode, body.prompt)
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=block_size)

    @app.post("/detokenize", response_model=P.DetokenizeResponse)
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        return P.DetokenizeResponse(prompt=tokenizer.decode(ids_of(body.tokens)))

    return app


class _Choice:
    """One choice of a response: consumes its scheduler request and yields text pieces."""

    def __init__(self, req, tokenizer, stop: list[str], index: int, prompt_tokens: int = 0, metrics: ServerMetrics | None = None):
        self.req, self.index, self.prompt_tokens, self.metrics = req, index, prompt_tokens, metrics
        self.t_last = time.perf_counter()  # arrival, then the time of the latest token
        self.decoder = TextDecoder(tokenizer, stop)
        self.lstrip = False  # strip whitespace before the first visible text
        self.text = ""

    @property
    def finish_reason(self) -> str:
        return self.decoder.finish_reason

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as tokens arrive; cancels the request when it stops early or is abandoned."""
        n_seen = 0
        try:
            async for t in self.req:
                if self.metrics is not None:
                    now = time.perf_counter()
                    (self.metrics.itl if n_seen else self.metrics.ttft).observe(now - self.t_last)
                    self.t_last, n_seen = now, n_seen + 1
                piece = self._visible(self.decoder.add(t))
                if piece:
                    yield piece
                if self.decoder.done:  # EOS or a stop string: the request may still be running
                    return
            piece = self._visible(self.decoder.flush())
            if piece:
                yield piece
        finally:
            self.req.cancel()  # no-op when it already finished; frees the row otherwise
            if self.metrics is not None:
                self.metrics.prompt_tokens.inc(self.prompt_tokens)
                self.metrics.generation_tokens.inc(n_seen)

    def _visible(self, piece: str) -> str:
        if self.lstrip and not self.text:
            piece = piece.lstrip()
        self.text += piece
        return piece


def _usage(choices: list[_Choice]) -> P.Usage:
    """Token counts; a prompt shared by ``n`` choices counts once, as OpenAI's."""
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.decoder.n_tokens for c in choices)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def _collect(choices: list[_Choice], request: Request) -> None:
    """Run every choice to the end; a client that goes away cancels them."""

    async def drain(c: _Choice):
        async for _ in c.pieces():
            pass

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        for c in choices:
            c.req.cancel()

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.gather(*(drain(c) for c in choices))
    finally:
        watcher.cancel()
        for c in choices:
            c.req.cancel()


async def _stream_choices(choices: list[_Choice], chunk, include_usage: bool, first: str | None):
    """Chunks of every choice as they come (interleaved), one finishing chunk each, then usage.

    ``first`` is the role sent in each choice's first delta (chat), or None (completions).
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: _Choice):
        try:
            async for piece in c.pieces():
                await queue.put((c, piece, None))
            await queue.put((c, None, c.finish_reason))
        except Exception as e:  # noqa: BLE001 - reported in the stream
            await queue.put((c, None, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        if first is not None:
            for c in choices:
                yield chunk(c.index, "", None, role=first)
        left = len(choices)
        while left:
            c, piece, end = await queue.get()
            if isinstance(end, Exception):
                raise end
            if end is not None:
                left -= 1
                yield chunk(c.index, "", end)
            else:
                yield chunk(c.index, piece, None)
        if include_usage:
            yield chunk(None, "", None, usage=_usage(choices))
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            c.req.cancel()


def _sse(chunks) -> StreamingResponse:
    """Server-sent events: ``data: {json}`` per chunk, then ``data: [DONE]``; a late error is an event."""

    async def body():
        try:
            async for c in chunks:
                yield f"data: {c.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            log.exception("error while streaming")
            info = P.ErrorInfo(message=f"generation failed: {type(e).__name__}", type="server_error")
            yield f"data: {json.dumps({'error': info.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
