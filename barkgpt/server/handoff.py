"""The hand-off of tokens from the scheduler's worker thread to the event loops that stream them.

One mailbox per event loop: one ``loop.call_soon_threadsafe`` hands a decode step's tokens for
all of that loop's requests over, and while that hand-off waits for the loop, later steps join it
instead of waking the loop again, so the event loop never waits on the model and wakes at most
once per step. While its streams decode, a loop is also woken at most once per
:data:`STREAM_INTERVAL_S`: the steps' tokens in between make one chunk per stream (vLLM's
``--stream-interval``, in time), so the loop's Python work (rendering and writing chunks) takes
the GIL from the worker about once per interval instead of at every step.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from typing import Any  # a scheduler.Request: it has .loop, ._push() and .cancelled

# While its streams decode, an event loop is woken at most once per this (seconds): the steps in
# between join one hand-off, so the loop renders and writes one chunk per stream for them (vLLM's
# --stream-interval, in time). A request's first token and its end are not held (time to first
# token, and the client's next request). Fewer wake-ups leave the worker the GIL: on 2 cores,
# 1 ms -> 20 ms took 1 stream from 1,285-1,334 to 1,513-1,515 tokens/s and 16 streams from
# 5,105-5,119 to 6,877-6,965 (two rounds each, bench/RESULTS.md, 2026-12-01 17:40); 20 ms is 50
# updates a second, smooth to a reader.
STREAM_INTERVAL_S = 0.02


class _Mailbox:
    """What the worker has sent one event loop and the loop has not taken yet: while a delivery is
    scheduled, later steps add to it instead of waking the loop again (one self-pipe write, and
    one callback, however far the loop is behind); a step's tokens sent with ``hold`` wait up to
    :data:`STREAM_INTERVAL_S` after the last wake-up (:func:`flush` sends them)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.items: list[tuple[Any, object]] = []
        self.scheduled = False
        self.last_wake = 0.0  # time.monotonic() of the last wake-up

    def deliver(self) -> None:
        """Event-loop side: hand every waiting item to its request, in order."""
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for req, item in items:
            req._push(item)

    def wake(self, now: float) -> bool:
        """Schedule :meth:`deliver` on the loop unless it is scheduled already (call with
        :attr:`lock` held); False when the loop is closed (its items are dropped)."""
        if self.scheduled or not self.items:
            return True
        self.scheduled, self.last_wake = True, now
        try:
            self.loop.call_soon_threadsafe(self.deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            dropped, self.items, self.scheduled = self.items, [], False
            for req, _ in dropped:
                req.cancelled = True
            return False
        return True


_mailboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> its _Mailbox
_mailboxes_lock = threading.Lock()
_held: set = set()  # mailboxes with items sent with hold and no wake-up yet (under _mailboxes_lock)


def send(items: list[tuple[Any, object]], hold: bool = False) -> None:
    """Hand items to their event loops: at most one wake-up per loop, not per token. With
    ``hold`` (a decode step's tokens), a loop woken less than :data:`STREAM_INTERVAL_S` ago
    is left to :func:`flush`."""
    loops: dict[asyncio.AbstractEventLoop, list] = {}
    for req, item in items:
        loops.setdefault(req.loop, []).append((req, item))
    now = time.monotonic()
    for loop, batch in loops.items():
        with _mailboxes_lock:
            box = _mailboxes.get(loop)
            if box is None:
                box = _mailboxes[loop] = _Mailbox(loop)
        with box.lock:
            box.items.extend(batch)
            if hold and not box.scheduled and now - box.last_wake < STREAM_INTERVAL_S:
                with _mailboxes_lock:
                    _held.add(box)
                continue
            box.wake(now)


def flush(force: bool = False) -> None:
    """Wake the loops whose held items have waited :data:`STREAM_INTERVAL_S` since their last
    wake-up (all of them with ``force``: the worker is about to wait for new requests)."""
    with _mailboxes_lock:
        boxes = list(_held)
    now = time.monotonic()
    for box in boxes:
        with box.lock:
            if not force and not box.scheduled and now - box.last_wake < STREAM_INTERVAL_S:
                continue
            box.wake(now)
        with _mailboxes_lock:
            _held.discard(box)
