"""Pydantic models of BarkGPT's own routes, beside OpenAI's in :mod:`barkgpt.server.protocol`:
``/generate`` (raw text in, text out), ``/tokenize`` and ``/detokenize`` (vLLM's names), and
the body of ``POST /v1/runs`` (the web page's "start a run"). Unknown request fields are
ignored, except that a run names only the fields it may change; text is checked with
:func:`~barkgpt.server.protocol.check_text` and sampling settings end up in one
:class:`~barkgpt.config.SamplingParams`, as in the OpenAI routes.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from barkgpt.config import SamplingParams
from barkgpt.server.protocol import SEED_RANGE, check_text, sampling_params, stop_list


class GenerateRequest(BaseModel):
    """``POST /generate``: continue ``prompt`` (raw text, no chat template)."""

    model_config = ConfigDict(extra="ignore")

    prompt: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_k: int | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, **SEED_RANGE)
    stop: str | list[str] | None = Field(None, validate_default=True)  # a list after validation

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return stop_list(v)

    @field_validator("prompt")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v

    def requested_max_tokens(self) -> int | None:
        """``max_tokens`` (None: fill the rest of the context)."""
        return self.max_tokens

    def sampling_params(self, room: int) -> SamplingParams:
        """The request's sampling settings (``max_new_tokens``: ``max_tokens``, else ``room``)."""
        return sampling_params(
            dict(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed, stop=self.stop),
            self.requested_max_tokens() or room,
        )


class GenerateResponse(BaseModel):
    """``POST /generate`` response: the reply text."""

    message: str


class TokenizeRequest(BaseModel):
    """``POST /tokenize``: text to token ids."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str

    @field_validator("model", "prompt")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v


class TokenizeResponse(BaseModel):
    """``POST /tokenize`` response: ids, their count and the context size."""

    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(BaseModel):
    """``POST /detokenize``: token ids to text."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]

    @field_validator("model")
    @classmethod
    def _valid_text(cls, v):
        check_text(v)
        return v


class DetokenizeResponse(BaseModel):
    """``POST /detokenize`` response."""

    prompt: str


class StartRunRequest(BaseModel):
    """``POST /v1/runs``: train a new run ``name`` from ``preset`` with a few ``overrides``
    (field -> value, only the fields in :data:`barkgpt.server.runs.OVERRIDES`)."""

    name: str = Field(min_length=1, max_length=64)
    preset: str = "bark"
    overrides: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("name", "preset")
    @classmethod
    def _valid_text(cls, v: str) -> str:
        check_text(v)
        return v

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, v: dict) -> dict:
        check_text([*v, *(x for x in v.values() if isinstance(x, str))])
        return v
