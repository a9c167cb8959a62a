"""Structured output and tool calls over HTTP: the row hooks a request gets
(:func:`request_hooks`, over :mod:`barkgpt.structured`, from the fields of
:mod:`barkgpt.server.tool_protocol`) and :class:`ToolCallParser`, which cuts a reply's
``<tool_call>{...}</tool_call>`` pieces out of its text as it streams.

The tool-call text is the chat templates' (``barkgpt/tokenizer.py``): a call is
``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>``; text before the first call is the
reply's ``content``.
"""

from __future__ import annotations

import json
import secrets

from barkgpt.common import BarkError
from barkgpt.server.errors import ApiError
from barkgpt.server.tool_protocol import DeltaFunctionCall, DeltaToolCall, FunctionCall, ToolCall
from barkgpt.structured import Constraint, check_tools, processors_for
from barkgpt.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

ARGUMENT_PIECE_CHARS = 16  # a streamed call's arguments go out in pieces of this many characters, as OpenAI streams them


def new_call_id() -> str:
    """A tool call id: ``call_`` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


def call_pieces(index: int, call: ToolCall) -> list[DeltaToolCall]:
    """A finished call as the stream pieces OpenAI sends: the id, type and name with empty
    arguments, then the arguments in pieces of :data:`ARGUMENT_PIECE_CHARS` characters."""
    args = call.function.arguments
    first = DeltaToolCall(
        index=index, id=call.id, type="function", function=DeltaFunctionCall(name=call.function.name, arguments="")
    )
    rest = [
        DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=args[i : i + ARGUMENT_PIECE_CHARS]))
        for i in range(0, len(args), ARGUMENT_PIECE_CHARS)
    ]
    return [first, *rest]


# ---- the hooks of a request ----------------------------------------------------------------------


def asked_constraints(body) -> list[tuple[str, object, object]]:
    """``(field, make, value)`` for each constraint the request asks for, unbuilt: ``make(value)``
    gives the :class:`~barkgpt.structured.Constraint`.

    Raises:
        ApiError: 400 for a ``json_schema`` format without a schema, or ``tool_choice`` without tools.
    """
    asked = []
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", lambda _: Constraint.json_object(), None))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        asked.append(("response_format", Constraint.json_schema, rf.json_schema.schema_))
    so = body.structured_outputs
    if so is not None:
        for name, value, make in (
            ("choice", so.choice, Constraint.choice),
            ("regex", so.regex, Constraint.regex),
            ("json", so.json_, Constraint.json_schema),
            ("grammar", so.grammar, Constraint.grammar),
            ("json_object", so.json_object or None, lambda _: Constraint.json_object()),
        ):
            if value is not None:
                asked.append((f"structured_outputs.{name}", make, value))
    mode = body.tool_mode() if hasattr(body, "tool_mode") else "none"
    if mode != "none" and not body.tools:
        raise ApiError(400, f"tool_choice {mode!r} needs tools; list the functions in tools", param="tool_choice")
    if mode in ("required", "named"):
        name = body.tool_choice.function.name if mode == "named" else None
        asked.append(("tool_choice", lambda n: Constraint.tool_calls(body.tools, n, body.parallel_tool_calls), name))
    return asked


def request_constraint(body) -> tuple[Constraint | None, Constraint | None]:
    """``(constraint, auto_tools)`` of a request: what every reply must be, and for ``tool_choice:
    "auto"`` the tool-call grammar a reply switches to at ``<tool_call>``.

    Raises:
        ApiError: 400 naming the field: two constraints at once, ``tool_choice`` without tools, an
            unknown function in ``tool_choice``, bad tools (also under ``tool_choice: "none"``, as
            the chat template still writes them) or a schema out of bounds.
    """
    asked = asked_constraints(body)
    if len(asked) > 1:
        raise ApiError(400, f"give one constraint, not {len(asked)} ({', '.join(a[0] for a in asked)})", param=asked[1][0])
    field, built, auto = (asked[0][0] if asked else None), None, None
    try:
        if asked:
            built = asked[0][1](asked[0][2])
        mode = body.tool_mode() if hasattr(body, "tool_mode") else "none"
        if mode == "auto":
            field, auto = "tools", Constraint.tool_calls(body.tools, None, body.parallel_tool_calls)
        elif mode == "none" and getattr(body, "tools", None):  # still written into the prompt: check them too
            field = "tools"
            check_tools(body.tools)
    except BarkError as e:
        raise ApiError(400, str(e), param="tools" if "tools[" in str(e) else field) from None
    return built, auto


def request_hooks(body, tokenizer) -> list:
    """The row hooks (:func:`barkgpt.structured.processors_for`) for every reply of ``body``; one
    list serves all ``n`` rows (the hooks keep their state per row). Compiles, cached: call it
    off the event loop.

    Raises:
        ApiError: 400 from :func:`request_constraint`, for a bad ``logit_bias``, for a constraint
            this model's tokenizer cannot write or the grammar library cannot compile (its reason).
    """
    constraint, auto = request_constraint(body)
    if constraint is None and auto is None and not body.logit_bias:
        return []
    try:
        return processors_for(tokenizer, constraint, auto, body.logit_bias)
    except BarkError as e:
        param = (
            "logit_bias" if str(e).startswith("logit_bias") else "tools" if auto is not None else asked_constraints(body)[0][0]
        )
        raise ApiError(400, str(e), param=param) from None


# ---- parsing a reply -----------------------------------------------------------------------------


def to_call(body: str) -> ToolCall | None:
    """The text between ``<tool_call>`` and ``</tool_call>`` as a :class:`ToolCall`, or None when
    it is not ``{"name": str, "arguments": object}`` JSON."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # a model may write the arguments as JSON text, as OpenAI sends them
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False)))


class ToolCallParser:
    """Cuts a reply's text, fed piece by piece, into content and tool calls.

    :meth:`feed` and :meth:`finish` return a list of events: ``str`` content to show, or a
    :class:`ToolCall` once its ``</tool_call>`` arrived. Text that may be the start of
    ``<tool_call>`` is held back until it is not; a call cut short (``max_tokens``) or whose
    JSON does not parse comes out as content text.
    """

    def __init__(self):
        self.buf, self.in_call, self.calls = "", False, []

    def feed(self, text: str) -> list:
        """Events for one more piece of the reply."""
        self.buf += text
        out: list = []
        while True:
            if not self.in_call:
                at = self.buf.find(TOOL_CALL_OPEN)
                if at < 0:
                    keep = next(
                        (
                            k
                            for k in range(min(len(TOOL_CALL_OPEN) - 1, len(self.buf)), 0, -1)
                            if TOOL_CALL_OPEN.startswith(self.buf[-k:])
                        ),
                        0,
                    )
                    cut = len(self.buf) - keep
                    if cut:
                        out.append(self.buf[:cut])
                    self.buf = self.buf[cut:]
                    return out
                if at:
                    out.append(self.buf[:at])
                self.buf, self.in_call = self.buf[at + len(TOOL_CALL_OPEN) :], True
            at = self.buf.find(TOOL_CALL_CLOSE)
            if at < 0:
                return out
            call = to_call(self.buf[:at])
            if call is None:
                out.append(TOOL_CALL_OPEN + self.buf[: at + len(TOOL_CALL_CLOSE)])
            else:
                self.calls.append(call)
                out.append(call)
            self.buf, self.in_call = self.buf[at + len(TOOL_CALL_CLOSE) :], False

    def finish(self) -> list:
        """Events for the end of the reply: held-back text, or an unfinished call as text."""
        rest = (TOOL_CALL_OPEN if self.in_call else "") + self.buf
        self.buf, self.in_call = "", False
        return [rest] if rest else []


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply as ``(content, calls)``: the text outside calls, stripped (None when
    empty), and each well-formed ``<tool_call>{...}</tool_call>`` as a :class:`ToolCall`."""
    p = ToolCallParser()
    events = p.feed(text) + p.finish()
    content = "".join(e for e in events if isinstance(e, str)).strip()
    return content or None, p.calls
