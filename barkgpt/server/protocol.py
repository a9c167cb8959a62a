"""Pydantic models of the OpenAI API that the server speaks: requests, responses, stream chunks
and errors (BarkGPT's own routes have theirs in :mod:`barkgpt.server.native_protocol`).

Fields follow OpenAI's order (as vLLM's ``entrypoints/openai/protocol.py``). Unknown request
fields are ignored, so clients that send newer fields keep working. OpenAI's ``max_tokens`` /
``max_completion_tokens`` become BarkGPT's ``max_new_tokens`` here, in :meth:`Request.sampling_params`,
and nowhere else; every sampling setting ends up in one :class:`~barkgpt.config.SamplingParams`,
whose defaults apply to the fields a request leaves out (except ``temperature``, whose default
is OpenAI's).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from barkgpt.config import SamplingParams
from barkgpt.server.tool_protocol import DeltaToolCall, DropNone, StructuredFields, ToolCall, ToolFields

# Caps on what one request may ask for (the body itself is capped by security.Guard).
MAX_N = 16  # choices per request
MAX_STOP = 4  # stop strings, as OpenAI
MAX_STOP_CHARS = 256  # characters per stop string
MAX_MESSAGES = 512  # chat messages per request
MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_LOGPROBS = 5  # /v1/completions' logprobs, as OpenAI's legacy API

SEED_RANGE = dict(ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed accepts
OPENAI_TEMPERATURE = 1.0  # OpenAI's default temperature (its API reference), not BarkGPT's 0.8


def sampling_params(fields: dict, max_new_tokens: int) -> SamplingParams:
    """A :class:`SamplingParams` from a request's sampling fields in BarkGPT's names; a None field
    takes the dataclass default (``temperature``: OpenAI's).

    Raises:
        BarkError: a value out of range (a 400).
    """
    given = {k: v for k, v in fields.items() if v is not None}
    return SamplingParams(**{"temperature": OPENAI_TEMPERATURE, **given, "max_new_tokens": max_new_tokens})


def check_text(v) -> None:
    """Refuse a lone UTF-16 surrogate in ``v`` (a string, or a list of strings and text parts):
    JSON's ``"\\ud800"`` escape makes one, pydantic accepts it, and no tokenizer can encode it.

    Raises:
        ValueError: naming the problem and the fix (a 400 through the validation handler).
    """
    for s in [v] if isinstance(v, str) else v if isinstance(v, list) else []:
        if isinstance(s, str):
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    "holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not Unicode text; send valid UTF-8"
                ) from None


def stop_list(v: str | list[str] | None) -> list[str]:
    """``stop`` as a list, checked against the caps."""
    check_text(v if isinstance(v, (str, list)) else [])
    stops = [v] if isinstance(v, str) else list(v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
    if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters")
    return stops


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with ``usage`` and ``choices: []``."""

    include_usage: bool = False


class Request(StructuredFields):
    """Fields shared by both generation routes (and the constraints of ``StructuredFields``). ``None`` means "the default"."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # None: the served model
    frequency_penalty: float | None = Field(None, ge=-2, le=2)  # minus penalty x count of each generated token
    max_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    presence_penalty: float | None = Field(None, ge=-2, le=2)  # minus penalty once for each generated token
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list after validation
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0)  # None: 1.0, as OpenAI; 0 is greedy
    top_p: float | None = Field(None, gt=0, le=1)
    user: str | None = None
    # extensions (vLLM's names)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return stop_list(v)

    @field_validator("model", "user")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        """The completion length asked for: ``max_tokens`` (None: fill the rest of the context)."""
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        """None: no logprobs; k: each token's logprob and the k most likely tokens."""
        return None

    def sampling_params(self, room: int) -> SamplingParams:
        """The request's sampling settings: ``max_new_tokens`` is the requested ``max_tokens`` (or
        ``max_completion_tokens``), else ``room`` (the rest of the context, in tokens)."""
        return sampling_params(
            dict(
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                stop=self.stop,
                logprobs=self.requested_logprobs(),
            ),
            self.requested_max_tokens() or room,
        )


class CompletionRequest(Request):
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids or lists of ids."""

    prompt: str | list[str] | list[int] | list[list[int]] = ""
    echo: bool = False  # the choice's text starts with its prompt
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # each token's logprob and this many top tokens

    @field_validator("prompt")
    @classmethod
    def _prompt_count(cls, v):
        if isinstance(v, list) and v and not isinstance(v[0], int) and len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        check_text(v)
        return v

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p) or [""]

    def requested_logprobs(self) -> int | None:
        """``logprobs`` (None: none)."""
        return self.logprobs


class TextPart(BaseModel):
    """One part of a message's list content; only text parts are read."""

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v


class ChatMessage(BaseModel):
    """A chat message: ``role`` and ``content`` (a string or a list of text parts)."""

    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    tool_calls: list[dict] | None = Field(None, max_length=MAX_N * 4)  # an assistant turn's calls (OpenAI's shape)
    tool_call_id: str | None = None  # a tool turn: the call it answers
    name: str | None = None

    @field_validator("role", "content")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Request, ToolFields):
    """``POST /v1/chat/completions`` (with ``ToolFields``: ``tools``, ``tool_choice``, ``parallel_tool_calls``)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    logprobs: bool | None = None  # return each token's logprob
    max_completion_tokens: int | None = Field(None, ge=1)
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # with logprobs: this many top tokens per position

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_max_tokens(self) -> int | None:
        """``max_tokens`` or ``max_completion_tokens`` (None: fill the rest of the context)."""
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        """``top_logprobs`` (0 when only ``logprobs`` is set) when ``logprobs`` is true, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses (OpenAI field order) -----------------------------------------------------------


class Usage(BaseModel):
    """Token counts of a response (tokens, not characters)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy ``logprobs`` of a completion choice: per generated token, its text, its logprob
    (natural log of the model's probability, before temperature and penalties), the top
    tokens as ``{text: logprob}``, and its character offset in the choice's text (the sum of
    the earlier tokens' lengths)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    """One choice of a (streamed) completion."""

    text: str
    index: int
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class _UsageWhenSet(BaseModel):
    """Base of responses whose ``usage`` is left out when None: stream chunks carry it only in the last one."""

    @model_serializer(mode="wrap")
    def _usage_only_when_set(self, handler):
        out = handler(self)
        if out.get("usage") is None:
            out.pop("usage", None)
        return out


class CompletionResponse(_UsageWhenSet):
    """``POST /v1/completions`` response, and each chunk of its stream."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    """The reply message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    """One likely token at a position: its text, logprob (natural log, <= 0) and UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """One generated token of a chat choice, with the most likely tokens at its position."""

    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """A chat choice's ``logprobs``: one entry per generated token in ``content``."""

    content: list[TokenLogprob] | None = None


class ChatChoice(BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletionResponse(BaseModel):
    """``POST /v1/chat/completions`` response (non-streamed)."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaMessage(DropNone):
    """The increment of a streamed chat message (None fields left out: role only in the first
    delta; ``{}`` in the finishing one)."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None


class ChatCompletionChunk(_UsageWhenSet):
    """One ``chat.completion.chunk`` event of a chat stream."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``; ``max_model_len`` is the context in tokens."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "barkgpt"
    max_model_len: int  # vLLM's extension: the context length in tokens


class ModelList(BaseModel):
    """``GET /v1/models`` response."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """OpenAI's error object: ``message``, ``type``, ``param``, ``code``."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error response: an ``error`` object."""

    error: ErrorInfo
