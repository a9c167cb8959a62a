"""The pydantic schemas of structured output and tool calls: OpenAI's ``response_format``,
``tools``, ``tool_choice``, ``parallel_tool_calls``, ``logit_bias`` and vLLM's
``structured_outputs`` request fields (mixed into :mod:`barkgpt.server.protocol`'s requests), and
the ``tool_calls`` objects of replies and stream deltas. The logic lives in
:mod:`barkgpt.server.tools`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from barkgpt.structured import MAX_LOGIT_BIAS, MAX_TOOLS

# ---- request fields ------------------------------------------------------------------------------


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: ``name``, ``schema`` (the JSON schema), ``strict``, ``description``."""

    model_config = ConfigDict(populate_by_name=True, extra="ignore")

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (no constraint), ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` extra: one of ``choice``, ``regex``, ``json`` (a schema),
    ``grammar`` (Lark) or ``json_object``."""

    model_config = ConfigDict(extra="ignore")

    choice: list[str] | None = None
    regex: str | None = None
    json_: dict | str | None = Field(None, alias="json")
    grammar: str | None = None
    json_object: bool | None = None


class StructuredFields(BaseModel):
    """The constraint fields both generation routes take (mixed into ``protocol.Request``)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)  # token id -> bias in [-100, 100]


class FunctionName(BaseModel):
    """``{"name": ...}`` of a named ``tool_choice``."""

    name: str


class NamedToolChoice(BaseModel):
    """``tool_choice: {"type": "function", "function": {"name": ...}}``."""

    type: Literal["function"] = "function"
    function: FunctionName


class ToolFields(BaseModel):
    """The tool fields of ``/v1/chat/completions`` (mixed into ``protocol.ChatCompletionRequest``)."""

    tools: list[dict] | None = Field(None, max_length=MAX_TOOLS)  # OpenAI tool objects, checked by structured.check_tools
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools, else none
    parallel_tool_calls: bool = True

    def tool_mode(self) -> str:
        """``"none"``, ``"auto"``, ``"required"`` or ``"named"``."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")


# ---- reply objects -------------------------------------------------------------------------------


class FunctionCall(BaseModel):
    """A call's function: its ``name`` and ``arguments`` (JSON text, as OpenAI sends them)."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call of a reply: ``id`` (``call_`` + 24 hex digits), ``type``, ``function``."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class DropNone(BaseModel):
    """A stream delta object: fields that are None are left out (OpenAI's stream shape)."""

    @model_serializer(mode="wrap")
    def _drop_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None}


class DeltaFunctionCall(DropNone):
    """A piece of a streamed call's function: the ``name`` in its first piece, then ``arguments`` text."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(DropNone):
    """A piece of a streamed tool call: ``index`` always; ``id`` and ``type`` in its first piece."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall
