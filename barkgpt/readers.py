"""The input formats ``prepare`` reads, as byte streams and tables that :mod:`barkgpt.data` cuts.

What a user already has, streamed (memory stays flat whatever the size):

- a text file (``.txt``, ``.md``, or any extension not named below): one document;
- a folder of text files: every ``.txt`` and ``.md`` file under it, recursively, sorted by path,
  hidden files and folders (a name starting with ``.``) skipped; one document each;
- a ``.jsonl`` file: one document per line, in the field ``--text-field`` (default ``text``);
- any of these compressed: ``.gz`` (gzip, the standard library) or ``.zst`` (Zstandard, the
  ``zstandard`` package of the ``data`` extra), e.g. ``corpus.txt.gz``, ``rows.jsonl.zst``;
- a ``.parquet`` file (``pyarrow``, the ``data`` extra): one document per row of the column
  ``--text-field``, read a record batch at a time;
- a Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk`` (``state.json`` naming
  its Arrow files) or ``DatasetDict.save_to_disk`` (``dataset_dict.json``; its ``train`` split, or
  every split when there is none): the Arrow IPC stream files are read with ``pyarrow`` directly,
  so the ``datasets`` package is not needed.

Text and JSONL are byte streams: :func:`open_binary` opens a file, compressed or not, as a
seekable binary file of its decompressed bytes, so ``data``'s readers cut and split them by
byte offset as they do plain files. Tables (parquet, Arrow) have no bytes to seek: their offsets
are *virtual*, each row counting as its text's UTF-8 bytes plus one (a newline), so that the same
``[start, end)`` ranges and validation fraction apply; :func:`read_table` and
:func:`table_split_offset` work in that space.
"""

from __future__ import annotations

import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path

from barkgpt.common import BarkError

TEXT_SUFFIXES = (".txt", ".md")  # the files a folder contributes
COMPRESSED = (".gz", ".zst")
TABLE_BATCH_ROWS = 1024  # rows per record batch read from a parquet file


# ---- listing the input ----------------------------------------------------------------------


def list_input(path: Path, text_field: str = "text") -> tuple[list[Path], list[int], str]:
    """The input's files in order, their sizes, and the format: ``text``, ``jsonl`` or ``table``.

    Sizes are in decompressed bytes for text and JSONL (a compressed file is read through once
    to count them), and in virtual bytes of column ``text_field`` for tables (see the module
    docstring).

    Raises:
        BarkError: a missing path, a folder with no text files, a corrupt compressed file, a
            table without a ``text_field`` text column, a table without ``pyarrow`` (or ``.zst``
            without ``zstandard``).
    """
    if not path.exists():
        raise BarkError(
            f"input {path} does not exist; pass a .txt/.md/.jsonl/.parquet file (or .gz/.zst), "
            "a folder of .txt/.md files, or a datasets folder (save_to_disk)"
        )
    if path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        files = _arrow_files(path)
        return files, table_sizes(files, text_field), "table"
    if path.is_dir():
        files = _text_files(path)
        return files, [stream_size(f) for f in files], "text"
    if _base_suffix(path) == ".parquet":
        return [path], table_sizes([path], text_field), "table"
    fmt = "jsonl" if _base_suffix(path) == ".jsonl" else "text"
    return [path], [stream_size(path)], fmt


def _base_suffix(path: Path) -> str:
    """The suffix that names the format, under a compression suffix (``a.jsonl.gz`` -> ``.jsonl``)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def _text_files(folder: Path) -> list[Path]:
    """Every non-hidden ``.txt``/``.md`` file under ``folder`` (compressed ones too), sorted by path.

    Raises:
        BarkError: there is none.
    """
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if _base_suffix(p) in TEXT_SUFFIXES:
            files.append(p)
    if not files:
        raise BarkError(f"folder {folder} holds no .txt or .md files; put the documents in such files or pass a file")
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _arrow_files(folder: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder, in the order ``state.json`` lists them.

    Raises:
        BarkError: ``state.json``/``dataset_dict.json`` is unreadable or names missing files.
    """
    if (folder / "dataset_dict.json").is_file():
        splits = _read_json(folder / "dataset_dict.json").get("splits") or []
        chosen = [_plain_name(s, folder / "dataset_dict.json") for s in (["train"] if "train" in splits else list(splits))]
        files = [f for split in chosen for f in _arrow_files(folder / split)]
        if not files:
            raise BarkError(f"{folder}/dataset_dict.json lists no splits; save the dataset again with save_to_disk")
        return files
    state = _read_json(folder / "state.json")
    names = [d.get("filename") for d in state.get("_data_files") or [] if isinstance(d, dict)]
    files = [folder / _plain_name(n, folder / "state.json") for n in names if isinstance(n, str)]
    missing = [f.name for f in files if not f.is_file()]
    if not files or missing:
        raise BarkError(
            f"{folder}/state.json names no Arrow files, or missing ones ({', '.join(missing) or 'none listed'}); "
            "save the dataset again with save_to_disk"
        )
    return files


def _plain_name(name, listed_in: Path) -> str:
    """``name`` if it is a plain file or folder name (what ``save_to_disk`` writes), so a listed
    split or Arrow file cannot lead outside the dataset folder.

    Raises:
        BarkError: ``name`` is not a string, is empty, ``.``/``..``, or holds a path separator.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise BarkError(f"{listed_in} names {name!r}, not a plain file name; save the dataset again with save_to_disk")
    return name


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``, or a BarkError saying the file is corrupt."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BarkError(f"{path} is not readable JSON ({e}); save the dataset again with save_to_disk") from None
    if not isinstance(obj, dict):
        raise BarkError(f"{path} is not a JSON object; save the dataset again with save_to_disk")
    return obj


# ---- byte streams (text, jsonl; compressed or not) ------------------------------------------


class _ZstdRaw(io.RawIOBase):
    """A ``.zst`` file as a seekable raw stream of its decompressed bytes. Seeking forward
    decompresses and drops; seeking back starts over (``data`` seeks back only to find a line
    boundary near the validation cut)."""

    def __init__(self, path: Path):
        self.path, self.file, self.reader, self.pos = path, None, None, 0
        self._reopen()

    def _reopen(self) -> None:
        import zstandard

        if self.file is not None:
            self.file.close()
        self.file = open(self.path, "rb")
        self.reader = zstandard.ZstdDecompressor().stream_reader(self.file, read_across_frames=True)
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.reader.readinto(b)
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            pos += self.pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a .zst stream seeks from its start or its position only")
        if pos < self.pos:
            self._reopen()
        while self.pos < pos and (block := self.reader.read(min(1 << 20, pos - self.pos))):
            self.pos += len(block)
        return self.pos

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        super().close()


def open_binary(path: Path):
    """``path`` opened for binary reading, decompressed when it ends in ``.gz`` or ``.zst``: a
    seekable file object with ``read``, ``readline`` and ``seek`` over the decompressed bytes.

    Raises:
        BarkError: a ``.zst`` file without the ``zstandard`` package.
    """
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".zst":
        try:
            import zstandard  # noqa: F401 - checks the optional extra before the file is opened
        except ImportError:
            raise BarkError(f"{path} is Zstandard-compressed; pip install 'barkgpt[data]' (zstandard) to read it") from None
        return io.BufferedReader(_ZstdRaw(path), 1 << 17)
    return open(path, "rb")


def stream_size(path: Path) -> int:
    """Bytes in ``path`` once decompressed (its size on disk when not compressed; a compressed
    file is read through once).

    Raises:
        BarkError: a corrupt or truncated compressed file.
    """
    if path.suffix.lower() not in COMPRESSED:
        return path.stat().st_size
    try:
        with open_binary(path) as f:
            n = 0
            while block := f.read(1 << 20):
                n += len(block)
            return n
    except (OSError, EOFError, zlib.error) as e:
        raise _corrupt(path, e) from None
    except Exception as e:  # zstandard.ZstdError, whose module is an optional import
        if type(e).__name__ != "ZstdError":
            raise
        raise _corrupt(path, e) from None


def _corrupt(path: Path, e: Exception) -> BarkError:
    """The one-line error for a compressed file that does not decompress."""
    return BarkError(f"{path} is not a valid {path.suffix} file ({e}); compress it again or pass the uncompressed file")


# ---- tables (parquet, a datasets folder's Arrow files) --------------------------------------


def _pyarrow():
    """The ``pyarrow`` module, or a BarkError naming the extra."""
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - the Arrow stream reader
        import pyarrow.parquet  # noqa: F401 - the parquet reader
    except ImportError:
        raise BarkError("parquet and datasets folders need pyarrow; pip install 'barkgpt[data]'") from None
    return pyarrow


def _batches(path: Path, columns: list[str] | None = None) -> Iterator:
    """The record batches of a parquet file or an Arrow file (IPC stream, as ``save_to_disk``
    writes them, or IPC file), with ``columns`` only when given.

    Raises:
        BarkError: the file is not a readable table.
    """
    pa = _pyarrow()
    try:
        if path.suffix.lower() == ".parquet":
            pf = pa.parquet.ParquetFile(path)
            keep = columns if columns and set(columns) <= set(pf.schema_arrow.names) else None  # else the reader names the miss
            yield from pf.iter_batches(batch_size=TABLE_BATCH_ROWS, columns=keep)
            return
        with pa.memory_map(str(path)) as source:
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                source.seek(0)
                reader = pa.ipc.open_file(source)
                reader = (reader.get_batch(i) for i in range(reader.num_record_batches))
            for batch in reader:
                yield batch.select(columns) if columns and set(columns) <= set(batch.schema.names) else batch
    except (pa.ArrowException, OSError) as e:
        raise BarkError(f"{path} is not a readable parquet or Arrow table ({str(e).splitlines()[0]}); write it again") from None


def _text_column(path: Path, batch, text_field: str):
    """The column ``text_field`` of a record batch, checked to hold text.

    Raises:
        BarkError: no such column (naming the columns and ``--text-field``), or not strings.
    """
    pa = _pyarrow()
    names = batch.schema.names
    if text_field not in names:
        raise BarkError(
            f"{path} has no column {text_field!r} (columns: {', '.join(names)}); "
            f"pass --text-field NAME to name the column that holds the text"
        )
    col = batch.column(text_field)
    t = col.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        raise BarkError(f"{path} column {text_field!r} holds {t}, not text; pass --text-field NAME to name the text column")
    return col


def table_sizes(files: list[Path], text_field: str) -> list[int]:
    """Each table's virtual size counted over ``text_field`` (see the module docstring).

    Raises:
        BarkError: as :func:`read_table` for a missing or non-text column.
    """
    import pyarrow.compute as pc

    sizes = []
    for path in files:
        total = 0
        for batch in _batches(path, [text_field]):
            col = _text_column(path, batch, text_field)
            total += int(pc.sum(pc.binary_length(col)).as_py() or 0) + batch.num_rows
        sizes.append(total)
    return sizes


def read_table(
    files: list[Path], start: int, end: int, errors: str, text_field: str, hasher=None, bar=None
) -> Iterator[tuple[str, bool]]:
    """Yield ``(text, True)`` for each row whose virtual offset lies in ``[start, end)``.

    Rows with empty or null text are skipped. Feeds each row's UTF-8 text and a newline to
    ``hasher`` and its virtual size to ``bar``.

    Raises:
        BarkError: a missing or non-text column; binary text that is not UTF-8 (with
            ``errors="strict"``), naming the file and row.
    """
    offset = 0
    for path in files:
        row = 0
        for batch in _batches(path, [text_field] if text_field else None):
            values = _text_column(path, batch, text_field).to_pylist()
            for value in values:
                row += 1
                raw = value.encode("utf-8") if isinstance(value, str) else (value or b"")
                here, offset = offset, offset + len(raw) + 1
                if here < start:
                    continue
                if here >= end:
                    return
                if hasher is not None:
                    hasher.update(raw + b"\n")
                if bar is not None:
                    bar.update(len(raw) + 1)
                text = value if isinstance(value, str) else _decode_row(path, row, raw, errors)
                if text:
                    yield text, True


def _decode_row(path: Path, row: int, raw: bytes, errors: str) -> str:
    """A binary cell as text, or the one-line UTF-8 error naming the row."""
    try:
        return raw.decode("utf-8", errors)
    except UnicodeDecodeError as e:
        raise BarkError(
            f"{path} row {row} is not valid UTF-8 at byte offset {e.start} (byte 0x{raw[e.start]:02x}); "
            f"convert it to UTF-8 or pass --errors replace"
        ) from None


def table_split_offset(files: list[Path], sizes: list[int], val_fraction: float, text_field: str) -> int:
    """Where validation starts in a table's virtual bytes: the first row boundary at or after
    ``(1 - val_fraction)`` of them, or the last one before it when that is the end.

    Raises:
        BarkError: the table holds a single row, too little to split.
    """
    import pyarrow.compute as pc

    total = sum(sizes)
    target = int(total * (1 - val_fraction))
    offset, last_before = 0, 0
    for path in files:
        for batch in _batches(path, [text_field]):
            lengths = pc.binary_length(_text_column(path, batch, text_field)).fill_null(0).to_pylist()
            for n in lengths:
                offset += n + 1
                if offset >= target and offset < total:
                    return offset
                if offset < target:
                    last_before = offset
    if last_before == 0:
        raise BarkError(f"{files[0]} holds one row, too little to split into train and val; add more rows")
    return last_before
