"""The OpenAI routes of ``barkgpt serve`` and BarkGPT's own model routes, as one ``APIRouter``
(:data:`router`) that :func:`~barkgpt.server.app.create_app` includes:

    GET  /health, /metrics, /v1/models, /v1/models/{id}
    POST /v1/completions, /v1/chat/completions   (``stream: true``: server-sent events)
    POST /generate, /tokenize, /detokenize

Each route reads what it needs from ``request.app.state.serving`` (a :class:`ServingState`: the
:class:`~barkgpt.server.host.ModelHost`, the metrics, the start time), checks the request
(model id, context length, queue room), hands token ids to the scheduler and builds the response
with :mod:`barkgpt.server.streaming`. The checks are plain functions, testable without an app.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid
from collections.abc import Callable

from fastapi import APIRouter, Request

from barkgpt.config import SamplingParams
from barkgpt.generate import TextGenerator
from barkgpt.server import native_protocol as N
from barkgpt.server import protocol as P
from barkgpt.server.errors import ApiError
from barkgpt.server.host import RETRY_AFTER_S, ModelHost
from barkgpt.server.metrics import ServerMetrics
from barkgpt.server.scheduler import QueueFull, Scheduler
from barkgpt.server.streaming import (
    Choice,
    ChunkTemplate,
    chat_logprobs,
    collect,
    completion_logprobs,
    count_usage,
    sse,
    stream_choices,
)
from barkgpt.server.tools import ToolCallParser, asked_constraints, request_hooks

TOKEN_TEXTS_CACHED = 1 << 16  # (tokenizer, token id) -> text and bytes kept for logprobs, per app

router = APIRouter()


def token_text_bytes(tokenizer, i: int) -> tuple[str, list[int]]:
    """One token's own text and raw UTF-8 bytes (for logprobs); in the text, a byte of a
    multi-byte character shows as U+FFFD, the bytes are exact."""
    return tokenizer.decode([i]), list(tokenizer.id_to_bytes(i))


@dataclasses.dataclass
class ServingState:
    """What the routes of one app share (``app.state.serving``).

    Args:
        host: the model host (the generator and its scheduler).
        metrics: the app's Prometheus metrics.
        started: when the app was built (Unix seconds): ``/health``'s uptime, the model's ``created``.
    """

    host: ModelHost
    metrics: ServerMetrics
    started: float = dataclasses.field(default_factory=time.time)
    token_text: Callable = dataclasses.field(
        default_factory=lambda: functools.lru_cache(maxsize=TOKEN_TEXTS_CACHED)(token_text_bytes)
    )


def serving_state(request: Request) -> ServingState:
    """The :class:`ServingState` of the app serving ``request``."""
    return request.app.state.serving


# ---- checks and steps of a request ------------------------------------------------------------


def check_model(host: ModelHost, model: str | None) -> None:
    """Refuse a ``model`` that is not the one ``host`` serves (None: the served one).

    Raises:
        ApiError: 404 ``model_not_found``, naming the served model.
    """
    if model is not None and model != host.name:
        raise ApiError(
            404,
            f"the model '{model}' does not exist; this server serves '{host.name}'",
            "not_found_error",
            param="model",
            code="model_not_found",
        )


def sampling_for(ids: list[int], body, block_size: int) -> SamplingParams:
    """``body``'s :class:`SamplingParams` once the prompt is checked to fit: ``max_new_tokens`` is
    the requested ``max_tokens``, else the rest of the context (``block_size - len(ids)`` tokens).

    Raises:
        ApiError: 400 ``context_length_exceeded`` when the prompt leaves no room (``param``
            ``prompt``) or ``max_tokens`` asks for more than the room left (``param`` ``max_tokens``).
    """
    room = block_size - len(ids)
    want = body.requested_max_tokens()
    if room < 1 or (want is not None and want > room):
        asked = f" and max_tokens is {want}" if want is not None else ""
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens{asked}, but the model's context is "
            f"{block_size} tokens; shorten the prompt or lower max_tokens",
            param="max_tokens" if want is not None and room >= 1 else "prompt",
            code="context_length_exceeded",
        )
    return body.sampling_params(room)


async def encode(gen: TextGenerator, text: str) -> list[int]:
    """Prompt text -> ids off the event loop; an empty prompt starts from <EOS>."""
    if not text:
        return [gen.tokenizer.eos_id]
    return await asyncio.to_thread(gen.tokenizer.encode, text)


def ids_of(prompt: list[int], gen: TextGenerator) -> list[int]:
    """A prompt given as token ids, checked against the vocabulary; empty: <EOS>.

    Raises:
        ApiError: 400 for an id outside ``[0, vocab_size)``.
    """
    vocab_size = gen.tokenizer.vocab_size
    if any(not 0 <= t < vocab_size for t in prompt):
        raise ApiError(400, f"prompt token ids must be in [0, {vocab_size})", param="prompt")
    return list(prompt) or [gen.tokenizer.eos_id]


async def chat_prompt(body: P.ChatCompletionRequest, gen: TextGenerator) -> list[int]:
    """The chat messages through the model's chat template, as token ids."""
    messages = [
        {
            "role": m.role,
            "content": m.text(),
            **{k: getattr(m, k) for k in ("tool_calls", "tool_call_id", "name") if getattr(m, k)},
        }
        for m in body.messages
    ]
    if not body.tools:
        return await encode(gen, gen.chat_prompt(messages))
    return await encode(gen, gen.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=body.tools))


async def row_hooks(body: P.Request, gen: TextGenerator) -> list:
    """The request's row hooks (:func:`~barkgpt.server.tools.request_hooks`): none, without a thread
    hop, for a request that asks for no constraint, tools or ``logit_bias`` (most of them); else
    compiled (cached) off the event loop.

    Raises:
        ApiError: 400 as ``request_hooks`` (a bad constraint, ``tool_choice`` without tools, ...).
    """
    if not asked_constraints(body) and not body.logit_bias and not getattr(body, "tools", None):
        return []
    return await asyncio.to_thread(request_hooks, body, gen.tokenizer)


def submit_all(sched: Scheduler, jobs: list[tuple]) -> list:
    """Queue every ``(ids, params[, row hooks])`` job, or none: a full queue cancels those already queued.

    Raises:
        ApiError: 429 ``queue_full`` with ``Retry-After``.
    """
    reqs = []
    try:
        for job in jobs:
            reqs.append(sched.submit(*job))
    except QueueFull as e:
        for r in reqs:
            r.cancel()
        raise ApiError(
            429,
            f"the server is busy ({e}); retry shortly",
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    return reqs


def prepare(
    body: P.Request, prompts: list[list[int]], gen: TextGenerator, sched: Scheduler, state: ServingState, hooks=()
) -> list[Choice]:
    """Check each prompt fits, then submit ``n`` requests per prompt, queued together so the
    scheduler prefills each prompt once; choices come prompt-major, as OpenAI's. Choice ``j`` of
    a prompt gets seed ``seed + j`` (mod 2**64), so the ``n`` samples differ. Every row gets the
    row ``hooks`` (:func:`~barkgpt.server.tools.request_hooks`, which keep their state per row).

    Raises:
        ApiError: 400 when a prompt does not fit, or when the request needs more queue places
            (``n`` x prompts) than ``max_queue``: it could never be queued, so a 429 would
            have clients retry forever; 429 when the queue is full now.
    """
    if body.n * len(prompts) > sched.max_queue:
        raise ApiError(
            400,
            f"this request asks for {body.n * len(prompts)} generations (n {body.n} x {len(prompts)} "
            f"prompt(s)), more than the {sched.max_queue} this server queues (--max-queue); "
            "lower n or send fewer prompts per request",
            param="n",
            code="too_many_generations",
        )
    jobs = []
    for ids in prompts:
        base = sampling_for(ids, body, gen.block_size)
        for j in range(body.n):
            seed = None if base.seed is None else (base.seed + j) % 2**64  # n samples must differ
            jobs.append((ids, dataclasses.replace(base, seed=seed), hooks))
    reqs = submit_all(sched, jobs)
    text_of = functools.partial(state.token_text, gen.tokenizer)
    return [
        Choice(r, gen.tokenizer, body.stop, i, len(r.ids) if i % body.n == 0 else 0, state.metrics, text_of)
        for i, r in enumerate(reqs)
    ]


def model_card(state: ServingState) -> P.ModelCard:
    """The served model's ``/v1/models`` entry (503 while it loads)."""
    gen, _ = state.host.ready()
    return P.ModelCard(id=state.host.name, created=int(state.started), max_model_len=gen.block_size)


# ---- routes -----------------------------------------------------------------------------------


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request):
    """The app's Prometheus metrics, in the text format."""
    from fastapi.responses import Response
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(serving_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request):
    """Liveness and load: the model, uptime (seconds), running and waiting requests; 503 until loaded."""
    state = serving_state(request)
    _, s = state.host.ready()
    return {
        "status": "ok",
        "model": state.host.name,
        "uptime_s": round(time.time() - state.started, 3),
        "running": s.running,
        "waiting": s.waiting,
        "compile": s.engine.compile,
    }


@router.get("/v1/models", response_model=P.ModelList)
async def list_models(request: Request):
    """The served model (one), with its context length in tokens."""
    return P.ModelList(data=[model_card(serving_state(request))])


@router.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
async def get_model(model_id: str, request: Request):
    """The served model's card; 404 for any other id."""
    state = serving_state(request)
    check_model(state.host, model_id)
    return model_card(state)


@router.post("/v1/completions", response_model=P.CompletionResponse)
async def completions(body: P.CompletionRequest, request: Request):
    """OpenAI's legacy completions: continue each prompt ``n`` times."""
    state = serving_state(request)
    host = state.host
    check_model(host, body.model)
    gen, sched = host.ready()
    prompts = [await encode(gen, p) if isinstance(p, str) else ids_of(p, gen) for p in body.prompts()]
    hooks = await row_hooks(body, gen)
    choices = prepare(body, prompts, gen, sched, state, hooks)
    texts = body.prompts() if body.echo else []
    for c in choices if body.echo else []:
        p = texts[c.index // body.n]
        c.prefix = p if isinstance(p, str) else gen.tokenizer.decode(p)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def build(i, text, finish=None, usage=None, logprobs=None):
        cs = (
            []
            if i is None
            else [P.CompletionChoice(text=text, index=i, logprobs=completion_logprobs(logprobs), finish_reason=finish)]
        )
        return P.CompletionResponse(id=rid, created=created, model=host.name, choices=cs, usage=usage)

    chunk = ChunkTemplate(build)  # a token's text alone: rendered from the template

    if body.stream:
        return sse(stream_choices(choices, chunk, body.include_usage, first=None))
    await collect(choices, request)
    return P.CompletionResponse(
        id=rid,
        created=created,
        model=host.name,
        usage=count_usage(choices),
        choices=[
            P.CompletionChoice(
                text=c.text, index=c.index, logprobs=completion_logprobs(c.logprobs), finish_reason=c.finish_reason
            )
            for c in choices
        ],
    )


@router.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
async def chat_completions(body: P.ChatCompletionRequest, request: Request):
    """OpenAI's chat completions: the messages through the chat template, ``n`` replies."""
    state = serving_state(request)
    host = state.host
    check_model(host, body.model)
    gen, sched = host.ready()
    hooks = await row_hooks(body, gen)
    choices = prepare(body, [await chat_prompt(body, gen)], gen, sched, state, hooks)
    for c in choices:
        c.lstrip = True  # the reply continues the template's "Assistant:"
        c.tools = ToolCallParser() if body.tools and body.tool_mode() != "none" else None
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def build(i, text, finish=None, usage=None, role=None, logprobs=None, tool_calls=None):
        cs = (
            []
            if i is None
            else [
                P.ChatChunkChoice(
                    index=i,
                    delta=P.DeltaMessage(role=role, content=None if finish or tool_calls else text, tool_calls=tool_calls),
                    logprobs=chat_logprobs(logprobs),
                    finish_reason=finish,
                )
            ]
        )
        return P.ChatCompletionChunk(id=rid, created=created, model=host.name, choices=cs, usage=usage)

    chunk = ChunkTemplate(build)  # a token's text alone: rendered from the template

    if body.stream:
        return sse(stream_choices(choices, chunk, body.include_usage, first="assistant"))
    await collect(choices, request)
    return P.ChatCompletionResponse(
        id=rid,
        created=created,
        model=host.name,
        usage=count_usage(choices),
        choices=[
            P.ChatChoice(
                index=c.index,
                message=P.AssistantMessage(
                    content=(c.text.strip() or None) if c.tool_calls else c.text, tool_calls=c.tool_calls or None
                ),
                logprobs=chat_logprobs(c.logprobs),
                finish_reason=c.finish_reason,
            )
            for c in choices
        ],
    )


@router.post("/generate", response_model=N.GenerateResponse)
async def generate(body: N.GenerateRequest, request: Request):
    """Continue raw text (no chat template); one reply."""
    state = serving_state(request)
    gen, sched = state.host.ready()
    ids = await encode(gen, body.prompt)
    reqs = submit_all(sched, [(ids, sampling_for(ids, body, gen.block_size))])
    choices = [Choice(reqs[0], gen.tokenizer, body.stop, 0, len(ids), state.metrics)]
    await collect(choices, request)
    return N.GenerateResponse(message=choices[0].text)


@router.post("/tokenize", response_model=N.TokenizeResponse)
async def tokenize(body: N.TokenizeRequest, request: Request):
    """Text to token ids, their count and the context size (tokens)."""
    host = serving_state(request).host
    check_model(host, body.model)
    gen, _ = host.ready()
    ids = await asyncio.to_thread(gen.tokenizer.encode, body.prompt)
    return N.TokenizeResponse(tokens=ids, count=len(ids), max_model_len=gen.block_size)


@router.post("/detokenize", response_model=N.DetokenizeResponse)
async def detokenize(body: N.DetokenizeRequest, request: Request):
    """Token ids to text."""
    host = serving_state(request).host
    check_model(host, body.model)
    gen, _ = host.ready()
    return N.DetokenizeResponse(prompt=gen.tokenizer.decode(ids_of(body.tokens, gen)))
