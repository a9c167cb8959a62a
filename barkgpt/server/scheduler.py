"""Continuous batching: one worker thread owns the engine and decodes every running request together.

The scheduler keeps only the queue, the worker thread and the rows; prefill, the decode step
and sampling are :class:`~barkgpt.engine.Engine`'s (compiled when the engine is, with the
prefix cache when it has one). A request's prompt but its last token is prefilled alone (a
one-row :class:`~barkgpt.engine.KVCache`), then its row is copied into the shared decode cache
(once per row for the next waiting requests with the same prompt, such as the ``n`` choices of
one request: a prompt is prefilled once, not ``n`` times) and joins the batch between two
decode steps; the last prompt token is fed by the next decode step, so its first token comes
from the batch (a prompt found in the prefix cache up to its last token costs no forward pass
of its own: a chat's next turn, a repeated prompt); a finished or cancelled request leaves between steps (its tokens and KV entries go to the
prefix cache) and the last row moves into its slot, as vLLM's continuous batching (Yu et al.
2022, "Orca") lets requests join and leave one running batch. Rows sit at different positions;
the engine decodes each at its own. Each row samples with its own settings and its own seeded
``torch.Generator`` (:func:`~barkgpt.engine.sample_rows`), so a request's tokens do not depend on
what else is running (up to float rounding of batched matmuls).

The scheduler works on token ids only; ``streaming.py`` turns them into text. Tokens reach the
asyncio side through :mod:`barkgpt.server.handoff` (a mailbox per event loop, at most one
wake-up per step and per :data:`~barkgpt.server.handoff.STREAM_INTERVAL_S`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time

import torch

from barkgpt.common import BarkError
from barkgpt.config import SamplingParams
from barkgpt.engine import Engine, KVCache, Row, row_logprobs, sample_rows
from barkgpt.server.handoff import flush, send

log = logging.getLogger("barkgpt.server")

MAX_PREFILLS_PER_STEP = 4  # new requests admitted between two decode steps (keeps running streams smooth)
# How long a thread may hold the GIL while another waits for it (seconds; Python's default is 5 ms).
# The worker takes the GIL back after each torch call that drops it; with the default, a busy event
# loop (HTTP and SSE work, in Python) makes it wait up to 5 ms each time, longer than a decode step.
GIL_SWITCH_INTERVAL_S = 0.0005


class QueueFull(Exception):
    """Too many requests are waiting; the client should retry later (HTTP 429)."""


class ShuttingDown(Exception):
    """The scheduler stopped (server shutdown) before the request finished (HTTP 503)."""


class Request:
    """One submitted request: iterate it with ``async for`` to get its token ids as they come.

    The iteration ends after the last token (EOS or ``max_new_tokens``), and raises if the worker
    failed (:class:`ShuttingDown` when the scheduler stopped). :meth:`cancel` (from any thread)
    frees the row at the worker's next step.

    When ``params.logprobs`` is set, ``logprobs[i]`` describes the i-th token: ``(logprob,
    [(id, logprob), ...])`` with the top ``params.logprobs`` tokens, most likely first (natural
    log, <= 0). The worker appends it before it sends the token, so it is there when the token is.
    """

    def __init__(self, ids: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop, processors=()):
        self.ids, self.params, self.loop = ids, params, loop
        self.processors = list(processors)  # engine row hooks (constraints, logit_bias: barkgpt.structured)
        self.logprobs: list[tuple[float, list[tuple[int, float]]]] = []
        self.cancelled = False
        self.submitted_at = time.monotonic()
        self._ended = False
        self._items: collections.deque = collections.deque()  # delivered, not yet taken (event loop only)
        self._waiter: asyncio.Future | None = None  # set while __anext__ waits for an item

    def cancel(self) -> None:
        """Stop generating for this request (no-op once it has finished)."""
        self.cancelled = True

    def _put(self, item) -> None:
        """Hand a token id, None (the end) or an exception to the event loop (worker thread)."""
        send([(self, item)])

    def _push(self, item) -> None:
        """Event-loop side of :meth:`_put`: queue ``item`` and wake the waiting iteration."""
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def ready(self) -> list[int]:
        """Take the token ids already delivered (none: ``[]``) without waiting; the end (or an
        error) stays for the next ``async for`` step. Call from the event loop."""
        out = []
        while self._items and type(self._items[0]) is int:
            out.append(self._items.popleft())
        return out

    def __aiter__(self):
        return self

    async def __anext__(self) -> int:
        if self._ended:
            raise StopAsyncIteration
        while not self._items:
            self._waiter = self.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if item is None or isinstance(item, BaseException):
            self._ended = True
            if item is None:
                raise StopAsyncIteration
            raise item
        return item


class _Row(Row):
    """A running request: an engine :class:`~barkgpt.engine.Row` (prompt, generated ids, its
    generator) and the :class:`Request` it answers."""

    def __init__(self, req: Request, device):
        super().__init__(req.ids, req.params, processors=req.processors, device=device)
        self.req = req


class Scheduler:
    """Owns ``engine`` in one worker thread and batches concurrent requests step by step.

    Args:
        engine: the :class:`~barkgpt.engine.Engine` (its ``compile`` and prefix cache apply).
        stop_ids: token ids that end a request (the tokenizer's ``<EOS>``); the id is still sent.
        max_batch_size: rows decoded together at most; more requests wait.
        max_queue: requests waiting at most; beyond it :meth:`submit` raises :class:`QueueFull`.
    """

    def __init__(self, engine: Engine, stop_ids: list[int], max_batch_size: int = 16, max_queue: int = 256):
        self.engine = engine
        self.model = engine.model
        self.device = engine.device
        self.block_size = engine.model.config.block_size
        self.stop_ids = set(stop_ids)
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self._waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._rows: list[_Row] = []  # row b of self._cache belongs to self._rows[b]
        self._cache: KVCache | None = None
        self._thread: threading.Thread | None = None
        self._warm = threading.Event()  # set once the worker compiled its decode step (or failed)
        self._stopping = False

    # ---- the asyncio side --------------------------------------------------------------------

    @property
    def running(self) -> int:
        """Requests in the decode batch."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests submitted but not yet prefilled."""
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs (False before start() and after stop() or a crash)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, ids: list[int], params: SamplingParams, processors=()) -> Request:
        """Queue a request; call from the event loop that will iterate it. ``processors`` are its
        row's logits hooks (see :class:`~barkgpt.engine.Row`).

        Raises:
            BarkError: an empty prompt, or prompt plus ``max_new_tokens`` longer than ``block_size``.
            QueueFull: ``max_queue`` requests are already waiting, or the scheduler is stopping.
        """
        if not ids:
            raise BarkError("the prompt is empty")
        if len(ids) + params.max_new_tokens > self.block_size:
            raise BarkError(
                f"the prompt has {len(ids)} tokens and max_new_tokens is {params.max_new_tokens}, "
                f"more than the model's block_size of {self.block_size}"
            )
        req = Request(list(ids), params, asyncio.get_running_loop(), processors)
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(req)
            self._wake.notify()
        return req

    def start(self) -> None:
        """Start the worker thread and wait until it has compiled the engine's decode step for
        every batch bucket (seconds to tens of seconds when compiling; at once otherwise)."""
        # process-wide and kept after stop: a model switch starts the next scheduler before the old one stops
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
        self._thread = threading.Thread(target=self._run, name="barkgpt-scheduler", daemon=True)
        self._thread.start()
        while not self._warm.wait(0.1) and self._thread.is_alive():
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking requests, end the waiting and running ones with :class:`ShuttingDown`, and
        join the worker (waiting at most ``timeout`` seconds). Callable from any thread, repeatedly."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the worker thread -------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():  # the mode every step runs in, so the compiled graphs match it
            # A spare row and slot: every batch and length bucket is then a strict slice of the
            # cache, a dynamic dimension of one compiled graph (see Engine.decode).
            self._cache = KVCache.for_model(self.model, self.max_batch_size + 1, self.block_size + 1)
            self._prefill_cache = KVCache.for_model(self.model, 1)  # reused: copy_row reads only its filled part
            try:
                self.engine.warmup(self._cache, self.max_batch_size)
            finally:
                self._warm.set()
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._rows:
                        self._step()
                except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
                    log.exception("generation failed")
                    self._fail_all(RuntimeError(f"generation failed: {type(e).__name__}"))
                flush(force=not self._rows)  # nothing left to decode: send what is held now
            self._fail_all(ShuttingDown("the server shut down before the request finished"))

    def _fail_all(self, error: Exception) -> None:
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting + [r.req for r in self._rows]:
            req._put(error)
        self._rows = []

    def _admit(self) -> None:
        """Prefill waiting requests alone but for their last prompt token (through the engine's
        prefix cache) and copy their rows into the decode cache; the next decode step feeds that
        token (see :meth:`_step`).

        The next waiting requests with the same prompt (the ``n`` choices of one request, queued
        together) reuse that prefill: each gets a copy of the one-row cache.
        """
        for _ in range(MAX_PREFILLS_PER_STEP):
            req = self._pop_waiting()
            if req is None:
                return
            one = self._prefill_cache
            self.engine.prefill(req.ids, one, last=False)
            while req is not None:
                self._cache.copy_row(len(self._rows), one)
                self._rows.append(_Row(req, self.device))
                req = self._pop_waiting(same_prompt=req.ids)

    def _pop_waiting(self, same_prompt: list[int] | None = None) -> Request | None:
        """The next waiting request that is not cancelled, while a decode row is free; with
        ``same_prompt``, only if its prompt is that one. None when there is none."""
        while len(self._rows) < self.max_batch_size:
            with self._wake:
                if not self._waiting or (same_prompt is not None and self._waiting[0].ids != same_prompt):
                    return None
                req = self._waiting.popleft()
            if not req.cancelled:
                return req
            req._put(None)
        return None

    def _step(self) -> None:
        """Decode one token for every running row, then let finished and cancelled rows leave."""
        cancelled = [b for b, r in enumerate(self._rows) if r.req.cancelled]
        for b in cancelled:
            self._rows[b].req._put(None)
        self._remove(cancelled)
        if not self._rows:
            return
        feed = [r.generated[-1] if r.generated else r.prompt[-1] for r in self._rows]  # a new row: its last prompt token
        logits = self.engine.decode(feed, self._cache)  # (n, V), each row at its own position
        done = self._emit(self._rows, logits)
        self._remove([b for b, d in enumerate(done) if d])

    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> list[bool]:
        """Sample each row's next token from its row of ``logits`` (len(rows), V), send the tokens
        (one hand-off for all rows), and say which rows are done (stop token, token limit, or
        cancelled)."""
        tokens = sample_rows(logits, rows)
        logprobs = row_logprobs(logits, rows, tokens)
        items, done, hold = [], [], True
        for b, (row, t) in enumerate(zip(rows, tokens)):
            req, p = row.req, row.req.params
            if req.cancelled:
                items.append((req, None))
                done.append(True)
                continue
            if b in logprobs:
                req.logprobs.append(logprobs[b])
            row.generated.append(t)
            items.append((req, t))
            done.append(t in self.stop_ids or len(row.generated) >= p.max_new_tokens)
            if done[-1]:
                items.append((req, None))
            hold = hold and not done[-1] and len(row.generated) > 1
        send(items, hold=hold)  # a first token or an end goes now: time to first token, and the client's next request
        return done

    def _remove(self, rows: list[int]) -> None:
        """Free rows (indices into ``self._rows``): each leaves its tokens and KV entries to the
        prefix cache, and the last row moves into its slot."""
        for b in sorted(rows, reverse=True):
            self.engine.remember(self._rows[b].ids, self._cache, b)  # the row holds ids[:length]
            last = len(self._rows) - 1
            if b != last:
                self._cache.copy_row(b, self._cache, last)
                self._rows[b] = self._rows[last]
            self._rows.pop()
