"""``create_app()``: the FastAPI app of ``barkgpt serve``, an OpenAI-compatible API over one model,
and ``run_server()``, which serves it with uvicorn.

Routes hand token ids to the :class:`~barkgpt.server.scheduler.Scheduler` (which owns the model
in its own thread) and turn the tokens it streams back into text with
:class:`~barkgpt.generate.TextDecoder` (incremental UTF-8, stop strings held back). Every error,
ours or FastAPI's, leaves as OpenAI's ``{"error": {"message", "type", "param", "code"}}``, as
llama-cpp-python's ``server/errors.py`` does; a core error's text loses its absolute paths on
the way (:func:`~barkgpt.server.errors.scrub_paths`). Before routing, every request passes the
checks of :class:`~barkgpt.server.security.Guard` (Host, API key, Origin, Content-Type, body
size). Nothing happens at import time.

Lifecycle: :func:`run_server` opens the port first and loads the model in a background thread;
until it is loaded, ``/health`` and every model route answer 503. On SIGTERM (or Ctrl-C) the port
closes, new requests are refused, and running ones get ``shutdown_timeout`` seconds to finish;
those still running then end with an error (an ``error`` event in a stream), and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import signal
import threading
import time
import uuid
from typing import AsyncIterator, Callable, NamedTuple

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from barkgpt.common import BarkError
from barkgpt.config import SamplingParams, ServeConfig
from barkgpt.engine import Engine
from barkgpt.generate import TextDecoder, TextGenerator
from barkgpt.server import protocol as P
from barkgpt.server import web
from barkgpt.server.errors import ApiError, scrub_paths
from barkgpt.server.scheduler import QueueFull, Scheduler, ShuttingDown
from barkgpt.server.security import Guard

log = logging.getLogger("barkgpt.server")

RETRY_AFTER_S = 1  # the Retry-After of a 429 or of a 503 while the model loads
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there
PREFIX_CACHE_BYTES = 256 << 20  # KV entries the prefix cache holds at most (bytes), least recently used dropped first
SHUTDOWN_GRACE_S = 5.0  # after shutdown_timeout, how long requests get to send their error before uvicorn cancels them
PUBLIC_PATHS = {"/health", *web.PAGES}  # reachable without the API key (and web.STATIC_PREFIX/...)


class ServerMetrics:
    """Prometheus metrics of one app, in their own registry (``GET /metrics``, text format).

    Requests by route and status, prompt and generated tokens, time to first token and
    inter-token latency (seconds), running/waiting requests, and the prefix cache's prompt
    tokens looked up, tokens reused, hit rate (reused / looked up) and tokens held (read from
    the scheduler when scraped). Names follow vLLM's ``vllm:*`` metrics with a ``barkgpt_`` prefix.

    Args:
        running: a zero-argument callable giving the requests decoding now.
        waiting: a zero-argument callable giving the requests queued for a row.
        prefix_cache: a zero-argument callable giving the served engine's
            :class:`~barkgpt.engine.PrefixCache`, or None (off, or no model yet).
    """

    ROUTES = {"/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
              "/generate", "/tokenize", "/detokenize"}

    def __init__(self, running, waiting, prefix_cache=lambda: None):
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
        stat = lambda fn: (lambda: fn(prefix_cache()) if prefix_cache() is not None else 0)  # noqa: E731
        Gauge("barkgpt_prefix_cache_queries", "prompt tokens looked up in the prefix cache", registry=r).set_function(
            stat(lambda c: c.queries))
        Gauge("barkgpt_prefix_cache_hits", "prompt tokens reused from the prefix cache instead of prefilled",
              registry=r).set_function(stat(lambda c: c.hits))
        Gauge("barkgpt_prefix_cache_hit_rate", "prefix cache hits / queries (tokens)", registry=r).set_function(
            stat(lambda c: c.hits / c.queries if c.queries else 0.0))
        Gauge("barkgpt_prefix_cache_tokens", "tokens held in the prefix cache", registry=r).set_function(stat(lambda c: c.tokens))

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


class ModelHost:
    """The model side of one app: the generator and its scheduler once loaded, and shutdown.

    ``barkgpt serve`` opens the port first and loads the model in a background thread, which
    calls :meth:`attach`; until then, and from the start of shutdown on, :meth:`ready` raises a 503.
    A later :meth:`attach` (the web page's "chat with this run") switches the served model.

    Args:
        settings: batch and queue sizes of the scheduler, the model id, the shutdown timeout.
    """

    def __init__(self, settings: ServeConfig):
        self.settings = settings
        self.name = settings.model_name or "barkgpt"  # the model id in /v1/models and responses
        self.generator: TextGenerator | None = None
        self.scheduler: Scheduler | None = None
        self.draining = False  # shutdown began: refuse new requests
        self._closed = False
        self._lock = threading.Lock()

    def attach(self, generator: TextGenerator, name: str | None = None) -> None:
        """Start a scheduler on ``generator``'s model; the model routes serve it from then on, as
        model id ``name`` (None: keep the id).

        The scheduler's engine compiles its decode step first (``settings.compile``; seconds to
        tens of seconds, so call this off the event loop), and has a prefix cache with
        ``settings.prefix_cache``. A model attached before is retired: its running requests
        finish (for up to ``shutdown_timeout`` seconds) in a background thread, then its
        scheduler stops. Callable from any thread; a no-op once :meth:`close` ran.
        """
        s = self.settings
        engine = Engine(generator.model, compile=s.compile, prefix_cache_bytes=PREFIX_CACHE_BYTES if s.prefix_cache else 0)
        scheduler = Scheduler(engine, [generator.tokenizer.eos_id], s.max_batch_size, s.max_queue)
        scheduler.start()  # compiles first (with settings.compile): outside the lock, which ready() takes
        with self._lock:
            if self._closed:
                scheduler.stop()
                return
            old = self.scheduler
            self.generator, self.scheduler, self.name = generator, scheduler, name or self.name
        if old is not None:
            threading.Thread(target=self._retire, args=(old,), name="barkgpt-retire", daemon=True).start()

    def _retire(self, scheduler: Scheduler) -> None:
        """Let a replaced scheduler's requests finish (up to ``shutdown_timeout``), then stop it."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        while (scheduler.running or scheduler.waiting) and time.monotonic() < deadline and not self._closed:
            time.sleep(0.05)
        scheduler.stop()

    def ready(self) -> tuple[TextGenerator, Scheduler]:
        """The generator and its running scheduler.

        Raises:
            ApiError: 503 while the model loads, once shutdown began, or after the worker died.
        """
        if self.draining:
            raise ApiError(503, "the server is shutting down", "service_unavailable_error", code="shutting_down")
        with self._lock:  # the pair, never one model's generator with another's scheduler
            generator, scheduler = self.generator, self.scheduler
        if scheduler is None:
            raise ApiError(503, "the model is still loading; retry shortly", "service_unavailable_error",
                           code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if not scheduler.alive:
            raise ApiError(503, "the model is not available (its worker stopped)", "service_unavailable_error",
                           code="not_ready")
        return generator, scheduler

    def stop_generating(self) -> None:
        """End every waiting and running request now (with :class:`ShuttingDown`), without waiting."""
        if self.scheduler is not None:
            self.scheduler.stop(timeout=0)

    def close(self) -> None:
        """Stop the scheduler and join its thread; a later :meth:`attach` does nothing."""
        with self._lock:
            self._closed = True
        if self.scheduler is not None:
            self.scheduler.stop()


def create_app(generator: TextGenerator | None = None, settings: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``generator``'s model; its scheduler thread runs while the app does.

    Args:
        generator: the model and its tokenizer (see :func:`barkgpt.generate.load_generator`), or
            None to plug one in later with ``app.state.host.attach(generator)`` (see
            :class:`ModelHost`); until then ``/health`` and the model routes answer 503.
        settings: name (None: ``barkgpt``), API key, batch and queue sizes, CORS origins, body cap.
    """
    settings = settings or ServeConfig()
    host, started = ModelHost(settings), time.time()
    runs = web.TrainingRuns(settings.runs, settings.data_root, settings.max_run_params, settings.max_run_memory)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if generator is not None:
            host.attach(generator)
        yield
        await asyncio.to_thread(runs.close)
        await asyncio.to_thread(host.close)

    app = FastAPI(title="BarkGPT", version="0.1.0", lifespan=lifespan, redoc_url=None)
    app.state.host = host
    if settings.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin, allow_methods=["*"], allow_headers=["*"])
    public = lambda path: path in PUBLIC_PATHS or path.startswith(web.STATIC_PREFIX)  # noqa: E731
    app.add_middleware(Guard, settings=settings, public=public)  # before routing (and before CORS)
    sched_count = lambda attr: (lambda: getattr(host.scheduler, attr) if host.scheduler else 0)  # noqa: E731
    metrics = ServerMetrics(sched_count("running"), sched_count("waiting"),
                            lambda: host.scheduler.engine.prefix_cache if host.scheduler else None)
    app.add_middleware(_CountRequests, metrics=metrics)  # added last: runs first, sees 401/413 too

    @functools.lru_cache(maxsize=1 << 16)
    def token_text_bytes(tokenizer, i: int) -> tuple[str, list[int]]:
        """One token's own text and raw UTF-8 bytes (for logprobs); in the text, a byte of a
        multi-byte character shows as U+FFFD, the bytes are exact."""
        return tokenizer.decode([i]), list(tokenizer.id_to_bytes(i))

    # ---- errors: one shape for all -----------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(BarkError)
    async def _bark_error(request, exc: BarkError):
        return ApiError(400, scrub_paths(str(exc), runs.path_labels())).response()

    @app.exception_handler(UnicodeError)
    async def _unicode_error(request, exc: UnicodeError):  # a lone surrogate that got past the schemas
        return ApiError(400, "the request holds text that is not valid Unicode (a lone surrogate such as \\ud800?); "
                             "send valid UTF-8").response()

    @app.exception_handler(ShuttingDown)
    async def _shutting_down(request, exc: ShuttingDown):
        return _shutdown_error().response()

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

    def check_model(model: str | None) -> None:
        if model is not None and model != host.name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{host.name}'",
                           "not_found_error", param="model", code="model_not_found")

    def sampling_for(ids: list[int], body, block_size: int) -> SamplingParams:
        """``body``'s :class:`SamplingParams` (``max_new_tokens`` None: the rest of the context),
        once the prompt is checked to fit."""
        room = block_size - len(ids)
        want = body.requested_max_tokens()
        if room < 1 or (want is not None and want > room):
            asked = f" and max_tokens is {want}" if want is not None else ""
            raise ApiError(400, f"the prompt has {len(ids)} tokens{asked}, but the model's context is "
                                f"{block_size} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens" if want is not None and room >= 1 else "prompt",
                           code="context_length_exceeded")
        return body.sampling_params(room)

    async def encode(gen: TextGenerator, text: str) -> list[int]:
        """Prompt text -> ids off the event loop; an empty prompt starts from <EOS>."""
        if not text:
            return [gen.tokenizer.eos_id]
        return await asyncio.to_thread(gen.tokenizer.encode, text)

    def submit_all(sched: Scheduler, jobs: list[tuple[list[int], SamplingParams]]) -> list:
        reqs = []
        try:
            for ids, params in jobs:
                reqs.append(sched.submit(ids, params))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise ApiError(429, f"the server is busy ({e}); retry shortly", "rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return reqs

    def prepare(body: P.Request, prompts: list[list[int]], gen: TextGenerator, sched: Scheduler) -> list[_Choice]:
        """Check each prompt fits, then submit ``n`` requests per prompt, queued together so the
        scheduler prefills each prompt once; choices come prompt-major, as OpenAI's.

        Raises:
            ApiError: 400 when a prompt does not fit, or when the request needs more queue places
                (``n`` x prompts) than ``max_queue``: it could never be queued, so a 429 would
                have clients retry forever; 429 when the queue is full now.
        """
        if body.n * len(prompts) > sched.max_queue:
            raise ApiError(400, f"this request asks for {body.n * len(prompts)} generations (n {body.n} x {len(prompts)} "
                                f"prompt(s)), more than the {sched.max_queue} this server queues (--max-queue); "
                                "lower n or send fewer prompts per request", param="n", code="too_many_generations")
        jobs = []
        for ids in prompts:
            base = sampling_for(ids, body, gen.block_size)
            for j in range(body.n):
                seed = None if base.seed is None else (base.seed + j) % 2**64  # n samples must differ
                jobs.append((ids, dataclasses.replace(base, seed=seed)))
        reqs = submit_all(sched, jobs)
        text_of = functools.partial(token_text_bytes, gen.tokenizer)
        return [_Choice(r, gen.tokenizer, body.stop, i, len(r.ids) if i % body.n == 0 else 0, metrics, text_of)
                for i, r in enumerate(reqs)]

    async def chat_prompt(body: P.ChatCompletionRequest, gen: TextGenerator) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        return await encode(gen, gen.chat_prompt(messages))

    def ids_of(prompt, gen: TextGenerator) -> list[int]:
        vocab_size = gen.tokenizer.vocab_size
        if any(not 0 <= t < vocab_size for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
        return list(prompt) or [gen.tokenizer.eos_id]

    # ---- routes ------------------------------------------------------------------------------

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health")
    async def health():
        _, s = host.ready()
        return {"status": "ok", "model": host.name, "uptime_s": round(time.time() - started, 3),
                "running": s.running, "waiting": s.waiting, "compile": s.engine.compile}

    def card() -> P.ModelCard:
        gen, _ = host.ready()
        return P.ModelCard(id=host.name, created=int(started), max_model_len=gen.block_size)

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
        gen, sched = host.ready()
        prompts = [await encode(gen, p) if isinstance(p, str) else ids_of(p, gen) for p in body.prompts()]
        choices = prepare(body, prompts, gen, sched)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish, usage=None, logprobs=None):
            cs = [] if i is None else [P.CompletionChoice(text=text, index=i, logprobs=_completion_logprobs(logprobs),
                                                          finish_reason=finish)]
            return P.CompletionResponse(id=rid, created=created, model=host.name, choices=cs, usage=usage)

        if body.stream:
            return _sse(_stream_choices(choices, chunk, body.include_usage, first=None))
        await _collect(choices, request)
        return P.CompletionResponse(id=rid, created=created, model=host.name, usage=_usage(choices), choices=[
            P.CompletionChoice(text=c.text, index=c.index, logprobs=_completion_logprobs(c.logprobs),
                               finish_reason=c.finish_reason) for c in choices])

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request):
        check_model(body.model)
        gen, sched = host.ready()
        choices = prepare(body, [await chat_prompt(body, gen)], gen, sched)
        for c in choices:
            c.lstrip = True  # the reply continues the template's "Assistant:"
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(i, text, finish, usage=None, role=None, logprobs=None):
            cs = [] if i is None else [P.ChatChunkChoice(
                index=i, delta=P.DeltaMessage(role=role, content=None if finish else text),
                logprobs=_chat_logprobs(logprobs), finish_reason=finish)]
            return P.ChatCompletionChunk(id=rid, created=created, model=host.name, choices=cs, usage=usage)

        if body.stream:
            return _sse(_stream_choices(choices, chunk, body.include_usage, first="assistant"))
        await _collect(choices, request)
        return P.ChatCompletionResponse(id=rid, created=created, model=host.name, usage=_usage(choices), choices=[
            P.ChatChoice(index=c.index, message=P.AssistantMessage(content=c.text), logprobs=_chat_logprobs(c.logprobs),
                         finish_reason=c.finish_reason) for c in choices])

    @app.post("/generate", response_model=P.GenerateResponse)
    async def generate(body: P.GenerateRequest, request: Request):
        gen, sched = host.ready()
        ids = await encode(gen, body.prompt)
        reqs = submit_all(sched, [(ids, sampling_for(ids, body, gen.block_size))])
        choices = [_Choice(reqs[0], gen.tokenizer, body.stop, 0, len(ids), metrics)]
        await _collect(choices, request)
        return P.GenerateResponse(message=choices[0].text)

    @app.post("/tokenize", response_model=P.TokenizeResponse)
    async def tokenize(body: P.TokenizeRequest):
        check_model(body.model)
        gen, _ = host.ready()
        ids = await asyncio.to_thread(gen.tokenizer.encode, body.prompt)
        return P.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=gen.block_size)

    @app.post("/detokenize", response_model=P.DetokenizeResponse)
    async def detokenize(body: P.DetokenizeRequest):
        check_model(body.model)
        gen, _ = host.ready()
        return P.DetokenizeResponse(prompt=gen.tokenizer.decode(ids_of(body.tokens, gen)))

    web.add_routes(app, host, runs)
    return app


class _Server(uvicorn.Server):
    """uvicorn's server with BarkGPT's shutdown: once uvicorn has stopped accepting connections,
    refuse new requests on open ones (503), and after ``shutdown_timeout`` seconds end the
    requests still running (an error, or an ``error`` event in a stream)."""

    def __init__(self, config: uvicorn.Config, host: ModelHost, shutdown_timeout: float):
        super().__init__(config)
        self.host, self.shutdown_timeout = host, shutdown_timeout

    async def shutdown(self, sockets=None) -> None:
        """uvicorn's graceful shutdown, with the requests' deadline set first."""
        self.host.draining = True
        running = self.host.scheduler.running + self.host.scheduler.waiting if self.host.scheduler else 0
        if running:
            log.warning("shutting down: %d request(s) still running get %.0f s to finish", running, self.shutdown_timeout)
        asyncio.get_running_loop().call_later(self.shutdown_timeout, self.host.stop_generating)
        await super().shutdown(sockets)


def run_server(load: Callable[[], TextGenerator], settings: ServeConfig) -> None:
    """Serve on ``settings.host:settings.port`` until SIGTERM or Ctrl-C.

    The port opens at once and ``load`` runs in a background thread; ``/health`` and the model
    routes answer 503 until it returns. On SIGTERM, running requests get
    ``settings.shutdown_timeout`` seconds to finish, then this returns (so the process exits 0).

    Raises:
        Exception: whatever ``load`` raised; the server stops as soon as it fails.
        KeyboardInterrupt: after the graceful shutdown that Ctrl-C starts.
        SystemExit: uvicorn could not bind the port (it logs why).
    """
    app = create_app(None, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_GRACE_S)
    server = _Server(config, app.state.host, settings.shutdown_timeout)
    failed: list[Exception] = []

    def load_in_background():
        try:
            app.state.host.attach(load())
        except Exception as e:  # noqa: BLE001 - re-raised by run_server, in the main thread
            failed.append(e)
            server.should_exit = True

    threading.Thread(target=load_in_background, name="barkgpt-load", daemon=True).start()
    main = threading.current_thread() is threading.main_thread()
    # uvicorn re-raises the signal it stopped on, under the handler it found before it started:
    # a no-op SIGTERM handler lets a graceful stop end with exit status 0.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        server.run()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if failed:
        raise failed[0]


class _TokenLogprob(NamedTuple):
    """One generated token's logprob entry: its text, logprob, top (text, logprob) pairs, its
    character offset in the choice's text (the sum of the earlier tokens' text lengths), and the
    raw UTF-8 bytes of the token and of each top entry (exact even where the text shows U+FFFD)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int
    bytes: list[int]
    top_bytes: list[list[int]]


class _Choice:
    """One choice of a response: consumes its scheduler request and yields text pieces.

    When the request asked for logprobs, ``logprobs`` collects one :class:`_TokenLogprob` per token
    (the EOS included, as ``usage`` counts it); :meth:`take_logprobs` hands a stream the new ones.
    """

    def __init__(self, req, tokenizer, stop: list[str], index: int, prompt_tokens: int = 0,
                 metrics: ServerMetrics | None = None, token_text_bytes: Callable[[int], tuple[str, list[int]]] | None = None):
        self.req, self.index, self.prompt_tokens, self.metrics = req, index, prompt_tokens, metrics
        self.t_last = time.perf_counter()  # arrival, then the time of the latest token
        self.decoder = TextDecoder(tokenizer, stop)
        self.lstrip = False  # strip whitespace before the first visible text
        self.text = ""
        self.logprobs: list[_TokenLogprob] | None = [] if req.params.logprobs is not None else None
        self._token_text_bytes, self._taken = token_text_bytes, 0

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (EOS or a stop string) or ``"length"``."""
        return self.decoder.finish_reason

    def take_logprobs(self) -> list[_TokenLogprob] | None:
        """The logprob entries not taken yet (None when the request did not ask for logprobs)."""
        if self.logprobs is None:
            return None
        new, self._taken = self.logprobs[self._taken:], len(self.logprobs)
        return new

    async def pieces(self) -> AsyncIterator[str]:
        """Text pieces as tokens arrive; cancels the request when it stops early or is abandoned."""
        n_seen = 0
        try:
            async for t in self.req:
                if self.metrics is not None:
                    now = time.perf_counter()
                    (self.metrics.itl if n_seen else self.metrics.ttft).observe(now - self.t_last)
                    self.t_last = now
                if self.logprobs is not None:
                    self._add_logprob(t, n_seen)
                n_seen += 1
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

    def _add_logprob(self, t: int, i: int) -> None:
        """Record token ``t``, the ``i``-th of the reply, with the logprobs the scheduler computed."""
        logprob, top = self.req.logprobs[i]
        prev = self.logprobs[-1] if self.logprobs else None
        offset = prev.offset + len(prev.token) if prev else 0
        token, token_bytes = self._token_text_bytes(t)
        tops = [self._token_text_bytes(j) for j, _ in top]  # (text, bytes) of each top id
        self.logprobs.append(_TokenLogprob(token, logprob, [(text, lp) for (text, _), (_, lp) in zip(tops, top)], offset,
                                           token_bytes, [b for _, b in tops]))

    def _visible(self, piece: str) -> str:
        if self.lstrip and not self.text:
            piece = piece.lstrip()
        self.text += piece
        return piece


def _chat_logprobs(entries: list[_TokenLogprob] | None) -> P.ChatLogprobs | None:
    """Chat's ``logprobs`` object of some tokens (None for none), with each token's raw UTF-8 bytes."""
    if not entries:
        return None
    return P.ChatLogprobs(content=[
        P.TokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes, top_logprobs=[
            P.TopLogprob(token=t, logprob=lp, bytes=b) for (t, lp), b in zip(e.top, e.top_bytes)]) for e in entries])


def _completion_logprobs(entries: list[_TokenLogprob] | None) -> P.CompletionLogprobs | None:
    """The legacy completions ``logprobs`` object of some tokens (None for none)."""
    if not entries:
        return None
    return P.CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                                top_logprobs=[dict(e.top) for e in entries], text_offset=[e.offset for e in entries])


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

    ``first`` is the role sent in each choice's first delta (chat), or None (completions). Each
    chunk carries the logprobs of the tokens that arrived since the choice's previous chunk.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: _Choice):
        try:
            async for piece in c.pieces():
                await queue.put((c, piece, c.take_logprobs(), None))
            await queue.put((c, None, c.take_logprobs(), c.finish_reason))
        except Exception as e:  # noqa: BLE001 - reported in the stream
            await queue.put((c, None, None, e))

    tasks = [asyncio.create_task(pump(c)) for c in choices]
    try:
        if first is not None:
            for c in choices:
                yield chunk(c.index, "", None, role=first)
        left = len(choices)
        while left:
            c, piece, logprobs, end = await queue.get()
            if isinstance(end, Exception):
                raise end
            if end is not None:
                left -= 1
                yield chunk(c.index, "", end, logprobs=logprobs)
            else:
                yield chunk(c.index, piece, None, logprobs=logprobs)
        if include_usage:
            yield chunk(None, "", None, usage=_usage(choices))
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            c.req.cancel()


def _shutdown_error() -> ApiError:
    """What a request cut short by the shutdown timeout gets."""
    return ApiError(503, "the server shut down before this request finished; retry it", "service_unavailable_error",
                    code="shutting_down")


def _sse(chunks) -> StreamingResponse:
    """Server-sent events: ``data: {json}`` per chunk, then ``data: [DONE]``; a late error is an event."""

    async def body():
        try:
            async for c in chunks:
                yield f"data: {c.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            if isinstance(e, ShuttingDown):
                info = _shutdown_error().info()
            else:
                log.exception("error while streaming")
                info = P.ErrorInfo(message=f"generation failed: {type(e).__name__}", type="server_error")
            yield f"data: {json.dumps({'error': info.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
