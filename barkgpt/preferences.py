"""Preference data for DPO: pairs of replies to one prompt, the better one marked, in and packed out.

- **Reading** (:func:`load_preference_pairs`): JSONL in TRL's preference format, with an explicit
  prompt (``{"prompt", "chosen", "rejected"}``) or an implicit one (``{"chosen", "rejected"}``
  conversations that share their opening turns), each field a string or a message list; or
  OpenAssistant message trees (one tree a line, the root message with nested ``replies``, or
  ``{"message_tree_id", "prompt": root}``), where sibling assistant replies with a ``rank`` give
  pairs, the better (lower) rank chosen (the OASST1 ranking of Kopf et al. 2023).
- **Splitting**: by group (the tree; for pair rows their own line), with
  ``conversations.split_conversations``, so pairs from one tree never straddle train and val.
- **Encoding and packing** (:class:`PreferencePairs`): each side is ``prompt + completion``
  rendered with the chat template, its targets the completion's tokens only (the assistant
  reply through its ``<EOS>``); the chosen and rejected sequences of a batch's pairs are packed
  into rows by best-fit decreasing (``conversations.pack_rows``) with segment ids, as SFT's rows,
  plus the sequence index of every position, so a row sums each sequence's log-probability apart.

No torch here: the DPO loss and trainer are ``dpo.py``'s; generated pairs (a plugin's, such as
a toy's) reach training as a :class:`PreferencePairs` through the dataset hook.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from barkgpt.common import BarkError
from barkgpt.conversations import IGNORE_INDEX, ROLES, jsonl_rows, pack_rows
from barkgpt.tokenizer import Tokenizer

OASST_ROLES = {"prompter": "user", "assistant": "assistant"}


# ---- reading ---------------------------------------------------------------------------------


def load_preference_pairs(path: str | Path) -> list[dict]:
    """Read preference pairs from a JSONL file: TRL preference rows or OpenAssistant message trees.

    Returns:
        ``[{"prompt": [messages], "chosen": [messages], "rejected": [messages], "group": str}, ...]``
        in file order; ``chosen`` and ``rejected`` are the assistant completion(s) after the
        prompt; ``group`` is the tree id (OASST) or ``#line``.

    Raises:
        BarkError: a missing file, a line that is not JSON, a row of neither shape, a bad message,
            an implicit prompt whose two conversations share no opening turn, or no pairs at all.
    """
    out = []
    for n, row, where in jsonl_rows(path, "preference data", "a .jsonl of prompt/chosen/rejected rows or OASST trees"):
        if isinstance(row, dict) and ("replies" in row or isinstance(row.get("prompt"), dict)):
            out.extend(oasst_pairs(row, where))
        else:
            out.append({**pair_of_row(row, where), "group": f"#{n}"})
    if not out:
        raise BarkError(f"{path} holds no preference pairs; add prompt/chosen/rejected rows (or ranked OASST replies)")
    return out


def as_messages(value, role: str, where: str) -> list[dict]:
    """A string as one ``role`` message, or a message list checked (``role`` in system, user,
    assistant; string ``content``).

    Raises:
        BarkError: neither a string nor a list of such messages.
    """
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise BarkError(f"{where}: expected a string or a non-empty list of messages, got {type(value).__name__}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BarkError(f"{where}, message {i}: needs a role (system, user or assistant) and a string content")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def pair_of_row(row, where: str) -> dict:
    """One TRL preference row as ``{"prompt", "chosen", "rejected"}`` message lists.

    Explicit prompt: ``prompt`` is a string (one user message) or messages; ``chosen`` and
    ``rejected`` are strings (one assistant message) or messages. Implicit prompt: ``chosen`` and
    ``rejected`` are whole conversations; their longest common opening is the prompt.

    Raises:
        BarkError: a missing field, a bad message, a completion that is not assistant turns, or
            (implicit) conversations with no common opening or no difference.
    """
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise BarkError(f"{where} needs 'chosen' and 'rejected' (and usually 'prompt'), or an OASST tree's 'replies'")
    if "prompt" in row:
        prompt = as_messages(row["prompt"], "user", f"{where}, prompt")
        chosen = as_messages(row["chosen"], "assistant", f"{where}, chosen")
        rejected = as_messages(row["rejected"], "assistant", f"{where}, rejected")
    else:
        if isinstance(row["chosen"], str) or isinstance(row["rejected"], str):
            raise BarkError(f"{where}: string chosen/rejected need a 'prompt' field (or give both as message lists)")
        full_c = as_messages(row["chosen"], "assistant", f"{where}, chosen")
        full_r = as_messages(row["rejected"], "assistant", f"{where}, rejected")
        k = 0
        while k < min(len(full_c), len(full_r)) - 1 and full_c[k] == full_r[k]:
            k += 1
        prompt, chosen, rejected = full_c[:k], full_c[k:], full_r[k:]
        if not prompt:
            raise BarkError(f"{where}: chosen and rejected share no opening turn to use as the prompt; add a 'prompt' field")
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if any(m["role"] != "assistant" for m in side):
            raise BarkError(f"{where}: the {name} completion must be assistant turns only; move other turns into the prompt")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def oasst_pairs(row: dict, where: str) -> list[dict]:
    """The preference pairs of one OpenAssistant message tree.

    At every message, its non-deleted assistant replies that carry a ``rank`` (0 is best) give
    one pair for each two of them, the lower rank chosen (ties give none); the prompt is the path
    from the root to that message (``prompter`` is the user).

    Returns:
        Pairs as :func:`load_preference_pairs`'s, grouped by the tree's id.

    Raises:
        BarkError: a message without string ``text`` or with an unknown ``role``.
    """
    root = row["prompt"] if isinstance(row.get("prompt"), dict) else row
    group = str(row.get("message_tree_id") or root.get("message_tree_id") or root.get("message_id") or where)
    pairs: list[dict] = []
    stack = [(root, [])]
    while stack:
        node, path = stack.pop()
        if not isinstance(node.get("text"), str) or node.get("role") not in OASST_ROLES:
            raise BarkError(f"{where}: an OASST message needs a string 'text' and role prompter or assistant")
        path = [*path, {"role": OASST_ROLES[node["role"]], "content": node["text"]}]
        replies = [r for r in node.get("replies") or [] if isinstance(r, dict) and not r.get("deleted")]
        ranked = sorted(
            (r for r in replies if r.get("role") == "assistant" and isinstance(r.get("rank"), int)), key=lambda r: r["rank"]
        )
        for i, better in enumerate(ranked):
            for worse in ranked[i + 1 :]:
                if better["rank"] < worse["rank"]:
                    pairs.append(
                        {
                            "prompt": path,
                            "chosen": [{"role": "assistant", "content": better["text"]}],
                            "rejected": [{"role": "assistant", "content": worse["text"]}],
                            "group": group,
                        }
                    )
        stack.extend((r, path) for r in reversed(replies))
    return pairs


# ---- encoding and packing --------------------------------------------------------------------


def encode_completion(tokenizer: Tokenizer, prompt: list[dict], completion: list[dict], block_size: int) -> tuple:
    """Render ``prompt + completion`` and make one training piece whose targets are the completion's.

    The completion's span starts where the prompt's render with the generation prompt ends (what
    ``chat`` feeds the model before the reply). A sequence longer than ``block_size + 1`` tokens
    keeps its end (the prompt is cut from the left, TRL's ``keep_end``) when the completion fits,
    else the completion's first ``block_size`` tokens after one prompt token.

    Returns:
        ``(x, y)``: int64 arrays of equal length <= ``block_size``, ``y`` the next token where it
        is a completion token, else ``IGNORE_INDEX``.

    Raises:
        BarkError: a template whose prompt render is not a prefix of the whole conversation's.
    """
    text = tokenizer.apply_chat_template([*prompt, *completion], add_generation_prompt=False)
    head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
    if not text.startswith(head):
        raise BarkError("the chat template does not render a conversation by appending turns; use a template that does")
    ids, offsets = tokenizer.encode_with_offsets(text)
    ids_a = np.asarray(ids, dtype=np.int64)
    is_completion = np.array([s >= len(head) for s, _ in offsets], dtype=bool)
    first = int(np.argmax(is_completion)) if is_completion.any() else len(ids)
    first = max(first, 1)  # the first token is never a target: nothing precedes it
    if len(ids) > block_size + 1:
        lo = len(ids) - (block_size + 1) if len(ids) - first <= block_size else first - 1
        ids_a, is_completion = ids_a[lo : lo + block_size + 1], is_completion[lo : lo + block_size + 1]
    y = np.where(is_completion[1:], ids_a[1:], IGNORE_INDEX)
    return ids_a[:-1], y


class PreferencePairs:
    """A batch source of preference pairs for DPO (``dpo.py``), with ``conversations.ChatRows``'s
    interface (``tokenizer``, ``meta``, ``check``, ``batch``, ``eval_batches``, ``describe``).

    A batch of B pairs is 2B sequences (chosen of pair k at index 2k, rejected at 2k+1) packed into
    N <= 2B rows of ``block_size``. Batches are ``(x, y, segments, seq, ref)``: int64 (N, T)
    inputs, targets and segment ids as ``conversations.pack_conversations``'s, int64 (N, T) ``seq``
    (the sequence index of each position, -1 on padding), and float64 (B, 2) ``ref``: the
    reference model's summed log-probabilities (nats) of each pair's chosen and rejected
    completion, as :meth:`set_reference` stored them (zeros before).

    Args:
        tokenizer: renders and encodes the pairs.
        splits: ``{"train": [pair, ...], "val": [pair, ...]}``, pairs as :func:`load_preference_pairs`'s.
        meta: facts about the data for checkpoints (``source``, ``source_sha256``...).
        base_preset: for generated pairs, the preset whose model they tune when no model is given
            (a preset flow trains it first); None otherwise.
    """

    def __init__(self, tokenizer: Tokenizer, splits: dict[str, list[dict]], meta: dict, base_preset: str | None = None):
        self.tokenizer, self.splits, self.base_preset = tokenizer, splits, base_preset
        self.meta = {"tokenizer": tokenizer.kind, **meta, **{f"{k}_pairs": len(v) for k, v in splits.items()}}
        self.reference: dict[str, np.ndarray] = {}
        self._pieces: dict[tuple[str, int], list[tuple]] = {}

    def pieces(self, split: str, block_size: int) -> list[tuple]:
        """Per pair of ``split``, ``(x_chosen, y_chosen, x_rejected, y_rejected)`` (see
        :func:`encode_completion`), encoded on first use."""
        key = (split, block_size)
        if key not in self._pieces:
            tok = self.tokenizer
            self._pieces[key] = [
                (
                    *encode_completion(tok, p["prompt"], p["chosen"], block_size),
                    *encode_completion(tok, p["prompt"], p["rejected"], block_size),
                )
                for p in self.splits[split]
            ]
        return self._pieces[key]

    def check(self, block_size: int) -> None:
        """Encode both splits now, so bad data fails before training starts.

        Raises:
            BarkError: an empty split, or a pair side with no completion token left to score.
        """
        for split in self.splits:
            pieces = self.pieces(split, block_size)
            if not pieces:
                raise BarkError(f"the {split} split has no preference pairs; add pairs (or lower --val-fraction)")
            for k, (_, yc, _, yr) in enumerate(pieces):
                if not (yc != IGNORE_INDEX).any() or not (yr != IGNORE_INDEX).any():
                    raise BarkError(f"{split} pair {k} has an empty chosen or rejected completion; remove it")

    def set_reference(self, split: str, logps: np.ndarray) -> None:
        """Store the reference model's (n_pairs, 2) summed completion log-probs of ``split``."""
        self.reference[split] = np.asarray(logps, dtype=np.float64)

    def pack(self, split: str, ix: np.ndarray, block_size: int) -> tuple:
        """The batch (see the class docstring) of the pairs ``ix`` of ``split``."""
        pieces = self.pieces(split, block_size)
        seqs = [s for k in ix for s in (pieces[k][:2], pieces[k][2:])]  # 2B (x, y): chosen, rejected
        rows = pack_rows([len(x) for x, _ in seqs], block_size)
        shape = (len(rows), block_size)
        x, y = np.full(shape, self.tokenizer.pad_id, dtype=np.int64), np.full(shape, IGNORE_INDEX, dtype=np.int64)
        seg, seq = np.zeros(shape, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
        for r, members in enumerate(rows):
            t = 0
            for s, i in enumerate(members):
                px, py = seqs[i]
                x[r, t : t + len(px)], y[r, t : t + len(px)], seg[r, t : t + len(px)], seq[r, t : t + len(px)] = px, py, s, i
                t += len(px)
            seg[r, t:] = len(members)  # padding: a segment of its own
        ref = self.reference[split][ix] if split in self.reference else np.zeros((len(ix), 2))
        return x, y, seg, seq, ref

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, keep: slice = slice(None)):
        """``batch_size`` pairs of ``split`` drawn uniformly with replacement by ``rng``, of which
        the ones ``keep`` selects are packed (a DDP rank's share; all are drawn either way)."""
        ix = rng.integers(0, len(self.splits[split]), size=batch_size)[keep]
        return self.pack(split, ix, block_size)

    def eval_batches(self, split: str, n_batches: int, batch_size: int, block_size: int) -> Iterator[tuple]:
        """Up to ``n_batches * batch_size`` evenly spaced pairs of ``split`` (all, once each, when
        there are fewer), in batches of at most ``batch_size`` pairs."""
        n = len(self.splits[split])
        ix = np.unique(np.linspace(0, n - 1, min(n, n_batches * batch_size)).round().astype(np.int64))
        for lo in range(0, len(ix), batch_size):
            yield self.pack(split, ix[lo : lo + batch_size], block_size)

    def all_batches(self, split: str, batch_size: int, block_size: int) -> Iterator[tuple[np.ndarray, tuple]]:
        """Every pair of ``split`` in order, ``(ix, batch)`` per at most ``batch_size`` pairs (for
        the reference log-probs)."""
        n = len(self.splits[split])
        for lo in range(0, n, batch_size):
            ix = np.arange(lo, min(n, lo + batch_size))
            yield ix, self.pack(split, ix, block_size)

    def describe(self, block_size: int) -> str:
        """One line for the training banner: pairs and completion tokens per split."""
        parts = []
        for split in self.splits:
            pieces = self.pieces(split, block_size)
            targets = sum(int((p[1] != IGNORE_INDEX).sum() + (p[3] != IGNORE_INDEX).sum()) for p in pieces)
            parts.append(f"{split} {len(pieces)} pairs ({targets:,} completion tokens)")
        return "; ".join(parts)
