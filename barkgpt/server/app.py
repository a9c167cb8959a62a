"""``create_app()``: the FastAPI app of ``barkgpt serve``, an OpenAI-compatible API over one model,
and ``run_server()``, which serves it with uvicorn. This module only wires the app; each concern
lives beside it:

- :mod:`~barkgpt.server.serving` the OpenAI routes (and ``/generate``, ``/tokenize``,
  ``/detokenize``, ``/health``, ``/metrics``), with :mod:`~barkgpt.server.streaming` turning the
  scheduler's tokens into text, logprobs and server-sent events;
- :mod:`~barkgpt.server.host` the model and its :class:`~barkgpt.server.scheduler.Scheduler`
  (which owns the model in its own thread);
- :mod:`~barkgpt.server.security` the checks every request passes before routing
  (:class:`~barkgpt.server.security.Guard`: Host, API key, Origin, Content-Type, body size);
- :mod:`~barkgpt.server.metrics` the Prometheus metrics and the request counter;
- :mod:`~barkgpt.server.errors` the exception handlers: every error, ours or FastAPI's, leaves as
  OpenAI's ``{"error": {"message", "type", "param", "code"}}``, as llama-cpp-python's
  ``server/errors.py`` does;
- :mod:`~barkgpt.server.web` the page and the training-run routes over
  :mod:`~barkgpt.server.runs`.

Nothing happens at import time.

Lifecycle: :func:`run_server` opens the port first and loads the model in a background thread;
until it is loaded, ``/health`` and every model route answer 503. On SIGTERM (or Ctrl-C) the port
closes, new requests are refused, and running ones get ``shutdown_timeout`` seconds to finish;
those still running then end with an error (an ``error`` event in a stream), and the process
exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

from barkgpt.config import ServeConfig
from barkgpt.generate import TextGenerator
from barkgpt.server import serving, web
from barkgpt.server.errors import add_error_handlers
from barkgpt.server.host import ModelHost
from barkgpt.server.metrics import CountRequests, ServerMetrics
from barkgpt.server.runs import TrainingRuns
from barkgpt.server.security import Guard

log = logging.getLogger("barkgpt.server")

SHUTDOWN_GRACE_S = 5.0  # after shutdown_timeout, how long requests get to send their error before uvicorn cancels them
PUBLIC_PATHS = {"/health", *web.PAGES}  # reachable without the API key (and web.STATIC_PREFIX/...)


def create_app(generator: TextGenerator | None = None, settings: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``generator``'s model; its scheduler thread runs while the app does.

    Args:
        generator: the model and its tokenizer (see :func:`barkgpt.generate.load_generator`), or
            None to plug one in later with ``app.state.host.attach(generator)`` (see
            :class:`~barkgpt.server.host.ModelHost`); until then ``/health`` and the model routes
            answer 503.
        settings: name (None: ``barkgpt``), API key, batch and queue sizes, CORS origins, body cap.
    """
    settings = settings or ServeConfig()
    host = ModelHost(settings)
    runs = TrainingRuns(settings.runs, settings.data_root, settings.max_run_params, settings.max_run_memory)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if generator is not None:
            host.attach(generator)
        yield
        await asyncio.to_thread(runs.close)
        await asyncio.to_thread(host.close)

    app = FastAPI(title="BarkGPT", version="0.1.0", lifespan=lifespan, redoc_url=None)
    metrics = host_metrics(host)
    app.state.host, app.state.serving = host, serving.ServingState(host, metrics)
    if settings.cors_origin:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin, allow_methods=["*"], allow_headers=["*"])
    app.add_middleware(Guard, settings=settings, public=is_public)  # before routing (and before CORS)
    app.add_middleware(CountRequests, metrics=metrics)  # added last: runs first, sees 401/413 too
    add_error_handlers(app, runs.path_labels)
    app.include_router(serving.router)
    web.add_routes(app, host, runs)
    return app


def is_public(path: str) -> bool:
    """Whether ``path`` is reachable without the API key: ``/health``, the pages, the static files."""
    return path in PUBLIC_PATHS or path.startswith(web.STATIC_PREFIX)


def host_metrics(host: ModelHost) -> ServerMetrics:
    """A :class:`ServerMetrics` whose gauges read ``host``'s current scheduler (0 without one)."""

    def sched_count(attr):
        return lambda: getattr(host.scheduler, attr) if host.scheduler else 0

    return ServerMetrics(
        sched_count("running"), sched_count("waiting"), lambda: host.scheduler.engine.prefix_cache if host.scheduler else None
    )


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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=settings.shutdown_timeout + SHUTDOWN_GRACE_S,
    )
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
