"""Data preparation: text -> flat token-id files, and random training windows over them.

The on-disk format is nanoGPT's (``data/shakespeare_char/prepare.py`` and ``get_batch`` in its
``train.py``): ``train.bin`` and ``val.bin`` hold every token id back to back as ``uint16``
(``uint32`` once ``vocab_size > 65535``), next to ``meta.json`` and the tokenizer files. Training
reads random windows through ``np.memmap``, so a corpus never has to fit in memory.

Preparation streams: the input is read a few hundred KiB at a time, cut only where no tokenizer
kind would split the text differently, encoded in parallel batches and appended to the ``.bin``
files, so memory stays flat whatever the corpus size. Validation data is the tail of the input
(by bytes, cut at a line boundary), and the tokenizer is trained on the training part only.

Built-in generated datasets (the hook): a name that ``--data`` or a preset's ``data:`` takes
instead of a path maps, in :data:`BUILTIN_DATASETS`, to a function that builds the data. A module
that generates a corpus (a toy dataset, a plugin) fills the table on import with
:func:`register_dataset`; ``train.open_source`` and the server's run form look names up with
:func:`builtin_dataset`. The core names no entry of the table.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from barkgpt.common import BarkError, atomic_write_text, progress
from barkgpt.readers import list_input, open_binary, read_table, table_split_offset
from barkgpt.tokenizer import UNK, Tokenizer

CHUNK_BYTES = 1 << 17  # bytes of text read at a time (128 KiB)
BATCH_BYTES = 1 << 22  # text encoded per encode_batch call (4 MiB, ~32 chunks, one per thread)
DEFAULT_BPE_VOCAB = 2048
# bpe and word tokenizers train on at most this much of the training split, spread evenly over
# it: their trainers keep every distinct word in memory (about 0.5 GB per million), and more
# text barely changes a small vocabulary. char tokenizers count characters, so they see it all.
TOKENIZER_TRAIN_BYTES = 1 << 28  # 256 MiB
SPLITS = ("train", "val")

# Where text can be cut without changing any kind's tokens: between a non-whitespace character
# and ASCII whitespace. No GPT-2 pre-token holds such a pair (a pre-token that starts with a
# non-space has no whitespace in it, and the regex has no lookbehind), whitespace splitting cuts
# there anyway, and chars are chars. Python's \S is narrower than the Unicode White_Space the
# regex uses, so this is on the safe side.
_SAFE_CUT = re.compile(r"\S(?=[\t-\r ])")
MAX_CARRY = 1 << 23  # text without such a place is cut anyway after 8 Mi characters

# builder(out, seed) -> a prepared data folder (a Path) or a batch source (TokenWindows' interface).
DatasetBuilder = Callable[[Path, int], object]
BUILTIN_DATASETS: dict[str, DatasetBuilder] = {}  # name -> builder, filled by register_dataset
DATASET_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")  # a plain name: never a path, never '.' or '..'


# ---- built-in generated datasets (the hook) -------------------------------------------------


def register_dataset(name: str, builder: DatasetBuilder) -> None:
    """Make ``name`` a built-in generated dataset: ``--data NAME`` then trains on ``builder``'s data.

    ``builder(out, seed)`` gets the run's ``out_dir/data`` folder (a ``Path``, which it may write)
    and ``TrainConfig.seed``, and returns either a prepared data folder (a ``Path``, e.g. from
    :func:`prepare_documents`; it is opened with :class:`TokenWindows`) or a batch source with
    that interface (``conversations.ChatRows``). A registered name wins over a path of the same
    name. Registering the same function again (a module imported twice) is harmless.

    Raises:
        BarkError: ``name`` is not a plain lower-case name (letters, digits, ``-``, ``_``; no
            path), or is already registered to another builder.
    """
    if not isinstance(name, str) or not DATASET_NAME.fullmatch(name):
        raise BarkError(f"dataset name {name!r} is not a plain name; use lower-case letters, digits, '-' and '_'")
    old = BUILTIN_DATASETS.get(name)
    same = old is not None and (old.__module__, old.__qualname__) == (builder.__module__, builder.__qualname__)
    if old is not None and not same:
        raise BarkError(f"dataset {name!r} is already registered by {old.__module__}; pick another name")
    BUILTIN_DATASETS[name] = builder


def builtin_dataset(name: str | None) -> DatasetBuilder | None:
    """The builder registered for ``name`` (see :func:`register_dataset`), or None for any other
    value (a path, or None)."""
    return BUILTIN_DATASETS.get(name) if isinstance(name, str) else None


def prepare_dataset(
    input: str | Path,
    out: str | Path,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    val_fraction: float = 0.1,
    tokenizer_from: str | Path | None = None,
    text_field: str = "text",
    errors: str = "strict",
) -> dict:
    """Tokenize a text corpus into ``out/train.bin``, ``out/val.bin``, ``out/meta.json`` + tokenizer.

    Input is one text file (one document; any extension not named here reads as text), a folder
    of ``.txt``/``.md`` files (recursive, sorted by path, hidden ones skipped, one document each;
    empty files are skipped), a ``.jsonl`` file (one document per line, in field ``text_field``;
    blank lines are skipped), any of these as ``.gz``/``.zst``, a ``.parquet`` file or a
    ``datasets`` folder from ``save_to_disk`` (one document per row of column ``text_field``);
    see :mod:`barkgpt.readers`. An EOS id follows every document, and the end of each split's
    last (possibly cut) document.

    The last ``val_fraction`` of the input bytes, moved forward to the next line boundary, is
    the validation split. The tokenizer is trained on the training split only, or loaded from
    ``tokenizer_from``; bpe and word tokenizers see at most 256 MiB of it, spread evenly (see
    ``TOKENIZER_TRAIN_BYTES``). Each file appears in ``out`` only once complete (temporary file, then
    rename), and ``meta.json`` is written last, so a folder with ``meta.json`` is complete.

    Args:
        input: the corpus path.
        out: the output folder (created; other files in it are left alone).
        tokenizer: ``bpe``, ``char`` or ``word`` (ignored with ``tokenizer_from``).
        vocab_size: bpe vocabulary (default 2048), or a cap for char/word (default none).
        val_fraction: share of input bytes for validation, in (0, 0.5].
        tokenizer_from: a folder with ``tokenizer.json`` to reuse instead of training one.
        text_field: the JSON field (``.jsonl``) or column (parquet, datasets) holding the text.
        errors: ``strict`` (invalid UTF-8 is an error) or ``replace`` (it becomes U+FFFD).

    Returns:
        The meta dict, also written to ``meta.json``: ``tokenizer`` (kind), ``vocab_size``,
        ``dtype``, ``train_tokens``, ``val_tokens``, ``source``, ``source_sha256`` (of the input
        bytes, decompressed; for a folder, of its files concatenated in order; for a table, of
        each row's text and a newline), ``val_fraction``, and
        ``unknown_count`` (tokens that are ``<UNK>``) when there are any.

    Raises:
        BarkError: a missing or empty input, non-UTF-8 bytes (with file and byte offset), a
            jsonl line without ``text_field``, a bad ``vocab_size``/``val_fraction``/``errors``, or
            a split with fewer than 2 tokens.
    """
    if errors not in ("strict", "replace"):
        raise BarkError(f"unknown errors mode {errors!r}; use --errors strict or --errors replace")
    _check_val_fraction(val_fraction)
    files, sizes, fmt = list_input(Path(input), text_field)
    total = sum(sizes)
    if total == 0:
        raise BarkError(f"input {input} is empty; pass a file or folder that holds text")
    split = _split_offset(files, sizes, val_fraction, fmt, text_field)

    def pieces(start: int, end: int, hasher=None, bar=None) -> Iterator[tuple[str, bool]]:
        return _read_pieces(files, sizes, fmt, start, end, errors, text_field, hasher, bar)

    tok = _dataset_tokenizer(tokenizer, vocab_size, tokenizer_from, lambda bar: pieces(0, split, bar=bar), split)
    out = Path(out)
    hasher = hashlib.sha256()
    with progress(total=total, desc="encoding", unit="B", unit_scale=True) as bar:
        counts = _write_splits(
            out,
            tok,
            pieces(0, split, hasher, bar),
            pieces(split, total, hasher, bar),
            add_eos=True,
            source=str(input),
            val_fraction=val_fraction,
        )
    meta = _meta(tok, counts, str(Path(input).resolve()), hasher.hexdigest(), val_fraction)
    tok.save(out)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def _dataset_tokenizer(
    kind: str, vocab_size: int | None, tokenizer_from: str | Path | None, train_pieces, split: int
) -> Tokenizer:
    """The tokenizer of :func:`prepare_dataset`: loaded from ``tokenizer_from``, or trained on the
    training split's ``(text, end_of_document)`` pieces (``train_pieces(bar)``, ``split`` bytes;
    bpe and word see at most ``TOKENIZER_TRAIN_BYTES`` of it, spread evenly).

    Raises:
        BarkError: ``vocab_size`` contradicts the loaded tokenizer.
    """
    if tokenizer_from is not None:
        tok = Tokenizer.load(tokenizer_from)
        if vocab_size is not None and vocab_size != tok.vocab_size:
            raise BarkError(
                f"--vocab-size {vocab_size} contradicts the tokenizer in {tokenizer_from} "
                f"(vocab_size {tok.vocab_size}); drop --vocab-size"
            )
        return tok
    if kind == "bpe" and vocab_size is None:
        vocab_size = DEFAULT_BPE_VOCAB
    with progress(total=split, desc="training tokenizer", unit="B", unit_scale=True) as bar:
        texts = (text for text, _ in train_pieces(bar))
        if kind != "char":
            texts = _spread(texts, TOKENIZER_TRAIN_BYTES / split)
        return Tokenizer.train(kind, texts, vocab_size)


def prepare_documents(
    docs: Sequence[str], out: str | Path, tokenizer: Tokenizer, source: str, val_fraction: float = 0.1, add_eos: bool = True
) -> dict:
    """Write generated documents with a fixed tokenizer into a prepared data folder ``out``.

    For corpora built in code (see :func:`register_dataset`). The last
    ``round(len(docs) * val_fraction)`` documents (at least 1) form the validation split.
    ``source_sha256`` hashes the documents, each followed by a newline.

    Args:
        docs: the documents, in order.
        out: the folder to write ``train.bin``, ``val.bin``, ``meta.json`` and the tokenizer into.
        tokenizer: encodes the documents (saved with them).
        source: the ``source`` recorded in ``meta.json`` (the dataset's name).
        add_eos: append an EOS id after each document; False when they already end in ``<EOS>``.

    Returns:
        The meta dict, as :func:`prepare_dataset`.

    Raises:
        BarkError: ``val_fraction`` outside (0, 0.5], fewer than 2 documents, or a split with
            fewer than 2 tokens.
    """
    _check_val_fraction(val_fraction)
    if len(docs) < 2:
        raise BarkError(f"{len(docs)} document(s) of {source} are too few to split into train and val; use at least 2")
    n_val = max(1, round(len(docs) * val_fraction))
    hasher = hashlib.sha256()

    def pieces(part: Sequence[str]) -> Iterator[tuple[str, bool]]:
        for doc in part:
            hasher.update(doc.encode("utf-8") + b"\n")
            yield doc, True

    out = Path(out)
    counts = _write_splits(
        out, tokenizer, pieces(docs[:-n_val]), pieces(docs[-n_val:]), add_eos=add_eos, source=source, val_fraction=val_fraction
    )
    meta = _meta(tokenizer, counts, source, hasher.hexdigest(), val_fraction)
    tokenizer.save(out)
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(data_dir: str | Path) -> dict:
    """Read ``data_dir/meta.json`` (see :func:`prepare_dataset` for its fields).

    Raises:
        BarkError: the file is missing (the folder was never prepared, or preparing it did not
            finish) or is not valid JSON.
    """
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise BarkError(f"no meta.json in {data_dir}; prepare it first with `barkgpt prepare --input TEXT --out {data_dir}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BarkError(f"{path} is corrupt ({e}); prepare the data again with `barkgpt prepare`") from None
    if not isinstance(meta, dict) or meta.get("dtype") not in ("uint16", "uint32"):
        raise BarkError(f"{path} has no valid 'dtype' (uint16 or uint32); prepare the data again with `barkgpt prepare`")
    return meta


def load_split(data_dir: str | Path, split: str) -> np.ndarray:
    """Map ``data_dir/{split}.bin`` read-only as a flat (N,) array of token ids.

    The dtype comes from ``meta.json``. Each call returns a new map; :class:`TokenWindows` maps
    each split once and keeps the map for the whole run (nanoGPT re-maps for every batch instead).
    The pages a long-lived map has read count in the process's resident memory, but they are
    clean, file-backed pages that the kernel drops under memory pressure, not a leak.

    Raises:
        BarkError: ``split`` is not train/val, or ``meta.json``/the ``.bin`` file is missing,
            empty or truncated.
    """
    if split not in SPLITS:
        raise BarkError(f"unknown split {split!r}; use train or val")
    dtype = np.dtype(read_meta(data_dir)["dtype"])
    path = Path(data_dir) / f"{split}.bin"
    if not path.is_file():
        raise BarkError(f"no {split}.bin in {data_dir}; prepare it again with `barkgpt prepare --input TEXT --out {data_dir}`")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise BarkError(f"{path} is empty or truncated ({size} bytes of {dtype}); prepare the data again")
    return np.memmap(path, dtype=dtype, mode="r")


def get_batch(
    data: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator, keep: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray]:
    """Sample ``batch_size`` random windows of ``block_size + 1`` tokens (nanoGPT's ``get_batch``).

    Args:
        data: a flat (N,) array of token ids, usually :func:`load_split`'s memmap.
        batch_size: B, windows per batch.
        block_size: T, tokens per window.
        rng: the generator that picks window starts, uniform in ``[0, N - T)``.
        keep: which of the B windows to read (a DDP rank's rows): all B starts are drawn either
            way, so ``rng`` advances the same and the ranks' rows together are the whole batch.

    Returns:
        ``(x, y)``, both int64 (B', T) C-contiguous, B' the rows ``keep`` selects: ``x`` the
        inputs and ``y`` the targets, ``y[:, t] == x[:, t + 1]`` (the same window shifted by one).

    Raises:
        BarkError: ``data`` holds fewer than ``block_size + 1`` tokens.
    """
    assert batch_size >= 1 and block_size >= 1, (batch_size, block_size)
    n = len(data)
    if n < block_size + 1:
        raise BarkError(
            f"the split has {n} tokens, too few for block_size {block_size}; "
            f"use --block-size {max(n - 1, 1)} or less, or prepare more data"
        )
    return windows(data, rng.integers(0, n - block_size, size=batch_size)[keep], block_size)


def windows(data: np.ndarray, starts: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The windows of ``data`` that begin at ``starts`` (B,): ``(x, y)``, both int64 (B, T)
    C-contiguous, ``y`` being ``x`` shifted by one token. One fancy-index read of (B, T+1) ids,
    so only those pages of a memmap are touched."""
    buf = np.array(data[starts[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T+1)
    return np.ascontiguousarray(buf[:, :-1]), np.ascontiguousarray(buf[:, 1:])


class TokenWindows:
    """The batch source over a prepared data folder that ``train.train`` reads (pretraining).

    Training batches are random windows (:func:`get_batch`); evaluation batches are evenly spaced
    windows from each split's start to its end, the same every time. Batches are ``(x, y)``,
    int64 numpy arrays of shape (B, T). ``conversations.ChatRows`` is the same interface over
    packed chat data.

    Args:
        data_dir: a folder written by :func:`prepare_dataset` or :func:`prepare_documents`.

    Raises:
        BarkError: the folder is not prepared (see :func:`read_meta`, :func:`load_split`).
    """

    def __init__(self, data_dir: str | Path):
        self.meta = read_meta(data_dir)
        self.tokenizer = Tokenizer.load(data_dir)
        self.splits = {split: load_split(data_dir, split) for split in SPLITS}

    def check(self, block_size: int) -> None:
        """Raise BarkError unless both splits hold more than ``block_size + 1`` tokens."""
        for name, data in self.splits.items():
            if len(data) <= block_size + 1:
                raise BarkError(
                    f"the {name} split has {len(data)} tokens, not more than block_size {block_size} + 1; "
                    f"lower --block-size or use more data"
                )

    def batch(self, split: str, batch_size: int, block_size: int, rng: np.random.Generator, keep: slice = slice(None)):
        """``batch_size`` random windows of ``split``, of which the rows ``keep`` are read (see :func:`get_batch`)."""
        return get_batch(self.splits[split], batch_size, block_size, rng, keep)

    def eval_batches(self, split: str, n_batches: int, batch_size: int, block_size: int) -> Iterator[tuple]:
        """``n_batches`` batches of ``batch_size`` windows, evenly spaced over ``split``.

        Evenly spaced windows instead of random ones: every eval sees the same windows, so evals
        are comparable across steps and runs, and the training sampler's state is untouched
        (exact resume). It is still a sample: on tiny Shakespeare's val split, 240 windows (20
        batches of 12) land within about 0.02 nats of the loss over the whole split, while 20
        random batches, as nanoGPT draws them, range from 1.64 to 1.72 for one model.
        """
        data = self.splits[split]
        starts = np.linspace(0, len(data) - block_size - 1, n_batches * batch_size).astype(np.int64)
        for ix in np.array_split(starts, n_batches):
            yield windows(data, ix, block_size)

    def describe(self, block_size: int) -> str:
        """One line for the training banner."""
        return f"{len(self.splits['train']):,} train tokens ({self.tokenizer.kind}, vocab {self.tokenizer.vocab_size})"


def read_documents(
    input: str | Path, split: str = "all", val_fraction: float = 0.1, text_field: str = "text", errors: str = "strict"
) -> list[str]:
    """The documents of a corpus, or of its train or val part as :func:`prepare_dataset` cuts it.

    Args:
        input: any input :func:`prepare_dataset` reads (text, folder, jsonl, parquet, datasets).
        split: ``all``, ``train`` (the head) or ``val`` (the last ``val_fraction`` of the bytes,
            moved to a line boundary, exactly as ``prepare`` splits the same input).
        val_fraction: share of the input bytes in the val part, in (0, 0.5].
        text_field: the JSON field holding each document, for ``.jsonl``.
        errors: ``strict`` or ``replace`` for bytes that are not UTF-8.

    Returns:
        The documents' texts, in order (the whole corpus is read into memory).

    Raises:
        BarkError: as :func:`prepare_dataset` for bad input, or an unknown ``split``.
    """
    if split not in ("all", *SPLITS):
        raise BarkError(f"unknown split {split!r}; use all, train or val")
    if errors not in ("strict", "replace"):
        raise BarkError(f"unknown errors mode {errors!r}; use strict or replace")
    files, sizes, fmt = list_input(Path(input), text_field)
    total = sum(sizes)
    if total == 0:
        raise BarkError(f"input {input} is empty; pass a file or folder that holds text")
    start, end = 0, total
    if split != "all":
        _check_val_fraction(val_fraction)
        cut = _split_offset(files, sizes, val_fraction, fmt, text_field)
        start, end = (0, cut) if split == "train" else (cut, total)
    pieces = _read_pieces(files, sizes, fmt, start, end, errors, text_field)
    docs, parts = [], []
    for text, ends_document in pieces:
        parts.append(text)
        if ends_document:
            docs.append("".join(parts))
            parts = []
    return [d for d in docs if d]


# ---- reading the input ----------------------------------------------------------------------


def _check_val_fraction(val_fraction: float) -> None:
    """Raise BarkError unless 0 < val_fraction <= 0.5."""
    if not 0 < val_fraction <= 0.5:
        raise BarkError(f"val_fraction {val_fraction} is outside (0, 0.5]; pass --val-fraction 0.1, say")


def _read_pieces(
    files: list[Path], sizes: list[int], fmt: str, start: int, end: int, errors: str, text_field: str, hasher=None, bar=None
) -> Iterator[tuple[str, bool]]:
    """The ``(text, ends_document)`` pieces of bytes ``[start, end)`` of an input that
    ``readers.list_input`` listed, by its format."""
    if fmt == "jsonl":
        return _read_jsonl(files[0], start, end, errors, text_field, hasher, bar)
    if fmt == "table":
        return read_table(files, start, end, errors, text_field, hasher, bar)
    return _read_text(files, sizes, start, end, errors, hasher, bar)


def _utf8_error(path: Path, offset: int, e: UnicodeDecodeError) -> BarkError:
    """The one-line error for invalid UTF-8 at byte ``offset`` of ``path``."""
    return BarkError(
        f"{path} is not valid UTF-8 at byte offset {offset} (byte 0x{e.object[e.start]:02x}); "
        f"convert it to UTF-8 or pass --errors replace"
    )


def _safe_cut(text: str, start: int = 0) -> int:
    """The last index after ``start`` where ``text`` can be cut without changing its tokens
    (see ``_SAFE_CUT``), or 0 if there is none."""
    hi = len(text)
    while hi > start:  # search backwards in 4 Ki windows; text nearly always has a cut in the first
        lo = max(start, hi - 4096)
        last = None
        for m in _SAFE_CUT.finditer(text, lo, hi):
            last = m
        if last is not None:
            return last.end()
        if lo == start:
            break
        hi = lo + 1  # the lookahead could not see past hi, so overlap by one
    return 0


def _read_text(
    files: list[Path], sizes: list[int], start: int, end: int, errors: str, hasher=None, bar=None
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, ends_document)`` pieces of bytes ``[start, end)`` of the files concatenated.

    Each file is one document; the last piece of each file's part of the range ends a document.
    Pieces are cut only where tokens do not change (see ``_SAFE_CUT``). Feeds the raw bytes to
    ``hasher`` and their count to ``bar`` as it goes. ``start`` and ``end`` must fall between
    UTF-8 characters.
    """
    offset = 0
    for path, size in zip(files, sizes, strict=True):
        lo, hi = max(start, offset), min(end, offset + size)
        pos = lo - offset  # where the next block starts in this file
        offset += size
        if lo >= hi:
            continue
        utf8 = codecs.getincrementaldecoder("utf-8")(errors)  # holds back a split character
        carry, searched = "", 0
        with open_binary(path) as f:
            f.seek(pos)
            left = hi - lo
            while True:
                block = f.read(min(CHUNK_BYTES, left))
                left -= len(block)
                done = left == 0 or not block
                if hasher is not None:
                    hasher.update(block)
                if bar is not None:
                    bar.update(len(block))
                held = len(utf8.getstate()[0])  # bytes of a split character from the last block
                try:
                    text = carry + utf8.decode(block, final=done)
                except UnicodeDecodeError as e:
                    raise _utf8_error(path, pos - held + e.start, e) from None
                pos += len(block)
                if done:
                    yield text, True
                    break
                cut = _safe_cut(text, searched)
                if cut == 0 and len(text) < MAX_CARRY:
                    carry, searched = text, max(len(text) - 1, 0)  # read on until a cut appears
                    continue
                cut = cut or len(text)
                carry, searched = text[cut:], 0
                yield text[:cut], False


def _read_jsonl(
    path: Path, start: int, end: int, errors: str, text_field: str, hasher=None, bar=None
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, True)`` for each non-blank line of ``path`` within bytes ``[start, end)``.

    ``start`` and ``end`` lie on line boundaries. Empty texts are skipped.
    """
    with open_binary(path) as f:
        f.seek(start)
        pos = start
        while pos < end:
            line = f.readline()
            if not line:
                break
            line_start, pos = pos, pos + len(line)
            if hasher is not None:
                hasher.update(line)
            if bar is not None:
                bar.update(len(line))
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8", errors))
            except UnicodeDecodeError as e:
                raise _utf8_error(path, line_start + e.start, e) from None
            except ValueError as e:
                n = _line_number(path, line_start)
                raise BarkError(f"{path} line {n} is not valid JSON ({e}); fix or remove that line") from None
            if not isinstance(obj, dict) or text_field not in obj:
                n = _line_number(path, line_start)
                raise BarkError(
                    f"{path} line {n} has no {text_field!r} field; pass --text-field NAME to name the field that holds the text"
                )
            text = obj[text_field]
            if not isinstance(text, str):
                n = _line_number(path, line_start)
                raise BarkError(
                    f"{path} line {n}: field {text_field!r} is {type(text).__name__}, not a string; "
                    f"pass --text-field NAME to name the field that holds the text"
                )
            if text:
                yield text, True


def _line_number(path: Path, offset: int) -> int:
    """1-based number of the line starting at byte ``offset`` of ``path`` (for error messages)."""
    n = 1
    with open_binary(path) as f:
        while offset > 0:
            block = f.read(min(1 << 20, offset))
            n += block.count(b"\n")
            offset -= len(block)
    return n


def _split_offset(files: list[Path], sizes: list[int], val_fraction: float, fmt: str, text_field: str = "text") -> int:
    """The byte where validation starts: ``(1 - val_fraction)`` of the input, moved to a line boundary
    (for a table, a row boundary: ``readers.table_split_offset``).

    A line boundary is just after a newline or between two files. The first one at or after the
    target is used; if the rest of the input is one line, the last one before it; if the whole
    input is one line, text input is cut at the target's character boundary.

    Raises:
        BarkError: one-line jsonl input (or a one-row table), which cannot be split.
    """
    if fmt == "table":
        return table_split_offset(files, sizes, val_fraction, text_field)
    total = sum(sizes)
    target = int(total * (1 - val_fraction))
    starts = list(itertools.accumulate(sizes[:-1], initial=0))  # where each file starts
    i = next(k for k in range(len(files)) if starts[k] + sizes[k] > target)  # the file holding the target
    local = target - starts[i]
    if local == 0 and target > 0:
        return target  # already between two files
    with open_binary(files[i]) as f:
        # forward: just after the first newline at or after byte target - 1, else this file's end
        pos = max(local - 1, 0)
        f.seek(pos)
        cut = starts[i] + sizes[i]
        while block := f.read(1 << 20):
            k = block.find(b"\n")
            if k >= 0:
                cut = starts[i] + pos + k + 1
                break
            pos += len(block)
        if cut < total:
            return cut
        # backward: just after the last newline before the target, else this file's start
        pos = local
        while pos > 0:
            lo = max(0, pos - (1 << 20))
            f.seek(lo)
            k = f.read(pos - lo).rfind(b"\n")
            if k >= 0:
                return starts[i] + lo + k + 1
            pos = lo
        if starts[i] > 0:
            return starts[i]
        if fmt == "jsonl":
            raise BarkError(f"{files[0]} holds one line, too little to split into train and val; add more lines")
        # one line of text: cut before the UTF-8 character that holds the target byte
        lo = max(local - 3, 0)
        f.seek(lo)
        window = f.read(local - lo + 1)
    cut = local
    while cut > lo and window[cut - lo] & 0xC0 == 0x80:
        cut -= 1
    return cut


def _spread(texts: Iterable[str], ratio: float) -> Iterator[str]:
    """Keep about ``ratio`` of the text (by characters), in pieces spread evenly over the stream."""
    if ratio >= 1:
        yield from texts
        return
    seen = taken = 0
    for text in texts:
        seen += len(text)
        if taken + len(text) <= ratio * seen:
            taken += len(text)
            yield text


# ---- writing the output ---------------------------------------------------------------------


def _write_splits(
    out: Path,
    tok: Tokenizer,
    train: Iterable[tuple[str, bool]],
    val: Iterable[tuple[str, bool]],
    add_eos: bool,
    source: str,
    val_fraction: float,
) -> dict:
    """Encode both splits into ``out/train.bin`` and ``out/val.bin``.

    Removes an old ``meta.json`` first (so a half-updated folder reads as unprepared), writes
    each file to a temporary name and renames both only when both hold at least 2 tokens.

    Returns:
        ``{"dtype", "train_tokens", "val_tokens", "unknown_count"}``.
    """
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / "meta.json")
    counts = {"dtype": np.dtype(dtype).name, "unknown_count": 0}
    tmps = {}
    try:
        for split, pieces in zip(SPLITS, (train, val), strict=True):
            tmps[split] = out / f".{split}.bin.{os.getpid()}.tmp"
            with open(tmps[split], "wb") as f:
                n, unknown = _encode_to(f, pieces, tok, dtype, add_eos)
                f.flush()
                os.fsync(f.fileno())
            counts[f"{split}_tokens"] = n
            counts["unknown_count"] += unknown
            if n < 2:
                fix = "a larger --val-fraction" if split == "val" else "a smaller --val-fraction"
                raise BarkError(
                    f"the {split} split of {source} has only {n} token(s) at val_fraction "
                    f"{val_fraction}; use a longer input or {fix}"
                )
        for split in SPLITS:
            os.replace(tmps.pop(split), out / f"{split}.bin")
    finally:
        for tmp in tmps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return counts


def _encode_to(f, pieces: Iterable[tuple[str, bool]], tok: Tokenizer, dtype, add_eos: bool) -> tuple[int, int]:
    """Encode ``(text, ends_document)`` pieces in ~4 MiB batches and append their ids to ``f``.

    An EOS id follows each piece that ends a document when ``add_eos``. Returns the number of
    tokens written and how many of them are ``<UNK>`` (not counting literal ``"<UNK>"`` text).
    """
    n_tokens = n_unknown = 0
    batch: list[str] = []
    ends: list[bool] = []
    size = 0

    def flush() -> None:
        nonlocal n_tokens, n_unknown
        flat: list[int] = []
        for ids, end in zip(tok.encode_batch(batch), ends, strict=True):
            flat.extend(ids)
            if end and add_eos:
                flat.append(tok.eos_id)
        arr = np.array(flat, dtype=dtype)
        arr.tofile(f)
        n_tokens += len(arr)
        if tok.kind != "bpe":
            n_unknown += int(np.count_nonzero(arr == tok.unk_id)) - sum(t.count(UNK) for t in batch)
        batch.clear()
        ends.clear()

    for text, end in pieces:
        batch.append(text)
        ends.append(end)
        size += len(text)
        if size >= BATCH_BYTES:
            flush()
            size = 0
    if batch:
        flush()
    return n_tokens, n_unknown


def _meta(tok: Tokenizer, counts: dict, source: str, sha256: str, val_fraction: float) -> dict:
    """The ``meta.json`` dict, fields in a fixed order."""
    meta = {
        "tokenizer": tok.kind,
        "vocab_size": tok.vocab_size,
        "dtype": counts["dtype"],
        "train_tokens": counts["train_tokens"],
        "val_tokens": counts["val_tokens"],
        "source": source,
        "source_sha256": sha256,
        "val_fraction": val_fraction,
    }
    if counts["unknown_count"]:
        meta["unknown_count"] = counts["unknown_count"]
    return meta
