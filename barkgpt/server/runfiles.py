"""Readers of a run folder, for the web page's training view (:mod:`barkgpt.server.runs`): its
``metrics.jsonl`` and ``samples.jsonl`` rows, its resolved ``config.yaml``, its checkpoints
(``best/``, ``last/``) and the tail of its ``train.log``.

Every reader tolerates a half-written or missing file (a run may be writing it now), and, given
the runs folder as ``root``, reads a file only when it resolves (symlinks followed) inside it, so
a link in a run folder cannot show a file outside. Parsed files are remembered while their
inode, mtime and size stay the same, so the page's polling re-parses only the files that changed.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from barkgpt import runlog
from barkgpt.checkpoint import CONFIG_NAME, WEIGHTS_NAME, recover_checkpoint
from barkgpt.server.security import inside

PARSED_FILES_CACHED = 256  # parsed run files kept (about 5 a run), so polling re-parses only changed ones

T = TypeVar("T")

_parsed: OrderedDict[tuple[str, Path], tuple[tuple[int, int, int], object]] = OrderedDict()
_parsed_lock = threading.Lock()


def _file_key(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is written or replaced: inode, mtime (ns) and size; None if missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def _parsed_file(kind: str, path: Path, parse: Callable[[Path], T]) -> T:
    """``parse(path)``, remembered while the file's inode, mtime and size stay the same, so the
    pages' polling re-parses only files that changed (a file being appended grows, so its next
    read parses it again). The value is shared between calls: callers hand out copies.

    Args:
        kind: which parser (one file could be read by two).
        path: the file.
        parse: reads and parses it; must handle a missing or half-written file itself.
    """
    key = _file_key(path)
    if key is None:
        return parse(path)  # missing: the parser's own answer, nothing kept
    with _parsed_lock:
        hit = _parsed.get((kind, path))
        if hit is not None and hit[0] == key:
            _parsed.move_to_end((kind, path))
            return hit[1]
    value = parse(path)
    if _file_key(path) == key:  # not written while read, so the value belongs to that key
        with _parsed_lock:
            _parsed[(kind, path)] = (key, value)
            _parsed.move_to_end((kind, path))
            while len(_parsed) > PARSED_FILES_CACHED:
                _parsed.popitem(last=False)
    return value


def _parse_jsonl(path: Path) -> list[dict]:
    """A log file's rows as :func:`runlog.read_rows` reads a file being appended (not strict)."""
    return runlog.read_rows(path, strict=False)


def _parse_metrics(path: Path) -> list[dict]:
    """``metrics.jsonl`` rows with non-finite numbers as None (:func:`runlog.finite_or_none`)."""
    return [runlog.finite_or_none(row) for row in runlog.read_rows(path, strict=False)]


def _readable(path: Path, root: Path | None) -> bool:
    """Whether a reader may open ``path``: always without ``root``, else only when it resolves
    (symlinks followed) inside ``root``, so a link in a run folder cannot show a file outside."""
    return root is None or inside(path, [root]) is not None


def read_jsonl(path: Path, root: Path | None = None) -> list[dict]:
    """The rows (JSON objects with a ``step``) of a run's ``.jsonl`` log; a line being written
    (not valid JSON yet) is skipped.
    With ``root``, a file that resolves outside it reads as missing (no rows)."""
    if not _readable(path, root):
        return []
    return [dict(row) for row in _parsed_file("jsonl", path, _parse_jsonl)]


def read_metrics(path: Path, root: Path | None = None) -> list[dict]:
    """A run's ``metrics.jsonl`` rows, with non-finite numbers (a diverged loss) as None; with
    ``root``, none when the file resolves outside it."""
    if not _readable(path / runlog.METRICS_NAME, root):
        return []
    return [dict(row) for row in _parsed_file("metrics", path / runlog.METRICS_NAME, _parse_metrics)]


def thin_rows(rows: list[dict], limit: int) -> list[dict]:
    """``rows`` with the train rows thinned to about ``limit`` (every k-th, and the last); eval rows all kept."""
    train = [i for i, r in enumerate(rows) if "val_loss" not in r]
    if len(train) <= limit:
        return rows
    k = math.ceil(len(train) / limit)
    keep = set(train[::k]) | {train[-1]}
    return [r for i, r in enumerate(rows) if i in keep or "val_loss" in r]


def read_config(path: Path, root: Path | None = None) -> dict | None:
    """A run's resolved ``config.yaml`` as ``{"model": {...}, "train": {...}}``, or None (also,
    with ``root``, when the file resolves outside it)."""
    if not _readable(path / "config.yaml", root):
        return None
    return copy.deepcopy(_parsed_file("yaml", path / "config.yaml", _parse_config))


def _parse_config(path: Path) -> dict | None:
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def checkpoint_infos(run: Path, root: Path | None = None) -> list[dict]:
    """:func:`checkpoint_info` of a run's ``best/`` and ``last/``, those that exist (inside ``root``);
    one that a kill left at ``last.old/`` counts as ``last/`` (:func:`recover_checkpoint`)."""
    found = [(n, recover_checkpoint(run / n)) for n in ("best", "last")]
    return [{**c, "name": n} for n, p in found if p is not None and (c := checkpoint_info(p, root))]


def checkpoint_info(path: Path, root: Path | None = None) -> dict | None:
    """Step, val loss, size and time of a checkpoint folder (``best/``, ``last/``).

    Returns:
        ``{"name": the folder's name, "step": the config.json step (or None), "val_loss": its
        finite val_loss (or None), "bytes": the total size in bytes of the folder's files,
        "modified": the weights file's mtime in Unix seconds}``, or None when ``config.json`` is
        missing or not JSON, or the weights file is missing; with ``root``, also when the folder
        or any file in it resolves outside ``root`` (loading it would read that file).
    """
    try:
        entries = list(path.iterdir())
        if root is not None and not all(_readable(p, root) for p in (path, *entries)):
            return None
        files = [f for f in entries if f.is_file()]
        config = _parsed_file("json", path / CONFIG_NAME, _parse_json)
        size, modified = sum(f.stat().st_size for f in files), (path / WEIGHTS_NAME).stat().st_mtime
    except (OSError, ValueError):
        return None
    val = config.get("val_loss") if isinstance(config, dict) else None
    return {
        "name": path.name,
        "step": config.get("step") if isinstance(config, dict) else None,
        "val_loss": val if isinstance(val, (int, float)) and math.isfinite(val) else None,
        "bytes": size,
        "modified": modified,
    }


def _parse_json(path: Path):
    """The JSON value of a file (its errors, OSError and ValueError, are not remembered)."""
    return json.loads(path.read_text(encoding="utf-8"))


def tail(path: Path, n: int, root: Path | None = None) -> list[str]:
    """The last ``n`` lines of a log (a progress bar's ``\\r`` updates count as lines); none when
    it is missing or (with ``root``) resolves outside ``root``."""
    if not _readable(path, root):
        return []
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 16384))  # the end is enough
            text = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()][-n:]
