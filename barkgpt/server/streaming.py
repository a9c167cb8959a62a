"""How a response is built from the scheduler's tokens: :class:`Choice` turns one request's
token ids into text pieces (incremental UTF-8 and stop strings held back, by
:class:`~barkgpt.generate.TextDecoder`) and collects its logprobs; :func:`collect` runs choices
to the end for a plain response, :func:`stream_choices` interleaves their chunks, and :func:`sse`
sends those as server-sent events, as OpenAI's streams do (``data: {json}`` per chunk, then
``data: [DONE]``; an error after the status line is an ``error`` event). The logprob formatters
give chat's and the legacy completions' ``logprobs`` objects.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple

from fastapi import Request
from fastapi.responses import StreamingResponse

from barkgpt.generate import TextDecoder
from barkgpt.server import protocol as P
from barkgpt.server.errors import shutdown_error
from barkgpt.server.metrics import ServerMetrics
from barkgpt.server.scheduler import ShuttingDown
from barkgpt.server.tool_protocol import ToolCall
from barkgpt.server.tools import ToolCallParser, call_pieces

log = logging.getLogger("barkgpt.server")

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there (seconds)


class LogprobEntry(NamedTuple):
    """One generated token's logprob entry: its text, logprob, top (text, logprob) pairs, its
    character offset in the choice's text (the sum of the earlier tokens' text lengths), and the
    raw UTF-8 bytes of the token and of each top entry (exact even where the text shows U+FFFD)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    offset: int
    bytes: list[int]
    top_bytes: list[list[int]]


class Choice:
    """One choice of a response: consumes its scheduler request and yields text pieces.

    When the request asked for logprobs, ``logprobs`` collects one :class:`LogprobEntry` per token
    (the EOS included, as ``usage`` counts it); :meth:`take_logprobs` hands a stream the new ones.

    Args:
        req: the scheduler's request (an async iterator of token ids, with ``params`` and ``logprobs``).
        tokenizer: decodes the ids (:class:`~barkgpt.generate.TextDecoder`).
        stop: stop strings; the text ends before the first one.
        index: the choice's ``index`` in the response.
        prompt_tokens: the prompt tokens this choice counts in ``usage`` (0 for the 2nd..n-th
            choice of a prompt, which counts once).
        metrics: observes time to first token, inter-token latency and token counts, or None.
        token_text_bytes: token id -> (text, UTF-8 bytes), for logprobs.
    """

    def __init__(
        self,
        req,
        tokenizer,
        stop: list[str],
        index: int,
        prompt_tokens: int = 0,
        metrics: ServerMetrics | None = None,
        token_text_bytes: Callable[[int], tuple[str, list[int]]] | None = None,
    ):
        self.req, self.index, self.prompt_tokens, self.metrics = req, index, prompt_tokens, metrics
        self.t_last = time.perf_counter()  # arrival, then the time of the latest token
        self.decoder = TextDecoder(tokenizer, stop)
        self.lstrip = False  # strip whitespace before the first visible text
        self.text = ""
        self.prefix = ""  # text the choice starts with before its tokens (completions' echo)
        self.tools: ToolCallParser | None = None  # set: <tool_call>s are cut out of the text into tool_calls
        self.tool_calls: list[ToolCall] = []
        self.logprobs: list[LogprobEntry] | None = [] if req.params.logprobs is not None else None
        self._token_text_bytes, self._taken = token_text_bytes, 0

    @property
    def finish_reason(self) -> str:
        """``"stop"`` (EOS or a stop string), ``"length"``, or ``"tool_calls"`` (it stopped after calls)."""
        reason = self.decoder.finish_reason
        return "tool_calls" if self.tool_calls and reason == "stop" else reason

    def take_logprobs(self) -> list[LogprobEntry] | None:
        """The logprob entries not taken yet (None when the request did not ask for logprobs)."""
        if self.logprobs is None:
            return None
        new, self._taken = self.logprobs[self._taken :], len(self.logprobs)
        return new

    async def pieces(self) -> AsyncIterator[str | list]:
        """Text pieces as tokens arrive, and with :attr:`tools` each finished call as a list of
        stream pieces (:func:`~barkgpt.server.tools.call_pieces`); cancels the request when it
        stops early or is abandoned."""
        n_seen = 0
        try:
            if self.prefix:
                self.text += self.prefix
                yield self.prefix
            async for first in self.req:
                # Tokens that arrived together (the event loop was behind the worker) make one
                # piece: one chunk and one write instead of one per token; the text is the same.
                text = ""
                for t in (first, *self.req.ready()):
                    if self.metrics is not None:
                        now = time.perf_counter()
                        (self.metrics.itl if n_seen else self.metrics.ttft).observe(now - self.t_last)
                        self.t_last = now
                    if self.logprobs is not None:
                        self._add_logprob(t, n_seen)
                    n_seen += 1
                    text += self.decoder.add(t)
                    if self.decoder.done:  # EOS or a stop string: the request may still be running
                        break
                for piece in self._outputs(text):
                    yield piece
                if self.decoder.done:
                    break
            else:
                for piece in self._outputs(self.decoder.flush()):
                    yield piece
            for piece in self._outputs("", final=True):
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
        self.logprobs.append(
            LogprobEntry(
                token, logprob, [(text, lp) for (text, _), (_, lp) in zip(tops, top)], offset, token_bytes, [b for _, b in tops]
            )
        )

    def _outputs(self, text: str, final: bool = False) -> list:
        """What ``text`` shows: its visible content, and (with :attr:`tools`) the calls it finished."""
        if self.tools is None:
            piece = "" if final else self._visible(text)
            return [piece] if piece else []
        out = []
        for e in self.tools.finish() if final else self.tools.feed(text):
            if isinstance(e, str):
                piece = self._visible(e)
                if piece:
                    out.append(piece)
            else:
                out.extend([piece] for piece in call_pieces(len(self.tool_calls), e))  # a chunk per piece, as OpenAI
                self.tool_calls.append(e)
        return out

    def _visible(self, piece: str) -> str:
        if self.lstrip and not self.text:
            piece = piece.lstrip()
        self.text += piece
        return piece


def chat_logprobs(entries: list[LogprobEntry] | None) -> P.ChatLogprobs | None:
    """Chat's ``logprobs`` object of some tokens (None for none), with each token's raw UTF-8 bytes."""
    if not entries:
        return None
    return P.ChatLogprobs(
        content=[
            P.TokenLogprob(
                token=e.token,
                logprob=e.logprob,
                bytes=e.bytes,
                top_logprobs=[P.TopLogprob(token=t, logprob=lp, bytes=b) for (t, lp), b in zip(e.top, e.top_bytes)],
            )
            for e in entries
        ]
    )


def completion_logprobs(entries: list[LogprobEntry] | None) -> P.CompletionLogprobs | None:
    """The legacy completions ``logprobs`` object of some tokens (None for none)."""
    if not entries:
        return None
    return P.CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[dict(e.top) for e in entries],
        text_offset=[e.offset for e in entries],
    )


def count_usage(choices: list[Choice]) -> P.Usage:
    """Token counts; a prompt shared by ``n`` choices counts once, as OpenAI's."""
    prompt = sum(c.prompt_tokens for c in choices)
    completion = sum(c.decoder.n_tokens for c in choices)
    return P.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


async def collect(choices: list[Choice], request: Request) -> None:
    """Run every choice to the end; a client that goes away cancels them."""

    async def drain(c: Choice):
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


async def stream_choices(choices: list[Choice], chunk, include_usage: bool, first: str | None):
    """Chunks of every choice as they come (interleaved), one finishing chunk each, then usage.

    ``first`` is the role sent in each choice's first delta (chat), or None (completions). Each
    chunk carries the logprobs of the tokens that arrived since the choice's previous chunk.
    """
    if len(choices) == 1:  # one choice: no interleaving, so no queue and no task in between
        async for c in _stream_one(choices[0], chunk, include_usage, first):
            yield c
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice):
        try:
            async for piece in c.pieces():
                await queue.put((c, piece, c.take_logprobs(), None))  # a str, or a call's pieces (a list)
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
                yield piece_chunk(chunk, c.index, piece, logprobs)
        if include_usage:
            yield chunk(None, "", None, usage=count_usage(choices))
    finally:
        for t in tasks:
            t.cancel()
        for c in choices:
            c.req.cancel()


def piece_chunk(chunk, index: int, piece, logprobs):
    """The chunk of one output of :meth:`Choice.pieces`: text, or a call's ``delta.tool_calls`` pieces."""
    if isinstance(piece, list):
        return chunk(index, "", None, logprobs=logprobs, tool_calls=piece)
    return chunk(index, piece, None, logprobs=logprobs)


async def _stream_one(c: Choice, chunk, include_usage: bool, first: str | None):
    """:func:`stream_choices` for a single choice, which needs no queue: the same chunks, in order."""
    try:
        if first is not None:
            yield chunk(c.index, "", None, role=first)
        async for piece in c.pieces():
            yield piece_chunk(chunk, c.index, piece, c.take_logprobs())
        yield chunk(c.index, "", c.finish_reason, logprobs=c.take_logprobs())
        if include_usage:
            yield chunk(None, "", None, usage=count_usage([c]))
    finally:
        c.req.cancel()


class ChunkTemplate:
    """The JSON of a stream's text chunks without pydantic per token: the chunk of each choice
    index is rendered once by ``build(index, text)`` (a pydantic model) with a marker for its text,
    and each token's chunk is that prefix + the JSON-escaped text + that suffix, byte for byte
    what ``build(index, text).model_dump_json()`` gives (non-ASCII kept as UTF-8, as pydantic does).

    Args:
        build: ``(index, text) -> BaseModel``: the chunk of a text piece of choice ``index``.
    """

    def __init__(self, build: Callable):
        self.build = build
        self._parts: dict[int, tuple[str, str]] = {}
        self._marker = f"barkgpt-text-{uuid.uuid4().hex}"  # no model name or id can hold it by chance

    def render(self, index: int, text: str) -> str:
        """The chunk's JSON (a str) for ``text`` of choice ``index``."""
        parts = self._parts.get(index)
        if parts is None:
            dumped = self.build(index, self._marker).model_dump_json()
            prefix, sep, suffix = dumped.partition(f'"{self._marker}"')
            assert sep and self._marker not in suffix, "the chunk must hold its text exactly once"
            parts = self._parts[index] = (prefix, suffix)
        return parts[0] + json.dumps(text, ensure_ascii=False) + parts[1]

    def __call__(self, i: int | None, text: str, finish=None, usage=None, logprobs=None, **extra):
        """A stream chunk (the ``chunk`` of :func:`stream_choices`): a token's text alone is
        rendered from the template; any other chunk (finish, usage, logprobs, a role) is built."""
        if i is not None and finish is None and usage is None and not logprobs and not any(extra.values()):
            return self.render(i, text)
        return self.build(i, text, finish=finish, usage=usage, logprobs=logprobs, **extra)


def sse(chunks) -> StreamingResponse:
    """Server-sent events: ``data: {json}`` per chunk (a pydantic model, or its JSON already as a
    str, see :class:`ChunkTemplate`), then ``data: [DONE]``; a late error is an event."""

    async def body():
        try:
            async for c in chunks:
                yield f"data: {c if isinstance(c, str) else c.model_dump_json()}\n\n"
        except Exception as e:  # noqa: BLE001 - the status line is gone: report in the stream
            if isinstance(e, ShuttingDown):
                info = shutdown_error().info()
            else:
                log.exception("error while streaming")
                info = P.ErrorInfo(message=f"generation failed: {type(e).__name__}", type="server_error")
            yield f"data: {json.dumps({'error': info.model_dump()})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
