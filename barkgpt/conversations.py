"""Chat data for fine-tuning: conversations in, packed rows with assistant-only targets out.

- **Reading**: JSONL with OpenAI-style ``messages`` (``role``/``content``; assistant ``tool_calls``,
  ``tool`` results and the row's ``tools`` list, as OpenAI's fine-tuning format) or ShareGPT-style
  ``conversations`` (``from``/``value``), one conversation per line.
- **Splitting**: train/val by group (a field such as OpenAssistant's ``tree_id``, so paths through
  one message tree, which share their opening turns, never straddle the split), or by conversation.
- **Rendering and masking**: the tokenizer's own Jinja chat template renders each conversation;
  the tokens of each assistant reply, up to and including the ``<EOS>`` that ends it, are the
  targets (a reply's tool calls included; tool results are not), and every other position gets
  ``IGNORE_INDEX`` (the SFT recipe of InstructGPT and nanochat's ``chat_sft``). The reply's span
  is found by rendering the conversation prefix by prefix, so it works for any template whose
  renders grow by appending.
- **Packing**: whole conversations (longer ones cut into block-sized pieces) are packed into rows
  of ``block_size`` tokens by best-fit decreasing. Each row carries segment ids, so training
  attends only within a conversation and restarts positions at each one (``train.SegmentMask``):
  a packed row gives the same loss as its conversations run one by one.

Conversations generated in code reach training as a :class:`ChatRows` built from a list of
conversations, through the dataset hook (``data.register_dataset``). A conversation is a message
list, or ``{"messages": [...], "tools": [...]}`` when it offers tools (rendered with them).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from barkgpt.common import BarkError
from barkgpt.tokenizer import Tokenizer

IGNORE_INDEX = -1  # targets GPT.forward's cross-entropy skips (its ignore_index)
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_FIELDS = ("tool_calls", "tool_call_id", "name")  # OpenAI message fields kept beside role and content
# ShareGPT's "from" values -> roles (ShareGPT/FastChat use human/gpt; some exports keep OpenAI's).
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "system": "system",
}


# ---- reading and splitting ------------------------------------------------------------------


def jsonl_rows(path: str | Path, what: str, expected: str) -> Iterator[tuple[int, object, str]]:
    """``(line number, row, "PATH line N")`` for each row of a JSONL file, blank lines skipped.

    Raises:
        BarkError: the file is missing (naming ``what`` it is and the ``expected`` content), or a
            line is not JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise BarkError(f"{what} {path} not found; pass {expected}")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                row = json.loads(line)
            except ValueError as e:
                raise BarkError(f"{where} is not valid JSON ({e}); fix or remove that line") from None
            yield n, row, where


def load_conversations(path: str | Path, group_field: str = "tree_id") -> list[dict]:
    """Read a JSONL file of conversations, OpenAI (``messages``) or ShareGPT (``conversations``) rows.

    Args:
        path: the ``.jsonl`` file; blank lines are skipped.
        group_field: a row field that groups conversations for the train/val split (rows without
            it are a group of their own).

    Returns:
        ``[{"messages": [{"role", "content"}, ...], "group": str, "tools": list | None}, ...]`` in
        file order; roles are ``system``, ``user``, ``assistant`` or ``tool`` (OpenAI rows only),
        and OpenAI messages keep ``tool_calls``, ``tool_call_id`` and ``name`` when they have them.

    Raises:
        BarkError: a missing file, a line that is not JSON, a row with neither field, a message
            without string content or with an unknown role, a conversation with no assistant
            turn, or a file with no conversations.
    """
    out = []
    for n, row, where in jsonl_rows(path, "chat data", "a .jsonl file with 'messages' or 'conversations' rows"):
        messages = _messages_of(row, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise BarkError(f"{where} has no assistant turn, so nothing to learn from; remove it or add the reply")
        group = row.get(group_field)  # a dict: _messages_of rejected every other row
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise BarkError(f"{where}: 'tools' must be a list of OpenAI tool objects; fix or drop it")
        out.append({"messages": messages, "group": f"#{n}" if group is None else str(group), "tools": tools})
    if not out:
        raise BarkError(f"{path} holds no conversations; add JSONL rows with a 'messages' list")
    return out


def _messages_of(row, where: str) -> list[dict]:
    """The ``[{"role", "content"}]`` list of one JSONL row in either format (see load_conversations)."""
    if isinstance(row, dict) and isinstance(row.get("messages"), list):
        raw, role_key, text_key = row["messages"], "role", "content"
    elif isinstance(row, dict) and isinstance(row.get("conversations"), list):
        raw, role_key, text_key = row["conversations"], "from", "value"
    else:
        raise BarkError(
            f"{where} has neither a 'messages' list (OpenAI format) nor a 'conversations' list "
            f"(ShareGPT format); convert it to one of them"
        )
    messages = []
    for i, m in enumerate(raw):
        calls = m.get("tool_calls") if isinstance(m, dict) and role_key == "role" else None
        if not isinstance(m, dict) or not (isinstance(m.get(text_key), str) or (calls and m.get(text_key) is None)):
            raise BarkError(
                f"{where}, message {i}: needs a string {text_key!r} (multi-part content is not supported); flatten it to text"
            )
        role = m.get(role_key)
        role = role if role_key == "role" else SHAREGPT_ROLES.get(role)
        if role not in ROLES or (role == "tool" and role_key != "role"):
            raise BarkError(
                f"{where}, message {i}: unknown role {m.get(role_key)!r}; use system, user, assistant or tool "
                f"(ShareGPT: system, human or gpt)"
            )
        extra = {k: m[k] for k in MESSAGE_FIELDS if role_key == "role" and m.get(k) is not None}
        messages.append({"role": role, "content": m[text_key], **extra})
    return messages


def split_conversations(conversations: list[dict], val_fraction: float = 0.1, seed: int = 1337) -> tuple[list[dict], list[dict]]:
    """Split conversations into train and val by group: every group lands wholly on one side.

    The groups, in order of first appearance, are shuffled with ``random.Random(seed)``, and the
    first ``round(n_groups * val_fraction)`` (at least 1) go to val.

    Returns:
        ``(train, val)``, each in file order.

    Raises:
        BarkError: ``val_fraction`` outside (0, 0.5], or fewer than 2 groups.
    """
    if not 0 < val_fraction <= 0.5:
        raise BarkError(f"val_fraction {val_fraction} is outside (0, 0.5]; pass --val-fraction 0.1, say")
    groups = list(dict.fromkeys(c["group"] for c in conversations))
    if len(groups) < 2:
        raise BarkError(
            f"the chat data has {len(groups)} group(s) of conversations, too few to split into train and val; "
            f"add conversations or use a --group-field that differs between them"
        )
    random.Random(seed).shuffle(groups)
    val_groups = set(groups[: max(1, round(len(groups) * val_fraction))])
    return ([c for c in conversations if c["group"] not in val_groups], [c for c in conversations if c["group"] in val_groups])


# ---- rendering, masking and packing ---------------------------------------------------------


def encode_conversation(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None
) -> tuple[list[int], list[bool]]:
    """Render a conversation with the tokenizer's chat template and mark its assistant tokens.

    An assistant turn's span runs from the end of the generation prompt (what ``chat`` feeds the
    model before the reply) through the first ``eos_token`` after it, or to the end of the turn if
    the template writes none: exactly what the model must produce at inference, its tool calls
    included. ``tools`` (OpenAI tool objects) render into every prefix, as the server renders a
    request that offers them.

    Returns:
        ``(ids, is_assistant)``: the token ids of the rendered text and, per token, whether it
        starts inside an assistant span.

    Raises:
        BarkError: a bad message (see ``apply_chat_template``), or a template whose render of
            the first ``i`` messages is not a prefix of the render of the first ``i + 1``.
    """
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools)
        turn = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False, tools=tools)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise BarkError(
                "the chat template does not render a conversation by appending turns (the render of the "
                "first messages is not a prefix of the whole); use a template that does"
            )
        end = turn.find(tokenizer.eos_token, len(prompt))
        spans.append((len(prompt), len(turn) if end < 0 else end + len(tokenizer.eos_token)))
    ids, offsets = tokenizer.encode_with_offsets(text)
    starts = np.array([s for s, _ in offsets], dtype=np.int64)
    mask = np.zeros(len(ids), dtype=bool)
    for lo, hi in spans:
        mask |= (starts >= lo) & (starts < hi)
    return ids, mask.tolist()


def conversation_pieces(ids: list[int], is_assistant: list[bool], block_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Turn one encoded conversation into training pieces of at most ``block_size`` positions.

    Position t has input ``ids[t]`` and target ``ids[t + 1]`` when that token is an assistant
    token, else ``IGNORE_INDEX``. A conversation longer than ``block_size + 1`` tokens is cut into
    consecutive pieces (each later piece starts without the earlier context); pieces with no
    target are dropped.

    Returns:
        ``[(x, y), ...]``, int64 arrays of equal length <= ``block_size``.
    """
    ids_a = np.asarray(ids, dtype=np.int64)
    targets = np.where(np.asarray(is_assistant[1:], dtype=bool), ids_a[1:], IGNORE_INDEX)
    inputs = ids_a[:-1]
    pieces = []
    for lo in range(0, len(inputs), block_size):
        x, y = inputs[lo : lo + block_size], targets[lo : lo + block_size]
        if (y != IGNORE_INDEX).any():
            pieces.append((x, y))
    return pieces


def pack_rows(lengths: list[int], block_size: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: which pieces share each row of ``block_size`` slots.

    Pieces are taken longest first (ties in input order), each into the row with the least room
    that still fits it, else a new row: the best-fit decreasing heuristic of bin packing
    (Johnson 1973). Deterministic.

    Args:
        lengths: each piece's length; every one must be in ``1..block_size``.
        block_size: the slots in a row.

    Returns:
        Rows as lists of piece indices, in the order they fill the row.

    Raises:
        AssertionError: a length outside ``1..block_size`` (unless Python runs with ``-O``;
            the pieces of :func:`conversation_pieces` are always inside it).
    """
    assert all(0 < n <= block_size for n in lengths), "pieces must be 1..block_size long"
    free: list[list[int]] = [[] for _ in range(block_size + 1)]  # free[c]: rows with c slots left
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        room = next((c for c in range(n, block_size + 1) if free[c]), None)
        if room is None:
            rows.append([i])
            r, room = len(rows) - 1, block_size
        else:
            r = free[room].pop()
            rows[r].append(i)
        free[room - n].append(r)
    return rows


def pack_conversations(tokenizer: Tokenizer, conversations: list, block_size: int) -> dict:
    """Encode, mask and pack conversations into rows of exactly ``block_size`` positions.

    Each conversation is a message list or ``{"messages": [...], "tools": [...] | None}`` (the
    rows of :func:`load_conversations` qualify); see :func:`encode_conversation`.

    Returns:
        ``{"x", "y", "segments"}``, int64 arrays of shape (N, block_size): inputs, targets
        (``IGNORE_INDEX`` off assistant tokens and on padding) and per-row segment ids
        (0, 1, ... one per packed piece, contiguous; the padding tail is one more segment).
        Also ``"tokens"`` (positions holding real tokens) and ``"targets"`` (assistant targets).

    Raises:
        BarkError: no conversation has an assistant token to learn (see :func:`encode_conversation`).
    """
    pieces = []
    for conv in conversations:
        messages, tools = (conv["messages"], conv.get("tools")) if isinstance(conv, dict) else (conv, None)
        pieces.extend(conversation_pieces(*encode_conversation(tokenizer, messages, tools), block_size))
    if not pieces:
        raise BarkError("no assistant tokens to train on after rendering the conversations; check the data")
    rows = pack_rows([len(x) for x, _ in pieces], block_size)
    x = np.full((len(rows), block_size), tokenizer.pad_id, dtype=np.int64)
    y = np.full((len(rows), block_size), IGNORE_INDEX, dtype=np.int64)
    seg = np.zeros((len(rows), block_size), dtype=np.int64)
    for r, members in enumerate(rows):
        t = 0
        for s, i in enumerate(members):
            px, py = pieces[i]
            x[r, t : t + len(px)], y[r, t : t + len(px)], seg[r, t : t + len(px)] = px, py, s
            t += len(px)
        seg[r, t:] = len(members)  # padding: a segment of its own, so no real token attends to it
    return {"x": x, "y": y, "segments": seg, "tokens": sum(len(p) for p, _ in pieces), "targets": int((y != IGNORE_INDEX).sum())}


class ChatRows:
    """A batch source over packed conversations, for ``train.train`` (as ``data.TokenWindows``).

    Rows are packed once per ``block_size`` (:func:`pack_conversations`). Training batches are
    rows drawn uniformly with replacement; evaluation uses evenly spaced rows, the same every
    time. Batches are ``(x, y, segments)``, int64 numpy arrays of shape (B, T).

    Args:
        tokenizer: renders and encodes the conversations (its chat template and special tokens).
        splits: ``{"train": [conversation, ...], "val": [...]}``, each a message list or
            ``{"messages", "tools"}`` (see :func:`pack_conversations`).
        meta: facts about the data for checkpoints (``source``, ``source_sha256``...).
    """

    def __init__(self, tokenizer: Tokenizer, splits: dict[str, list], meta: dict):
        self.tokenizer, self.splits = tokenizer, splits
        self.meta = {"tokenizer": tokenizer.kind, **meta, **{f"{k}_conversations": len(v) for k, v in splits.items()}}
        self._rows: dict[tuple[str, int], dict] = {}

    def rows(self, split: str, block_size: int) -> dict:
        """The packed rows of ``split`` (see :func:`pack_conversations`), built on first use."""
        key = (split, block_size)
        if key not in self._rows:
            self._rows[key] = pack_conversations(self.tokenizer, self.splits[split], block_size)
            self.meta[f"{split}_tokens"] = self._rows[key]["tokens"]
            self.meta[f"{split}_targets"] = self._rows[key]["targets"]
        return self._rows[key]

    def check(self, block_size: int) -> None:
        """Pack both splits now, so bad data fails before training starts.

        Raises:
            BarkError: a split without assistant tokens.
        """
        for split in self.splits:
            self.rows(split, block_size)

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, keep: slice = slice(None)):
        """``batch_size`` rows of ``split`` drawn uniformly with replacement by ``rng``, of which
        the ones ``keep`` selects are returned (a DDP rank's share; all are drawn either way).

        Returns:
            ``(x, y, segments)``: int64 numpy arrays of shape (B', block_size), B' the rows
            ``keep`` selects, as in :func:`pack_conversations`.
        """
        rows = self.rows(split, block_size)
        ix = rng.integers(0, len(rows["x"]), size=batch_size)[keep]
        return rows["x"][ix], rows["y"][ix], rows["segments"][ix]

    def eval_batches(self, split: str, n_batches: int, batch_size: int, block_size: int) -> Iterator[tuple]:
        """Up to ``n_batches * batch_size`` evenly spaced rows of ``split`` (all rows, once each,
        when there are fewer), in batches of at most ``batch_size``."""
        rows = self.rows(split, block_size)
        n = len(rows["x"])
        ix = np.unique(np.linspace(0, n - 1, min(n, n_batches * batch_size)).round().astype(np.int64))
        for lo in range(0, len(ix), batch_size):
            b = ix[lo : lo + batch_size]
            yield rows["x"][b], rows["y"][b], rows["segments"][b]

    def describe(self, block_size: int) -> str:
        """One line for the training banner: conversations, tokens, targets and packing per split."""
        parts = []
        for split in self.splits:
            r = self.rows(split, block_size)
            fill = r["tokens"] / r["x"].size
            parts.append(
                f"{split} {len(self.splits[split])} conversations, {r['tokens']:,} tokens "
                f"({r['targets']:,} assistant) in {len(r['x'])} rows ({fill:.0%} full)"
            )
        return "; ".join(parts)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (recorded in checkpoints as the data's fingerprint).

    Raises:
        OSError: the file cannot be opened or read (``FileNotFoundError`` when it is missing).
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
