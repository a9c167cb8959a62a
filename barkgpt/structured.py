"""Constrained decoding: JSON schemas, choice lists, regexes, Lark grammars and tool calls, applied
to the engine's per-row logits hook (:class:`~barkgpt.engine.Row` ``processors``).

A :class:`Constraint` says what the reply must be; :func:`compile_constraint` builds it, once per
(tokenizer, constraint) (an LRU cache), with ``llguidance`` (Microsoft's grammar engine, which vLLM,
SGLang and llama.cpp use: an Earley parser over a lazily built regex lexer, and a token trie that
computes the mask of allowed tokens). Against ``xgrammar`` on our tokenizers
(``bench/bench_grammar.py``, a 2048-token byte-level BPE and a char vocabulary): both compile a
schema in about 1 ms; xgrammar's masks take ~2 us a token against ~15-20 us here (~2 us once a
schema's lexer states are built), either small beside a decode step; llguidance is one 8 MB
wheel with no dependencies, where xgrammar pulls in torch, transformers and triton (1 GB); so
llguidance is a core dependency.

:class:`GrammarProcessor` is the per-row hook: before each token it feeds the matcher the row's
tokens accepted since its last call, reads the mask of allowed tokens (one byte per token, viewed
by NumPy without a copy) and sets the others to ``-inf`` in one indexed write; once the grammar is
complete it allows only EOS. :class:`ToolCallTrigger` is ``tool_choice: "auto"``: free text until the reply writes
``<tool_call>``, then the tool-call grammar from there on (the "structural tag" of vLLM and
xgrammar). :class:`LogitBias` is OpenAI's ``logit_bias``.

JSON is written compactly, the way ``json.dumps`` writes it (``", "`` and ``": "``, no other
whitespace): a small model given free whitespace may emit it forever (llama.cpp issue 9522).

Every input here may come from an HTTP request: sizes and nesting are bounded (the ``MAX_*``
constants), and every failure is one :class:`~barkgpt.common.BarkError` line.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from barkgpt.common import BarkError
from barkgpt.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN  # how the chat templates write a call

if TYPE_CHECKING:
    import torch

    from barkgpt.tokenizer import Tokenizer

MAX_SPEC_CHARS = 32_768  # a schema's JSON text, a grammar, or all tools' JSON together
MAX_SCHEMA_DEPTH = 24  # nesting of objects/arrays in a schema
MAX_CHOICES = 256  # entries of a choice list
MAX_CHOICE_CHARS = 512  # characters of one choice
MAX_REGEX_CHARS = 1024  # characters of a regex
MAX_TOOLS = 128  # functions in a tool list
MAX_LOGIT_BIAS = 1024  # entries of a logit_bias map (OpenAI's value range: [-100, 100])
COMPILED_CACHED = 64  # compiled constraints kept (LRU), over all tokenizers
PROBE_STEPS = 512  # tokens the typeability probe writes at most
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
KINDS = ("json_schema", "json_object", "choice", "regex", "grammar", "tool_calls")


def schema_depth(value, depth: int = 0) -> int:
    """How deeply JSON ``value`` nests (dicts and lists), stopping past :data:`MAX_SCHEMA_DEPTH`."""
    if depth > MAX_SCHEMA_DEPTH or not isinstance(value, (dict, list)):
        return depth
    items = value.values() if isinstance(value, dict) else value
    return max((schema_depth(v, depth + 1) for v in items), default=depth + 1)


def close_objects(schema):
    """A copy of ``schema`` where every object schema with ``properties`` and no
    ``additionalProperties`` gets ``"additionalProperties": false``, as xgrammar's strict mode (vLLM's
    default) reads schemas: a reply then holds only the keys the schema names, still valid
    under the original schema, and a small model cannot wander off into keys of its own."""
    if isinstance(schema, list):
        return [close_objects(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for k, v in schema.items():
        if k in ("properties", "patternProperties", "$defs", "definitions") and isinstance(v, dict):
            out[k] = {name: close_objects(sub) for name, sub in v.items()}  # name -> subschema
        else:
            out[k] = v if k in ("const", "enum", "default", "examples") else close_objects(v)
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_schema(schema, what: str = "the JSON schema") -> str:
    """``schema`` (a dict, or its JSON text) as JSON text with its objects closed
    (:func:`close_objects`), checked against the bounds.

    Raises:
        BarkError: not a JSON object, longer than :data:`MAX_SPEC_CHARS`, or nested deeper than
            :data:`MAX_SCHEMA_DEPTH`.
    """
    if isinstance(schema, str):
        if len(schema) > MAX_SPEC_CHARS:
            raise BarkError(f"{what} has {len(schema)} characters, more than {MAX_SPEC_CHARS}; send a smaller schema")
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise BarkError(f"{what} is not valid JSON ({type(e).__name__}: {str(e)[:100]}); fix it") from None
    if not isinstance(schema, dict):
        raise BarkError(f"{what} must be a JSON object, got {type(schema).__name__}")
    if schema_depth(schema) > MAX_SCHEMA_DEPTH:
        raise BarkError(f"{what} nests deeper than {MAX_SCHEMA_DEPTH} levels; flatten it")
    text = json.dumps(close_objects(schema), ensure_ascii=False)  # key order kept: it is the order properties are written in
    if len(text) > MAX_SPEC_CHARS:
        raise BarkError(f"{what} has {len(text)} characters, more than {MAX_SPEC_CHARS}; send a smaller schema")
    return text


def check_tools(tools) -> list[dict]:
    """OpenAI's ``tools`` list, checked: each ``{"type": "function", "function": {"name", "parameters"?}}``.

    Returns:
        ``[{"name": str, "parameters": dict}, ...]`` (no parameters: any object).

    Raises:
        BarkError: not a list of function tools, more than :data:`MAX_TOOLS`, a repeated name or
            one that does not match :data:`TOOL_NAME`, or a parameters schema out of bounds.
    """
    if not isinstance(tools, list) or not tools:
        raise BarkError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    if len(tools) > MAX_TOOLS:
        raise BarkError(f"at most {MAX_TOOLS} tools, got {len(tools)}")
    out, total = [], 0
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):  # no markup: a name is written into calls' text
            raise BarkError(
                f"tools[{i}] must be {{'type': 'function', 'function': {{'name': NAME, ...}}}}, NAME of 1-64 letters, digits, _ or -"
            )
        params = fn.get("parameters") or {"type": "object"}
        text = check_schema(params, f"the parameters of tool {name!r}")
        total += len(text)
        out.append({"name": name, "parameters": json.loads(text)})
    names = [t["name"] for t in out]
    if len(set(names)) != len(names):
        raise BarkError(f"tool names must differ; {sorted({n for n in names if names.count(n) > 1})} repeat")
    if total > MAX_SPEC_CHARS:
        raise BarkError(f"the tools' parameter schemas have {total} characters together, more than {MAX_SPEC_CHARS}")
    return out


@dataclass(frozen=True)
class Constraint:
    """What a reply must be, in canonical text (hashable: the compile cache's key). Build one with
    the class methods, which check the bounds.

    Attributes:
        kind: one of :data:`KINDS`.
        value: the schema's canonical JSON, the choices as a JSON list, the regex, the Lark
            grammar, or for ``tool_calls`` the checked tools as JSON.
        parallel: ``tool_calls``: one call or more (OpenAI's ``parallel_tool_calls``).
    """

    kind: str
    value: str = ""
    parallel: bool = True

    @classmethod
    def json_schema(cls, schema) -> Constraint:
        """A JSON value valid under ``schema`` (a dict or JSON text). Raises BarkError (see :func:`check_schema`)."""
        return cls("json_schema", check_schema(schema))

    @classmethod
    def json_object(cls) -> Constraint:
        """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
        return cls("json_object", json.dumps({"type": "object"}))

    @classmethod
    def choice(cls, choices) -> Constraint:
        """Exactly one of ``choices`` (non-empty strings).

        Raises:
            BarkError: no choices, more than :data:`MAX_CHOICES`, or one empty, not a string or
                longer than :data:`MAX_CHOICE_CHARS`.
        """
        if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
            raise BarkError(f"choice needs a list of 1 to {MAX_CHOICES} strings")
        if any(not isinstance(c, str) or not c or len(c) > MAX_CHOICE_CHARS for c in choices):
            raise BarkError(f"each choice must be a string of 1 to {MAX_CHOICE_CHARS} characters")
        return cls("choice", json.dumps(list(dict.fromkeys(choices)), ensure_ascii=False))

    @classmethod
    def regex(cls, pattern) -> Constraint:
        """Text that matches ``pattern`` whole (Rust ``regex`` syntax: no look-around or backreferences).

        Raises:
            BarkError: not a string of 1 to :data:`MAX_REGEX_CHARS` characters.
        """
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_REGEX_CHARS:
            raise BarkError(f"the regex must be a string of 1 to {MAX_REGEX_CHARS} characters")
        return cls("regex", pattern)

    @classmethod
    def grammar(cls, text) -> Constraint:
        """Text in the language of a Lark grammar (llguidance's Lark dialect, start rule ``start``;
        vLLM's ``grammar``). Raises BarkError for an empty or over-long one."""
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_SPEC_CHARS:
            raise BarkError(f"the grammar must be Lark text of 1 to {MAX_SPEC_CHARS} characters")
        return cls("grammar", text)

    @classmethod
    def tool_calls(cls, tools, name: str | None = None, parallel: bool = True) -> Constraint:
        """One or more (``parallel``) ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
        of the listed functions (OpenAI's ``tools``), each ``arguments`` valid under the function's
        ``parameters``; with ``name``, calls of that function only.

        Raises:
            BarkError: bad tools (see :func:`check_tools`), or ``name`` is not one of them.
        """
        checked = check_tools(tools)
        if name is not None:
            picked = [t for t in checked if t["name"] == name]
            if not picked:
                raise BarkError(f"tool_choice names {name!r}, which is not in tools ({', '.join(t['name'] for t in checked)})")
            checked = picked
        return cls("tool_calls", json.dumps(checked, ensure_ascii=False), parallel)

    def lark(self) -> str:
        """The constraint as one llguidance Lark grammar (rule ``start``)."""
        if self.kind == "grammar":
            return self.value
        return f"start: {self._body()}\n" + (self._tool_rules() if self.kind == "tool_calls" else "")

    def _body(self) -> str:
        if self.kind in ("json_schema", "json_object"):
            return "%json " + json.dumps({**json.loads(self.value), "x-guidance": JSON_OPTIONS})
        if self.kind == "choice":
            return " | ".join(json.dumps(c) for c in json.loads(self.value))
        if self.kind == "regex":
            return "/" + re.sub(r"(?<!\\)((?:\\\\)*)/", r"\1\\/", self.value) + "/"  # an unescaped / would end the literal
        return "call+" if self.parallel else "call"

    def _tool_rules(self) -> str:
        one_of = [
            {
                "type": "object",
                "properties": {"name": {"const": t["name"]}, "arguments": t["parameters"]},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for t in json.loads(self.value)
        ]
        body = json.dumps({"anyOf": one_of, "x-guidance": JSON_OPTIONS})
        return f"call: {json.dumps(TOOL_CALL_OPEN)} call_body {json.dumps(TOOL_CALL_CLOSE)}\ncall_body: %json {body}\n"


# ---- compiling, for one tokenizer ----------------------------------------------------------------


class _TokenizerWrapper:
    """What ``llguidance.LLTokenizer`` reads of a tokenizer: each id's bytes, EOS, the special ids
    and an encode function."""

    def __init__(self, tok: Tokenizer):
        self.eos_token_id, self.bos_token_id = tok.eos_id, None
        self.special_token_ids = sorted(tok._special_ids())
        sep = b" " if tok.kind == "word" else b""  # decode joins words with spaces: see compile_constraint
        self.tokens = [sep + tok.id_to_bytes(i) for i in range(tok.vocab_size)]
        self._encode = tok.encode

    def __call__(self, text) -> list[int]:
        return self._encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)


_LL_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> LLTokenizer
_COMPILED: collections.OrderedDict = collections.OrderedDict()  # (id(tokenizer), Constraint) -> CompiledConstraint
_LOCK = threading.Lock()


def ll_tokenizer(tok: Tokenizer):
    """The ``llguidance.LLTokenizer`` of ``tok`` (built once per tokenizer object, ~10 ms at 2048 tokens)."""
    import llguidance

    with _LOCK:
        llt = _LL_TOKENIZERS.get(tok)
        if llt is None:
            llt = _LL_TOKENIZERS[tok] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_TokenizerWrapper(tok)))
        return llt


class CompiledConstraint:
    """A constraint compiled for one tokenizer: a fresh matcher to copy per row, the EOS id, the
    vocabulary size and the special tokens it always forbids. Get one from :func:`compile_constraint`."""

    def __init__(self, matcher, tok: Tokenizer, constraint: Constraint):
        self.matcher, self.constraint = matcher, constraint
        self.eos_id, self.vocab_size = tok.eos_id, tok.vocab_size
        # Special tokens other than EOS never write grammar text; the library may still set one
        # (it allows one token rather than none at a dead end), so they are always forbidden.
        self.special = np.zeros(self.vocab_size, dtype=np.bool_)
        self.special[[i for i in tok._special_ids() if i != tok.eos_id and i < self.vocab_size]] = True

    def new_matcher(self):
        """A matcher at the start of the grammar (a copy of the compiled one: cheap)."""
        return self.matcher.deep_copy()

    def forbidden(self, matcher) -> np.ndarray:
        """(V,) bool NumPy array: True for the tokens ``matcher`` forbids next (EOS is allowed
        once the grammar may end).

        The library writes one byte per token (0: forbidden), read in place by ``np.frombuffer``:
        on a 2048-token vocabulary that takes ~4 us, against ~20 us for the same few tensor ops
        in torch (its per-op dispatch) or ~35 us to unpack its 32-tokens-per-int32 bitmask.
        """
        forbid = np.frombuffer(matcher.compute_logit_bias(), dtype=np.uint8)[: self.vocab_size] == 0
        forbid |= self.special
        return forbid

    def allowed(self, matcher) -> torch.Tensor:
        """(V,) bool tensor: the tokens ``matcher`` allows next (the complement of :meth:`forbidden`)."""
        import torch

        return torch.from_numpy(~self.forbidden(matcher))


def library_reason(error: str) -> str:
    """The gist of an llguidance error, on one line: without its position prefix (``at 1(8):``),
    its echo of the grammar (``1 | start: ...``) and its wrapper words."""
    text = error.split("\n   1 |")[0].split("\n1 |")[0]
    text = re.sub(r"^at \d+\(\d+\): ", "", text.strip())
    text = text.replace("failed to compile JSON schema: ", "").replace(" (in regex)", "")
    return " ".join(text.split())[:300]


def compile_constraint(tok: Tokenizer, constraint: Constraint) -> CompiledConstraint:
    """``constraint`` compiled for ``tok``, cached per (tokenizer, constraint) (LRU of
    :data:`COMPILED_CACHED`). Thread-safe.

    A word tokenizer's tokens are compiled as ``" " + word`` (decode joins words with single
    spaces), so its grammar sees ``" " + text``: a leading space is put before the constraint.

    Raises:
        BarkError: the library cannot compile it (its reason is in the message), or ``tok`` cannot
            write any text it allows (:func:`check_typeable`), e.g. JSON with a word vocabulary
            that has no ``{``.
    """
    key = (id(tok), constraint)
    with _LOCK:
        hit = _COMPILED.get(key)
        if hit is not None and hit[0]() is tok:
            _COMPILED.move_to_end(key)
            return hit[1]
    import llguidance

    lark = constraint.lark()
    if tok.kind == "word":
        if constraint.kind == "grammar":
            raise BarkError("a Lark grammar cannot constrain a word-level tokenizer; use choice or regex, or a bpe/char model")
        lark = lark.replace("start: ", 'start: " " ', 1)
    matcher = llguidance.LLMatcher(ll_tokenizer(tok), llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
    if matcher.is_error():
        reason = library_reason(matcher.get_error())
        raise BarkError(f"the {constraint.kind.replace('_', ' ')} does not compile: {reason}")
    compiled = CompiledConstraint(matcher, tok, constraint)
    check_typeable(compiled, tok)
    with _LOCK:
        _COMPILED[key] = (weakref.ref(tok), compiled)
        while len(_COMPILED) > COMPILED_CACHED:
            _COMPILED.popitem(last=False)
    return compiled


_PROBE_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Tokenizer -> (rank, bytes any token holds)


def _probe_table(tok: Tokenizer):
    """``(rank, present)`` for the probe, built once per tokenizer: ``rank`` (V,) float, its
    preference per token (lower first: tokens that close a value (``"``, ``}``, ``]``), then
    digits, then structure, then the rest, shorter first), and the set of bytes some token holds."""
    import torch

    with _LOCK:
        table = _PROBE_TABLES.get(tok)
    if table is not None:
        return table
    rank, present, special = [], set(), tok._special_ids()
    for i in range(tok.vocab_size):
        b = tok.id_to_bytes(i) if i not in special else b""
        present.update(b)
        head = b[:1]
        group = 0 if head in (b'"', b"}", b"]") else 1 if head.isdigit() else 2 if head in (b"{", b"[", b":", b",") else 3
        rank.append(group * 1000 + min(len(b), 999))
    table = (torch.tensor(rank, dtype=torch.float32), present)
    with _LOCK:
        _PROBE_TABLES[tok] = table
    return table


def check_typeable(compiled: CompiledConstraint, tok: Tokenizer) -> None:
    """Make sure ``tok`` can write some complete text the grammar allows: a probe writes one,
    greedily (tokens that close values first), for at most :data:`PROBE_STEPS` tokens. A state
    where no token is allowed and the grammar is not complete means the vocabulary lacks what
    the grammar needs. A probe that runs out of steps (a grammar that may go on, such as digits
    of an unbounded number) passes, unless it opened a ``{`` or ``[`` that no token can close.

    Raises:
        BarkError: naming the text written so far and the bytes the grammar needed next.
    """
    import torch

    m = compiled.new_matcher()
    rank, present = _probe_table(tok)
    written = b""
    for _ in range(PROBE_STEPS):
        if m.is_accepting() or m.is_stopped():
            return
        ok = compiled.allowed(m)
        ok[compiled.eos_id] = False
        if not ok.any():
            need = m.compute_ff_bytes() or b"?"
            return _untypeable(compiled, tok, written, need.lstrip(b" ") if tok.kind == "word" else need)
        t = int(torch.where(ok, rank, float("inf")).argmin())
        written += tok.id_to_bytes(t)
        m.consume_token(t)
    for opener, closer in (("{", "}"), ("[", "]")):
        if opener.encode() in written and ord(closer) not in present:
            _untypeable(compiled, tok, written[:40], closer.encode())


def _untypeable(compiled: CompiledConstraint, tok: Tokenizer, written: bytes, need: bytes) -> None:
    raise BarkError(
        f"this model's {tok.kind} tokenizer ({tok.vocab_size} tokens) cannot write the requested "
        f"{compiled.constraint.kind.replace('_', ' ')}: after {written.decode('utf-8', 'replace')!r} "
        f"it has no token for {need.decode('utf-8', 'replace')!r}; use a model with a byte-level BPE tokenizer"
    )


# ---- logits processors (engine Row hooks: fn(row, logits (V,)) -> logits (V,)) ------------------


class GrammarProcessor:
    """A constraint as a row hook: masks the tokens the grammar forbids with ``-inf``, and allows
    only EOS once the grammar is complete (or at a dead end, which :func:`check_typeable` rules
    out at the start). One instance may serve many rows: each row gets its own matcher on its
    first call, kept while the row lives.

    Each call first feeds the row's matcher the tokens accepted since the previous call
    (``row.generated``), so it follows the row whatever the sampler chose; a token the grammar
    refuses (only possible if a later hook allowed it) ends the row with EOS.

    Args:
        compiled: from :func:`compile_constraint`.
    """

    def __init__(self, compiled: CompiledConstraint):
        self.compiled = compiled
        self._rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # row -> [matcher, tokens seen]

    def start(self, row, seen: int, matcher=None) -> None:
        """Apply the grammar to ``row`` from its ``seen``-th generated token on (``matcher``: one
        already advanced, else a fresh one)."""
        self._rows[row] = [matcher if matcher is not None else self.compiled.new_matcher(), seen]

    def __call__(self, row, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> (V,) logits with forbidden tokens at ``-inf``."""
        state = self._rows.get(row)
        if state is None:
            self.start(row, 0)
            state = self._rows[row]
        matcher, eos = state[0], self.compiled.eos_id
        new, state[1] = row.generated[state[1] :], len(row.generated)
        if (new and not matcher.consume_tokens(new)) or matcher.is_stopped():
            return only_eos(logits, eos)
        forbid = self.compiled.forbidden(matcher)
        if forbid.all():  # a dead end (check_typeable rules it out at the start)
            return only_eos(logits, eos)
        import torch

        if logits.device.type != "cpu":
            return logits.masked_fill(torch.from_numpy(forbid).to(logits.device), float("-inf"))
        out = logits.numpy().copy()  # NumPy: ~4 us for the 2 ops, against ~15 us in torch (dispatch)
        out[forbid] = -np.inf
        return torch.from_numpy(out)

    def complete(self, row) -> bool:
        """Whether ``row``'s text so far is a complete sentence of the grammar."""
        state = self._rows.get(row)
        return state is not None and state[0].is_accepting()


def only_eos(logits: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(V,) logits that allow EOS alone."""
    out = logits.new_full(logits.shape, float("-inf"))
    out[eos_id] = 0.0
    return out


class ToolCallTrigger:
    """``tool_choice: "auto"``: a row writes freely until its text holds ``<tool_call>``, then the
    tool-call grammar applies from that marker on (the marker and whatever the same token wrote
    after it are fed to the grammar first), as vLLM's and xgrammar's structural-tag triggers do.
    One instance may serve many rows (state per row, as :class:`GrammarProcessor`).

    Args:
        compiled: a compiled :meth:`Constraint.tool_calls`.
        tok: the rows' tokenizer (for the bytes of each token and to encode the marker's text).
    """

    def __init__(self, compiled: CompiledConstraint, tok: Tokenizer):
        self.tok, self.grammar = tok, GrammarProcessor(compiled)
        self._marker = TOOL_CALL_OPEN.encode()
        # row -> [the text's bytes not yet searched past, tokens seen], or [None, ...] once free
        self._rows: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __call__(self, row, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> (V,) logits: unchanged before the marker, masked by the grammar from it on."""
        if row in self.grammar._rows:
            return self.grammar(row, logits)
        state = self._rows.setdefault(row, [b"", 0])
        if state[0] is None:  # the marker ran into text no call starts with: free
            return logits
        state[0] += b"".join(self.tok.id_to_bytes(t) for t in row.generated[state[1] :])
        state[1] = len(row.generated)
        at = state[0].find(self._marker)
        if at < 0:  # keep only a tail that may start the marker: O(1) work per decode step
            state[0] = state[0][-(len(self._marker) - 1) :]
            return logits
        matcher = self.grammar.compiled.new_matcher()
        if not matcher.consume_tokens(self.tok.encode(state[0][at:].decode("utf-8", "replace"))):
            state[0] = None
            return logits
        self.grammar.start(row, state[1], matcher)
        return self.grammar(row, logits)


class LogitBias:
    """OpenAI's ``logit_bias``: add ``bias[id]`` to token ``id``'s logit; -100 bans the token.

    Args:
        bias: token id (int, or its decimal string as JSON sends it) -> bias in [-100, 100].
        vocab_size: the model's vocabulary.

    Raises:
        BarkError: more than :data:`MAX_LOGIT_BIAS` entries, an id outside ``[0, vocab_size)``,
            or a bias outside [-100, 100].
    """

    def __init__(self, bias: dict, vocab_size: int):
        import torch

        if len(bias) > MAX_LOGIT_BIAS:
            raise BarkError(f"logit_bias has {len(bias)} entries, more than {MAX_LOGIT_BIAS}")
        ids, values = [], []
        for k, v in bias.items():
            try:
                i = int(k)
            except (TypeError, ValueError):
                raise BarkError(f"logit_bias keys must be token ids, got {k!r}") from None
            if not 0 <= i < vocab_size:
                raise BarkError(f"logit_bias token id {i} is outside [0, {vocab_size})")
            if not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise BarkError(f"logit_bias values must be numbers in [-100, 100], got {v!r} for token {i}")
            ids.append(i)
            values.append(float("-inf") if v <= -100 else float(v))
        self.ids = torch.tensor(ids, dtype=torch.long)
        self.values = torch.tensor(values, dtype=torch.float32)

    def __call__(self, row, logits: torch.Tensor) -> torch.Tensor:
        """(V,) logits -> (V,) logits with the biases added."""
        if self.ids.device != logits.device:
            self.ids, self.values = self.ids.to(logits.device), self.values.to(logits.device)
        return logits.index_add(0, self.ids, self.values.to(logits.dtype))


def processors_for(tok: Tokenizer, constraint: Constraint | None = None, auto_tools: Constraint | None = None, logit_bias=None):
    """A fresh list of row hooks for one row: ``logit_bias`` first, then the constraint (or the
    ``auto`` tool-call trigger). Compiles (cached) on the first call for a constraint.

    Raises:
        BarkError: see :func:`compile_constraint` and :class:`LogitBias`.
    """
    hooks = []
    if logit_bias:
        hooks.append(LogitBias(logit_bias, tok.vocab_size))
    if constraint is not None:
        hooks.append(GrammarProcessor(compile_constraint(tok, constraint)))
    elif auto_tools is not None:
        hooks.append(ToolCallTrigger(compile_constraint(tok, auto_tools), tok))
    return hooks
