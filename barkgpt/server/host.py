"""``ModelHost``: the model side of one app of ``barkgpt serve``, the generator and the
:class:`~barkgpt.server.scheduler.Scheduler` that owns its engine, swapped whole when the web
page loads a run's checkpoint, and closed at shutdown.

The routes ask it for the pair with :meth:`ModelHost.ready`, which answers 503 while the model
loads, once shutdown began, or after the worker thread died.
"""

from __future__ import annotations

import threading
import time

from barkgpt.config import ServeConfig
from barkgpt.engine import Engine
from barkgpt.generate import TextGenerator
from barkgpt.server.errors import ApiError
from barkgpt.server.scheduler import Scheduler

RETRY_AFTER_S = 1  # the Retry-After of a 429 or of a 503 while the model loads (seconds)
PREFIX_CACHE_BYTES = 256 << 20  # KV entries the prefix cache holds at most (bytes), least recently used dropped first


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
            raise ApiError(
                503,
                "the model is still loading; retry shortly",
                "service_unavailable_error",
                code="model_loading",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        if not scheduler.alive:
            raise ApiError(503, "the model is not available (its worker stopped)", "service_unavailable_error", code="not_ready")
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
