"""Tokenizers over Hugging Face ``tokenizers``: byte-level BPE, characters, and whitespace words.

Three kinds share one :class:`Tokenizer` class and one file format:

- ``bpe``: GPT-2's byte-level BPE (Radford et al. 2019; the GPT-2 pre-tokenizer regex, then BPE
  over the 256 byte symbols), so every string encodes and none maps to ``<UNK>``.
- ``char``: one token per distinct character, as nanoGPT's ``shakespeare_char/prepare.py``.
- ``word``: one token per whitespace-separated word, trained or over a fixed vocabulary
  (:meth:`Tokenizer.from_words`).

A tokenizer is a folder with ``tokenizer.json`` (the ``tokenizers`` library's own file, which
``transformers.PreTrainedTokenizerFast`` also loads) and ``tokenizer_config.json`` (kind, special
tokens, chat template). Special tokens ``<PAD> <EOS> <BOS> <UNK>`` are registered as special
added tokens, so the text ``"<EOS>"`` encodes to the EOS id in every kind. Nothing adds BOS or EOS
automatically.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from barkgpt.common import BarkError, atomic_write_text

KINDS = ("bpe", "char", "word")
PAD, EOS, BOS, UNK = "<PAD>", "<EOS>", "<BOS>", "<UNK>"
SPECIAL_TOKENS = (PAD, EOS, BOS, UNK)  # ids 0..3, in this order, in every trained tokenizer
BPE_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet plus the specials
MIN_VOCAB = len(SPECIAL_TOKENS) + 1  # char/word: the specials plus at least one real token
# Role markers that fine-tuning adds to a tokenizer that lacks them (see Tokenizer.with_chat_tokens):
# special tokens cannot be forged by text in a message, and mark turns in one token each.
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# Chat templates are Jinja, rendered the way transformers' apply_chat_template does (sandboxed,
# trim_blocks, lstrip_blocks, with `messages`, `add_generation_prompt`, `bos_token`, `eos_token`
# and `raise_exception`), so an exported tokenizer chats the same in transformers.
# word: "User: {c} " / "Assistant: {c} <EOS> " / prompt "Assistant:", words apart by spaces. A
# small fixed word vocabulary has no words for a system role, so system messages are skipped
# rather than turned into <UNK> tokens.
WORD_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + ' ' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{%- elif message['role'] != 'system' -%}"
    "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use user or assistant') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
# Tool calls follow transformers' `apply_chat_template(messages, tools=...)` convention (OpenAI tool
# objects in `tools`, assistant `tool_calls`, `tool` role results). With tools, the system turn (the
# first message's own system text, then a blank line) lists each function as one JSON line and says
# how to call one; an assistant turn writes its calls after its text as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>, which the server parses back out of a
# reply; a tool result is a user turn wrapped in <tool_response>...</tool_response>.
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def _tools_prelude(system_open: str, turn_end: str) -> str:
    """Jinja that starts a chat template: sets ``loop_messages`` and, when ``tools`` are given,
    renders the system turn that lists them. ``system_open`` and ``turn_end`` are Jinja string
    expressions that start and end a system turn."""
    return (
        "{%- set loop_messages = messages -%}"
        "{%- if tools -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system_text = messages[0]['content'] + '\\n\\n' -%}"
        "{%- set loop_messages = messages[1:] -%}"
        "{%- else -%}"
        "{%- set system_text = '' -%}"
        "{%- endif -%}"
        "{{ " + system_open + " + system_text + '# Tools\\n' }}"
        "{%- for tool in tools -%}"
        "{{ (tool['function'] if tool['function'] is defined else tool) | tojson }}{{ '\\n' }}"
        "{%- endfor -%}"
        '{{ \'Call a tool as <tool_call>{"name": NAME, "arguments": {...}}</tool_call>\' + ' + turn_end + " }}"
        "{%- endif -%}"
    )


# An assistant message's tool calls, each `<tool_call>{"name": "N", "arguments": ARGS}</tool_call>`:
# ARGS is the arguments' JSON text as OpenAI sends it (a string), or a mapping through tojson.
_TOOL_CALLS = (
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{{ '<tool_call>{\"name\": ' + (fn['name'] | tojson) + ', \"arguments\": ' }}"
    "{{ (fn['arguments'] if fn['arguments'] is string else (fn['arguments'] | tojson)) + '}</tool_call>' }}"
    "{%- endfor -%}"
)
_UNKNOWN_ROLE = "{{ raise_exception('unknown chat role ' ~ message['role'] ~ '; use system, user, assistant or tool') }}"
# bpe and char: one line per turn, the assistant's turn closed by EOS.
CHAT_TEMPLATE = (
    _tools_prelude("'System: '", "'\\n'") + "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{ 'System: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{{ 'User: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ 'Assistant: ' + (message['content'] or '') }}" + _TOOL_CALLS + "{{ eos_token + '\\n' }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ 'User: <tool_response>' + message['content'] + '</tool_response>\\n' }}"
    "{%- else -%}" + _UNKNOWN_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)
# Fine-tuned models: each turn is a role token, the content, then <EOS> (end of turn); the
# generation prompt is <|assistant|>, and generation stops at the <EOS> that closes the reply.
CHAT_TOKENS_TEMPLATE = (
    _tools_prelude("'<|system|>'", "eos_token") + "{%- for message in loop_messages -%}"
    "{%- if message['role'] in ('system', 'user') -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ '<|assistant|>' + (message['content'] or '') }}" + _TOOL_CALLS + "{{ eos_token }}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{ '<|user|><tool_response>' + message['content'] + '</tool_response>' + eos_token }}"
    "{%- else -%}" + _UNKNOWN_ROLE + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (openai/gpt-2 ``encoder.py``), as ByteLevel uses.

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100 onwards.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class IncrementalDecoder:
    """Streams text out of token ids one id at a time, in O(1) work per id.

    Concatenating every ``add()`` output and the final ``flush()`` equals
    ``Tokenizer.decode(all_ids, skip_special_tokens)``, and no output ever holds half of a UTF-8
    character: for ``bpe`` the bytes of a multi-byte character split across tokens are held back
    until the character completes, and an incomplete one left at ``flush()`` becomes U+FFFD (as
    ``decode`` does). Ids outside the vocabulary give ``""``, as ``decode`` skips them.

    Get one from :meth:`Tokenizer.decoder`; use a fresh one per sequence.
    """

    def __init__(self, pieces: list, kind: str, skip_ids: frozenset[int]):
        self._pieces = pieces  # id -> bytes (bpe) or str (char, word); None for a hole
        self._skip = skip_ids
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace") if kind == "bpe" else None
        self._sep = " " if kind == "word" else ""  # decode joins words with single spaces
        self._started = False

    def add(self, token_id: int) -> str:
        """Feed one token id; return the text it completes (possibly ``""``)."""
        token_id = int(token_id)
        if not 0 <= token_id < len(self._pieces) or token_id in self._skip:
            return ""
        piece = self._pieces[token_id]
        if piece is None:
            return ""
        if self._utf8 is not None:
            return self._utf8.decode(piece)
        if self._started:
            return self._sep + piece
        self._started = True
        return piece

    def flush(self) -> str:
        """End the sequence: return held-back text (bpe: U+FFFD for an incomplete character)."""
        return self._utf8.decode(b"", final=True) if self._utf8 is not None else ""


class Tokenizer:
    """A trained tokenizer: text <-> token ids, special tokens, chat template, save/load.

    Build one with :meth:`train`, :meth:`from_words` or :meth:`load`, not the constructor.

    Attributes:
        kind: ``"bpe"``, ``"char"`` or ``"word"``.
        chat_template: Jinja source rendered by :meth:`apply_chat_template`.
        model_max_length: the context length to advertise in ``tokenizer_config.json``, or None.
        pad_token, eos_token, bos_token, unk_token: the special tokens' text (``<PAD>``...; an
            imported tokenizer's own, e.g. GPT-2's ``<|endoftext|>``), and ``*_id`` their ids.

    Raises:
        BarkError: unknown kind, or a special token missing from the vocabulary.
    """

    def __init__(
        self,
        tk: HFTokenizer,
        kind: str,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        special_tokens: dict[str, str] | None = None,
    ):
        if kind not in KINDS:
            raise BarkError(f"unknown tokenizer kind {kind!r}; use bpe, char or word")
        self._tk = tk
        self.kind = kind
        self.chat_template = chat_template if chat_template is not None else _default_template(kind)
        self.model_max_length = model_max_length
        # Role -> token text. Ours are <PAD> <EOS> <BOS> <UNK>; an imported tokenizer (GPT-2's
        # "<|endoftext|>") names its own, and a role it lacks falls back to the EOS token.
        names = dict(zip(("pad", "eos", "bos", "unk"), SPECIAL_TOKENS))
        names.update({k: v for k, v in (special_tokens or {}).items() if v})
        if tk.token_to_id(names["eos"]) is None:
            raise BarkError(
                f"the tokenizer has no {names['eos']} token; re-create it with `barkgpt prepare --input TEXT --out DIR`"
            )
        for role in ("pad", "bos", "unk"):
            if tk.token_to_id(names[role]) is None:
                if special_tokens is None:  # our own files always hold all four
                    raise BarkError(
                        f"the tokenizer has no {names[role]} token; re-create it with `barkgpt prepare --input TEXT --out DIR`"
                    )
                names[role] = names["eos"]
        self.pad_token, self.eos_token, self.bos_token, self.unk_token = (names[r] for r in ("pad", "eos", "bos", "unk"))
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (tk.token_to_id(names[r]) for r in ("pad", "eos", "bos", "unk"))
        self._pieces: list | None = None  # id -> text piece, built on first use (_get_pieces)
        self._template = None  # compiled chat template, built on first use

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
        """Train a tokenizer of ``kind`` on a stream of documents.

        Args:
            kind: ``bpe``, ``char`` or ``word``.
            texts: documents (or pieces of them), consumed once as a stream by
                ``tokenizers``' ``train_from_iterator``; a single ``str`` counts as one document.
            vocab_size: total vocabulary including the 4 special tokens. Required for ``bpe``
                (at least 260: 256 bytes + 4 specials; training stops early on tiny text). For
                ``char``/``word`` an optional cap (at least 5) that keeps the most frequent
                tokens, ties broken by token text.

        Returns:
            A tokenizer with ``<PAD>=0, <EOS>=1, <BOS>=2, <UNK>=3``.

        Raises:
            BarkError: unknown kind, vocab_size missing or too small, or (char/word) no text.
        """
        if kind not in KINDS:
            raise BarkError(f"unknown tokenizer kind {kind!r}; use bpe, char or word")
        if isinstance(texts, str):
            texts = [texts]
        if kind == "bpe":
            if vocab_size is None:
                raise BarkError(f"a bpe tokenizer needs a vocab size; pass --vocab-size N (N >= {BPE_MIN_VOCAB})")
            if vocab_size < BPE_MIN_VOCAB:
                raise BarkError(
                    f"vocab_size {vocab_size} is too small for bpe: the minimum is {BPE_MIN_VOCAB} "
                    f"(256 bytes + 4 special tokens); pass --vocab-size {BPE_MIN_VOCAB} or more"
                )
        elif vocab_size is not None and vocab_size < MIN_VOCAB:
            raise BarkError(
                f"vocab_size {vocab_size} is too small for {kind}: the minimum is {MIN_VOCAB} "
                f"(4 special tokens + 1); pass --vocab-size {MIN_VOCAB} or more, or leave it unset"
            )
        tk = _empty(kind)
        if kind == "bpe":
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=list(SPECIAL_TOKENS),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                show_progress=False,
            )
        else:
            # WordLevelTrainer sorts by count, then by token text, so the result is deterministic.
            trainer = trainers.WordLevelTrainer(
                vocab_size=vocab_size or 2**31 - 1, special_tokens=list(SPECIAL_TOKENS), show_progress=False
            )
        tk.train_from_iterator(texts, trainer=trainer)
        if kind != "bpe" and tk.get_vocab_size(with_added_tokens=True) <= len(SPECIAL_TOKENS):
            raise BarkError(f"no text to train the {kind} tokenizer on; check that the input is not empty")
        return cls(tk, kind)

    @classmethod
    def from_words(cls, vocab: Sequence[str], chat_template: str | None = None) -> Tokenizer:
        """A word tokenizer over a fixed vocabulary: token id = position in ``vocab``.

        For generated corpora whose words are known in advance (a toy dataset, a plugin's). Text
        splits on whitespace; a word not in ``vocab`` encodes to ``<UNK>``.

        Args:
            vocab: the tokens, each a non-empty string without whitespace, no repeats; it must
                hold the four special tokens ``<PAD> <EOS> <BOS> <UNK>`` (anywhere).
            chat_template: Jinja chat template; None gives the word kind's ``WORD_CHAT_TEMPLATE``.

        Raises:
            BarkError: a special token missing, a repeated token, or an empty one or one with
                whitespace.
        """
        vocab = list(vocab)
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise BarkError(f"the word vocabulary lacks the special token(s) {', '.join(missing)}; add them to it")
        if len(set(vocab)) != len(vocab):
            twice = sorted({t for t in vocab if vocab.count(t) > 1})
            raise BarkError(f"the word vocabulary repeats {', '.join(map(repr, twice))}; list each token once")
        bad = [t for t in vocab if not isinstance(t, str) or not t or t != "".join(t.split())]
        if bad:
            raise BarkError(f"word tokens must be non-empty text without whitespace; got {bad[0]!r}")
        tk = HFTokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token=UNK))
        tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        # Tokens already in the vocabulary keep their ids when registered as special.
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        return cls(tk, "word", chat_template)

    def with_chat_tokens(self) -> tuple[Tokenizer, int]:
        """This tokenizer with the chat role tokens ``<|system|> <|user|> <|assistant|>``, for fine-tuning.

        A tokenizer that already has all three is returned as it is, chat template included. Otherwise
        the missing ones are added as special tokens (new ids from ``vocab_size`` upwards; existing ids
        do not move) and the chat template becomes ``CHAT_TOKENS_TEMPLATE``, which uses them. The
        model's embeddings must then grow to the new ``vocab_size``.

        Returns:
            ``(tokenizer, n_added)``: a new tokenizer when tokens were added (this one is unchanged).
        """
        missing = [t for t in CHAT_TOKENS if self._tk.token_to_id(t) is None]
        if not missing:
            return self, 0
        tk = HFTokenizer.from_str(self._tk.to_str())
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        special = {"pad": self.pad_token, "eos": self.eos_token, "bos": self.bos_token, "unk": self.unk_token}
        return Tokenizer(tk, self.kind, CHAT_TOKENS_TEMPLATE, self.model_max_length, special), len(missing)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer folder (``tokenizer.json`` plus optional ``tokenizer_config.json``).

        ``path`` may also name the ``tokenizer.json`` file itself. Without a config, the kind
        is inferred from the model (BPE -> bpe; WordLevel split per character -> char, else word).

        Raises:
            BarkError: the folder or ``tokenizer.json`` is missing, or a file is corrupt.
        """
        path = Path(path)
        folder = path.parent if path.is_file() else path
        tk_file = folder / "tokenizer.json"
        if not tk_file.is_file():
            raise BarkError(f"no tokenizer.json in {folder}; pass a data folder from `barkgpt prepare` or a checkpoint folder")
        try:
            tk = HFTokenizer.from_file(str(tk_file))
        except Exception as e:  # tokenizers raises plain Exception on bad JSON or schema
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise BarkError(
                f"{tk_file} is corrupt ({reason}); re-create it with `barkgpt prepare --input TEXT --out DIR`"
            ) from None
        config: dict = {}
        cfg_file = folder / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise BarkError(f"{cfg_file} is not valid JSON ({e}); fix or delete it") from None
            if not isinstance(config, dict):
                raise BarkError(f"{cfg_file} does not hold a JSON object; fix or delete it")
        kind = config.get("kind") or _infer_kind(tk)
        special = {role: _token_text(config.get(f"{role}_token")) for role in ("pad", "eos", "bos", "unk")}
        special = special if any(special.values()) else None
        return cls(tk, kind, config.get("chat_template"), config.get("model_max_length"), special)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into folder ``path`` (created if
        needed), each atomically. The config holds the fields transformers reads
        (``tokenizer_class``, special tokens, ``chat_template``, ``add_bos_token``) plus ``kind``.
        """
        folder = Path(path)
        atomic_write_text(folder / "tokenizer.json", self._tk.to_str(pretty=True))
        config = {
            "kind": self.kind,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # else transformers rewrites " ." to "." on decode
            "chat_template": self.chat_template,
        }
        extra = [t for t in CHAT_TOKENS if self._tk.token_to_id(t) is not None]
        if extra:  # transformers treats these as special too (skip_special_tokens drops them)
            config["additional_special_tokens"] = extra
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        atomic_write_text(folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    # ---- encoding and decoding --------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included (ids are ``0..vocab_size-1``)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids. Adds no BOS/EOS; ``"<EOS>"`` etc. in the text map to their ids.

        bpe never produces ``<UNK>``; char/word map unseen characters/words to ``unk_id``.
        """
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel threads (the fast path for data preparation).

        Returns one id list per text, each equal to ``encode(text)``.
        """
        return [e.ids for e in self._tk.encode_batch_fast(texts, add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Like :meth:`encode`, plus each token's ``(start, end)`` character offsets in ``text``.

        The bytes of one character split over several bpe tokens give each of them that
        character's offsets. Fine-tuning uses the offsets to find the tokens of assistant turns.
        """
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each token id stands for in decoded text, indexed by id (for bits per byte).

        bpe: the token's bytes; char: the character's; word: the word's plus one for the space
        that joins words; special tokens (``<EOS>``, role tokens...) and ``<UNK>``: 0.
        """
        special = self._special_ids()
        out = []
        for i, piece in enumerate(self._get_pieces()):
            if piece is None or i in special:
                out.append(0)
            elif isinstance(piece, bytes):
                out.append(len(piece))
            else:
                out.append(len(piece.encode("utf-8")) + (self.kind == "word"))
        return out

    def id_to_bytes(self, i: int) -> bytes:
        """The raw UTF-8 bytes token id ``i`` stands for, as OpenAI's logprob ``bytes`` give them.

        bpe: the token's own bytes, which may be part of a multi-byte character (``decode([i])``
        shows those as U+FFFD); char/word: the character's or word's UTF-8; special tokens: their
        text's UTF-8 (``<EOS>``). Ids outside ``0..vocab_size-1`` give ``b""``.
        """
        pieces = self._get_pieces()
        piece = pieces[i] if 0 <= i < min(self.vocab_size, len(pieces)) else None
        if piece is None:
            return b""
        return piece if isinstance(piece, bytes) else piece.encode("utf-8")

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Token ids -> text. Ids outside ``0..vocab_size-1`` are skipped.

        bpe joins the bytes of all tokens (invalid UTF-8 becomes U+FFFD); char concatenates the
        characters; word joins the words with single spaces.
        """
        n = self.vocab_size
        return self._tk.decode([i for i in map(int, ids) if 0 <= i < n], skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = False, continuation: bool = False) -> IncrementalDecoder:
        """A fresh :class:`IncrementalDecoder` for streaming one sequence's text token by token.

        Args:
            skip_special_tokens: leave out ``<PAD> <EOS> <BOS> <UNK>``.
            continuation: the ids continue text decoded before (a prompt), so for ``word``
                tokenizers the first word also gets its separating space: prompt text plus the
                streamed pieces then equals ``decode(prompt_ids + new_ids)``.
        """
        skip = self._special_ids() if skip_special_tokens else frozenset()
        dec = IncrementalDecoder(self._get_pieces(), self.kind, skip)
        dec._started = continuation
        return dec

    def spec(self) -> dict:
        """The ``tokenizer.json`` contents as a dict: ``model`` (type, ``vocab``, BPE ``merges``),
        ``pre_tokenizer``, ``decoder`` and ``added_tokens`` (the special tokens with their ids)."""
        return json.loads(self._tk.to_str())

    def token_to_id(self, token: str) -> int | None:
        """The id of one token (e.g. ``"<EOS>"``, ``"the"``), or None if it is not in the vocabulary."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The token string of an id (bpe: in GPT-2's byte alphabet, e.g. ``"Ġthe"``), or None."""
        if not 0 <= token_id < self.vocab_size:
            return None
        return self._tk.id_to_token(token_id)

    def count_unknown(self, text: str, ids: list[int] | None = None) -> int:
        """How many characters (char) or words (word) of ``text`` map to ``<UNK>``; 0 for bpe.

        A literal ``"<UNK>"`` in the text is the special token, not an unknown, and is not counted.
        ``ids``, when given, must be ``encode(text)``; it saves encoding the text again.
        """
        if self.kind == "bpe":
            return 0
        if ids is None:
            ids = self.encode(text)
        return ids.count(self.unk_id) - text.count(self.unk_token)

    # ---- chat -------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """Render a conversation to prompt text with :attr:`chat_template` (Jinja, as transformers).

        Args:
            messages: ``[{"role": "user"|"assistant"|"system"|"tool", "content": str}, ...]``; an
                assistant message may carry OpenAI ``tool_calls`` (``[{"id", "type": "function",
                "function": {"name", "arguments"}}]``, ``arguments`` JSON text or a mapping) with
                ``content`` None, and a ``tool`` message its ``tool_call_id``.
            add_generation_prompt: end with ``"Assistant:"`` so the model writes the reply.
            tools: OpenAI tool objects (``{"type": "function", "function": {"name", "description",
                "parameters"}}``), passed to the template as transformers'
                ``apply_chat_template(messages, tools=...)`` does; the built-in bpe/char templates
                list them in the system turn (see ``CHAT_TEMPLATE``), others may ignore them.

        Returns:
            The text, e.g. ``"User: hello Assistant:"`` for a word tokenizer and ``[{"role":
            "user", "content": "hello"}]``. Encode it with :meth:`encode`.

        Raises:
            BarkError: a message is not a dict with string ``role`` and ``content`` (content may
                be None beside ``tool_calls``), malformed ``tool_calls`` or ``tools``, a role the
                template does not know, or a broken template.
        """
        import jinja2

        _check_chat_input(messages, tools)
        try:
            if self._template is None:
                self._template = _jinja_env().from_string(self.chat_template)
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                pad_token=self.pad_token,
                unk_token=self.unk_token,
            )
        except jinja2.TemplateError as e:
            raise BarkError(f"chat template failed: {e}; fix the messages or the tokenizer's chat_template") from None

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"

    def _special_ids(self) -> frozenset[int]:
        """Ids of the tokens registered as special (``<PAD> <EOS> <BOS> <UNK>``, role tokens...)."""
        return frozenset(i for i, t in self._tk.get_added_tokens_decoder().items() if t.special)

    def _get_pieces(self) -> list:
        """The id -> piece table of :meth:`_build_pieces`, built on first use and kept."""
        if self._pieces is None:
            self._pieces = self._build_pieces()
        return self._pieces

    def _build_pieces(self) -> list:
        """id -> the bytes (bpe) or text (char/word) that token contributes to ``decode``."""
        vocab = self._tk.get_vocab(with_added_tokens=True)
        pieces: list = [None] * (max(vocab.values()) + 1)
        if self.kind != "bpe":
            for tok, i in vocab.items():
                pieces[i] = tok
            return pieces
        # ByteLevel's decoder maps each character back to its byte; a token with a character
        # outside the byte alphabet (only possible for added tokens) decodes to its UTF-8 bytes.
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        for tok, i in vocab.items():
            try:
                pieces[i] = bytes(byte_of[c] for c in tok)
            except KeyError:
                pieces[i] = tok.encode("utf-8")
        return pieces


def _empty(kind: str) -> HFTokenizer:
    """An untrained ``tokenizers`` pipeline for ``kind`` with the special tokens registered."""
    if kind == "bpe":
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.decoder = decoders.ByteLevel()
    else:
        tk = HFTokenizer(models.WordLevel(unk_token=UNK))
        if kind == "char":
            # Every code point is its own pre-token ([\s\S] also matches newlines); Fuse joins
            # tokens back with no separator. All three serialize into tokenizer.json.
            tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
            tk.decoder = decoders.Fuse()
        else:
            tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # no decoder: decode joins with " "
    # Registered before training so that "<EOS>" in training text is one token, not 5 characters.
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tk


def _token_text(value) -> str | None:
    """A special token as ``tokenizer_config.json`` gives it: a string, or HF's ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _infer_kind(tk: HFTokenizer) -> str:
    """Guess the kind of a ``tokenizer.json`` that came without ``tokenizer_config.json``."""
    spec = json.loads(tk.to_str())
    if spec["model"]["type"] == "BPE":
        return "bpe"
    pre = spec.get("pre_tokenizer") or {}
    return "char" if pre.get("type") == "Split" else "word"


def _default_template(kind: str) -> str:
    """The chat template of a kind: words apart by spaces for word tokenizers, else a line per turn."""
    return WORD_CHAT_TEMPLATE if kind == "word" else CHAT_TEMPLATE


def _check_chat_input(messages, tools) -> None:
    """Check the shapes ``apply_chat_template`` accepts (see there), so a bad request gets one clear line.

    Raises:
        BarkError: naming the first bad message, tool call or tool.
    """
    if not isinstance(messages, list):
        raise BarkError(f"chat messages must be a list of objects; got {type(messages).__name__}")
    for i, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        content_ok = isinstance(m, dict) and (isinstance(m.get("content"), str) or (calls and m.get("content") is None))
        if not (content_ok and isinstance(m.get("role"), str)):
            raise BarkError(f"chat message {i} must be an object with string 'role' and 'content'; got {m!r:.80}")
        if calls is None:
            continue
        if not isinstance(calls, list):
            raise BarkError(f"chat message {i}: 'tool_calls' must be a list of calls; got {calls!r:.80}")
        for c in calls:
            fn = c.get("function", c) if isinstance(c, dict) else None
            if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), str | dict)):
                raise BarkError(
                    f"chat message {i}: each tool call needs a 'function' with a string 'name' and 'arguments' "
                    f"(JSON text or an object); got {c!r:.80}"
                )
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise BarkError(f"tools must be a list of objects like {{'type': 'function', 'function': {{...}}}}; got {tools!r:.80}")


def _jinja_env():
    """A Jinja environment configured like transformers' chat-template renderer: sandboxed,
    ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, and ``tojson`` as ``json.dumps``
    (``ensure_ascii=False``, keys in order, no HTML escaping), not Jinja's own filter."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env
