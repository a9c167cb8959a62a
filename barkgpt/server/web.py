"""The web UI of ``barkgpt serve``: one page, ``index.html``, whose chat view is at ``/`` and whose
training view is at ``/train``, its scripts and style (``/static/*``, shipped in
``server/static/``: no CDN, no build step), and the JSON routes the training view reads.

The chat view speaks only the public ``/v1/chat/completions`` (streaming) and ``/v1/models``, so
it works against any OpenAI-compatible server. The training view reads the run folders under
``barkgpt serve --runs DIR`` (what ``train.py`` writes: ``config.yaml``, ``metrics.jsonl``,
``samples.jsonl``, ``last/`` and ``best/``), and may run one ``barkgpt train`` child process at a
time, whose output goes to the run's ``train.log``:

    GET  /v1/presets             the presets a run can start from, with their settings
    GET  /v1/runs                the runs: name, status, step, losses, tokens/s, ETA
    GET  /v1/runs/{name}         one run: that summary, metrics rows, config, samples, checkpoints, log
    POST /v1/runs                start a run from a preset with a few overrides (409 while one trains)
    POST /v1/runs/{name}/stop    SIGINT the run's process: it saves ``last/`` and exits
    POST /v1/runs/{name}/load    serve the run's checkpoint (``best/``, else ``last/``) as model ``name``

The pages and static files are public (they hold no data); the ``/v1`` routes need the API key
when one is set. A run name is one path component matching :data:`RUN_NAME`, and every file of a
run is read only when it resolves (symlinks followed) inside the runs folder. A run started here
reads data only under the data roots (the runs folder and each ``--data-root``; see
:func:`~barkgpt.server.security.resolve_data`), and only up to the size limits
(``--max-run-params``, ``--max-run-memory``, :func:`estimate_run`); its process gets the
server's environment without ``BARKGPT_API_KEY``.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence, TypeVar

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, field_validator

from barkgpt import runlog
from barkgpt.checkpoint import CONFIG_NAME, WEIGHTS_NAME, recover_checkpoint
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig, build_configs, coerce_value, field_types, preset_names, preset_path
from barkgpt.data import builtin_dataset
from barkgpt.generate import load_generator
from barkgpt.server import protocol as P
from barkgpt.server.errors import ApiError
from barkgpt.server.security import inside, resolve_data

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_PREFIX = "/static/"
PAGES = ("/", "/train")  # both send index.html, which shows the chat or the training view by its path
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # one path component: no '/', never '.' or '..'
OVERRIDES = ("data", "max_iters", "learning_rate", "batch_size", "eval_interval", "warmup_iters", "seed",
             "n_layer", "n_head", "n_embd", "block_size")  # what a run started from the page may change
MAX_METRIC_ROWS = 2000  # train-loss rows sent for a curve; longer runs are thinned (eval rows always kept)
SAMPLES_SHOWN = 5  # latest samples.jsonl entries in a run's detail
LOG_TAIL_LINES = 30  # lines of train.log in a run's detail
ACTIVE_S = 60.0  # a run not started here whose metrics changed this recently is "active"
STOP_TIMEOUT_S = 30.0  # at server shutdown, how long a training child gets to save last/ after SIGINT
PARSED_FILES_CACHED = 256  # parsed run files kept (about 5 a run), so polling re-parses only changed ones
MAX_OVERRIDE_INT = 2**31 - 1  # the largest integer an override may hold
DEFAULT_VOCAB = 2048  # the vocabulary a size estimate assumes when the data does not say (barkgpt prepare's bpe default)
SECRET_ENV = ("BARKGPT_API_KEY",)  # environment variables a training child does not inherit

T = TypeVar("T")


class StartRunRequest(BaseModel):
    """``POST /v1/runs``: train a new run ``name`` from ``preset`` with a few ``overrides``
    (field -> value, only the fields in :data:`OVERRIDES`)."""

    name: str = Field(min_length=1, max_length=64)
    preset: str = "bark"
    overrides: dict[str, str | int | float | bool | None] = Field(default_factory=dict)

    @field_validator("name", "preset")
    @classmethod
    def _valid_text(cls, v: str) -> str:
        P.check_text(v)
        return v

    @field_validator("overrides")
    @classmethod
    def _valid_overrides(cls, v: dict) -> dict:
        P.check_text([*v, *(x for x in v.values() if isinstance(x, str))])
        return v


class TrainingRuns:
    """The runs folder of ``barkgpt serve --runs`` and the one training process started from it.

    Args:
        root: the runs folder (created when the first run starts), or None: no runs (listing
            gives an empty list, the other routes a 404).
        data_roots: the other folders (``--data-root``) whose files a run may train on.
        max_params: the most parameters a run may have (:func:`estimate_run`).
        max_memory: the most bytes a run may need to train (:func:`estimate_run`); None: half
            this machine's RAM (:func:`default_memory_limit`).
    """

    def __init__(self, root: str | None, data_roots: Sequence[str] = (), max_params: int = 200_000_000,
                 max_memory: int | None = None):
        self.shown_root = root
        self.root = Path(root).resolve() if root else None
        self.data_roots = [self.root, *(Path(d).resolve() for d in data_roots)] if self.root else []
        self.max_params, self.max_memory = max_params, max_memory or default_memory_limit()
        self.proc: subprocess.Popen | None = None
        self.proc_name: str | None = None  # the run the process trains
        self.stopping = False  # SIGINT sent to the process
        self.failed: set[str] = set()  # runs whose earlier process here exited with an error
        self._lock = threading.Lock()

    # ---- reading runs ------------------------------------------------------------------------

    def folder(self, name: str, must_exist: bool = True) -> Path:
        """The folder of run ``name``.

        Raises:
            ApiError: 404 without a runs folder or (``must_exist``) no such run; 400 for a name
                that is not one plain path component.
        """
        if self.root is None:
            raise ApiError(404, "this server has no runs folder; start it with barkgpt serve --runs DIR",
                           "not_found_error", code="no_runs_folder")
        if not RUN_NAME.fullmatch(name):
            raise ApiError(400, "a run name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter "
                                "or digit", param="name", code="invalid_run_name")
        path = self.root / name
        if must_exist and not (self._own(path) and path.is_dir() and self._is_run(path)):
            raise ApiError(404, f"no run named '{name}' in the runs folder", "not_found_error", param="name",
                           code="run_not_found")
        return path

    def _own(self, path: Path) -> bool:
        """Whether ``path`` resolves (symlinks followed) inside the runs folder."""
        return inside(path, [self.root]) is not None

    def path_labels(self) -> dict[Path, str]:
        """How error bodies show the runs folder and the data roots: ``runs`` and ``data-root``."""
        labels = {r: "data-root" for r in self.data_roots[1:]}
        return {**labels, self.root: "runs"} if self.root else labels

    def _is_run(self, path: Path) -> bool:
        names = ("config.yaml", "metrics.jsonl", "train.log", "last", "best")
        return path.name == self.proc_name or any((path / n).exists() for n in names)

    def list_runs(self) -> dict:
        """``GET /v1/runs``: every run folder's summary, most recently changed first.

        Returns:
            ``{"object": "list", "runs_dir": the --runs folder as given (or None), "data": [summary, ...]}``,
            each summary as :meth:`_summary` gives it.
        """
        runs = []
        if self.root is not None and self.root.is_dir():
            for path in self.root.iterdir():
                if RUN_NAME.fullmatch(path.name) and self._own(path) and path.is_dir() and self._is_run(path):
                    runs.append(self._summary(path, read_metrics(path, self.root)))
        runs.sort(key=lambda r: r["updated"] or 0, reverse=True)
        return {"object": "list", "runs_dir": self.shown_root, "data": runs}

    def detail(self, name: str) -> dict:
        """``GET /v1/runs/{name}``: the summary plus metrics rows, config, samples, checkpoints, log.

        Returns:
            The :meth:`_summary` fields, and ``metrics`` (the ``metrics.jsonl`` rows, train rows
            thinned to about :data:`MAX_METRIC_ROWS`; non-finite numbers as None), ``config`` (the
            resolved ``config.yaml``, or None), ``samples`` (the last :data:`SAMPLES_SHOWN`
            ``samples.jsonl`` entries), ``checkpoints`` (:func:`checkpoint_infos`) and ``log`` (the
            last :data:`LOG_TAIL_LINES` lines of ``train.log``).

        Raises:
            ApiError: as :meth:`folder`.
        """
        path = self.folder(name)
        rows, config, checkpoints = read_metrics(path, self.root), read_config(path, self.root), checkpoint_infos(path, self.root)
        out = self._summary(path, rows, config, checkpoints)
        out["metrics"] = thin_rows(rows, MAX_METRIC_ROWS)
        out["config"] = config
        out["samples"] = read_jsonl(path / runlog.SAMPLES_NAME, self.root)[-SAMPLES_SHOWN:]
        out["checkpoints"] = checkpoints
        out["log"] = tail(path / "train.log", LOG_TAIL_LINES, self.root)
        return out

    def _summary(self, path: Path, rows: list[dict], config: dict | None = None, checkpoints: list[dict] | None = None) -> dict:
        """A run's status line from its metrics rows; its config and checkpoints are read here
        unless the caller already has them.

        Returns:
            ``name``; ``status`` (:meth:`_status`); ``step`` (the highest in the rows, 0 without
            rows) and ``max_iters`` (from the config, or None); the latest ``train_loss``,
            ``val_loss``, ``lr`` and ``tokens_per_s`` and the lowest ``best_val_loss`` (None when no
            row has them); ``elapsed_s`` (training seconds, the highest in the rows); ``eta_s``
            (seconds left at the rate so far, only while training or active, else None);
            ``updated`` (Unix seconds: the newest mtime of the folder and its ``metrics.jsonl``,
            or None); ``has_checkpoint`` (``best/`` or ``last/`` is readable).
        """
        config = read_config(path, self.root) if config is None else config
        checkpoints = checkpoint_infos(path, self.root) if checkpoints is None else checkpoints
        max_iters = ((config or {}).get("train") or {}).get("max_iters")
        train_rows = [r for r in rows if "train_loss" in r]
        val_rows = [r for r in rows if "val_loss" in r]
        last = train_rows[-1] if train_rows else {}
        step = max((r.get("step", 0) for r in rows), default=0)
        elapsed = max((r.get("elapsed_s", 0) for r in rows), default=0)
        status = self._status(path, step, max_iters)
        eta = None
        if status in ("training", "active") and max_iters and step:
            eta = round(max(0, max_iters - step) * elapsed / step, 1)
        mtimes = [p.lstat().st_mtime for p in (path, path / runlog.METRICS_NAME) if os.path.lexists(p)]
        return {"name": path.name, "status": status, "step": step, "max_iters": max_iters,
                "train_loss": last.get("train_loss"), "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
                "best_val_loss": min((r["val_loss"] for r in val_rows), default=None), "lr": last.get("lr"),
                "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": elapsed, "eta_s": eta,
                "updated": max(mtimes, default=None),
                "has_checkpoint": bool(checkpoints)}

    def _status(self, path: Path, step: int, max_iters: int | None) -> str:
        """training, stopping or failed (the process started here), else finished, else stopped, or
        "active" when a process elsewhere (``barkgpt train`` in a terminal) wrote metrics recently."""
        proc = self.proc
        ours = proc is not None and self.proc_name == path.name
        if ours:
            code = proc.poll()
            if code is None:
                return "stopping" if self.stopping else "training"
            if code != 0 and not self.stopping:
                return "failed"
        elif path.name in self.failed:
            return "failed"
        if max_iters and step >= max_iters:
            return "finished"
        metrics = path / runlog.METRICS_NAME
        if not ours and metrics.exists() and time.time() - metrics.stat().st_mtime < ACTIVE_S:
            return "active"
        return "stopped"

    # ---- starting and stopping ---------------------------------------------------------------

    def start(self, req: StartRunRequest) -> dict:
        """``POST /v1/runs``: check the request, then start ``barkgpt train`` for it.

        The child gets the data as the resolved path :func:`~barkgpt.server.security.resolve_data`
        found under the data roots, and the server's environment without :data:`SECRET_ENV`.

        Raises:
            ApiError: 400 for a bad name, preset or override, data outside the data roots, or a
                run over the size limits; 409 while a run trains or when the name is taken.
            BarkError: an invalid config (a 400 through the app's handler).
        """
        path = self.folder(req.name, must_exist=False)
        names = preset_names()
        if req.preset not in names:  # a name, never a path
            raise ApiError(400, f"unknown preset '{req.preset}'; presets: {', '.join(names)}", param="preset",
                           code="invalid_preset")
        unknown = sorted(set(req.overrides) - set(OVERRIDES))
        if unknown:
            raise ApiError(400, f"cannot override {', '.join(unknown)} from the page; allowed: {', '.join(OVERRIDES)}",
                           param="overrides", code="invalid_override")
        types = {**field_types(GPTConfig), **field_types(TrainConfig)}
        overrides = {k: coerce_value(k, v, types[k]) for k, v in req.overrides.items() if v not in (None, "")}
        for k, v in overrides.items():  # before any config check runs on them (a divisor search, say)
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OVERRIDE_INT:
                raise ApiError(400, f"{k} must be at most {MAX_OVERRIDE_INT}, got {v}", param=f"overrides.{k}",
                               code="invalid_override")
        model_cfg, train_cfg = build_configs(req.preset, None, {**overrides, "out_dir": str(path)})  # checks it all
        if train_cfg.data is None:
            raise ApiError(400, f"the preset '{req.preset}' names no data; give data (a folder from barkgpt prepare "
                                "or a text file)", param="overrides.data", code="missing_data")
        if builtin_dataset(train_cfg.data) is None:  # a registered generated corpus is a name, not a path
            data = resolve_data(train_cfg.data, self.data_roots)
            if data is None:
                raise ApiError(400, f"data '{train_cfg.data}' is not a file or folder under the server's data roots "
                                    "(the --runs folder and each --data-root; symlinks are followed); put the data "
                                    "there, or start the server with --data-root DIR", param="overrides.data",
                               code="data_outside_roots")
            overrides["data"] = str(data)
        self._check_size(model_cfg, train_cfg, overrides.get("data"))
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
        cmd = [sys.executable, "-m", "barkgpt", "train", "--preset", req.preset, "--out-dir", str(path), *flags]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise ApiError(409, f"the run '{self.proc_name}' is training; stop it before starting another",
                               code="run_in_progress")
            if os.path.lexists(path):  # a dangling symlink too
                raise ApiError(409, f"a run named '{req.name}' exists; pick another name", param="name",
                               code="run_exists")
            if self.proc is not None and self.proc.returncode != 0 and not self.stopping:
                self.failed.add(self.proc_name)  # still said after the next run starts
            path.mkdir(parents=True)
            with open(path / "train.log", "wb") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env={**env, "PYTHONUNBUFFERED": "1"})
            self.proc_name, self.stopping = req.name, False
        return self._summary(path, [])

    def _check_size(self, model_cfg: GPTConfig, train_cfg: TrainConfig, data: str | None) -> None:
        """Refuse a run whose :func:`estimate_run` is over ``max_params`` or ``max_memory``.

        Raises:
            ApiError: 400 naming the estimate, the limit and its flag.
        """
        vocab = model_cfg.vocab_size or meta_vocab_size(data) or train_cfg.tokenizer_vocab_size or DEFAULT_VOCAB
        params, memory = estimate_run(model_cfg, train_cfg, vocab)
        if params > self.max_params:
            raise ApiError(400, f"this run would have about {params:,} parameters, more than the {self.max_params:,} "
                                "this server allows (--max-run-params); lower n_layer or n_embd",
                           param="overrides", code="run_too_large")
        if memory > self.max_memory:
            raise ApiError(400, f"this run would need about {memory / 2**30:.1f} GiB to train, more than the "
                                f"{self.max_memory / 2**30:.1f} GiB this server allows (--max-run-memory); lower "
                                "batch_size, block_size, n_layer or n_embd", param="overrides", code="run_too_large")

    def stop(self, name: str) -> dict:
        """``POST /v1/runs/{name}/stop``: SIGINT the run's process (it saves ``last/`` and exits).

        Raises:
            ApiError: as :meth:`folder`; 409 when the run is not training in this server.
        """
        path = self.folder(name)
        with self._lock:
            if self.proc_name != name or self.proc is None or self.proc.poll() is not None:
                raise ApiError(409, f"the run '{name}' is not training in this server", code="run_not_training")
            self.proc.send_signal(signal.SIGINT)
            self.stopping = True
        return self._summary(path, read_metrics(path, self.root))

    def close(self) -> None:
        """Stop a training child (SIGINT, so it saves ``last/``; killed after ``STOP_TIMEOUT_S``)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        self.stopping = True
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---- reading a run folder (every reader tolerates a half-written or missing file) ----------------

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
    return {"name": path.name, "step": config.get("step") if isinstance(config, dict) else None,
            "val_loss": val if isinstance(val, (int, float)) and math.isfinite(val) else None,
            "bytes": size, "modified": modified}


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


def list_presets() -> list[dict]:
    """Each preset in ``barkgpt/configs`` with its first comment line and its :data:`OVERRIDES` values."""
    return copy.deepcopy(_presets())


@functools.lru_cache(maxsize=1)
def _presets() -> list[dict]:
    """:func:`list_presets`, read once: the presets are files of the installed package."""
    out = []
    for name in sorted(preset_names(), key=lambda n: f"{n}.yaml"):  # by file name, as listed so far
        path = preset_path(name)
        try:
            model_cfg, train_cfg = build_configs(name)
        except BarkError:
            continue
        values = {**vars(model_cfg), **vars(train_cfg)}
        comment = next((line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines()
                        if line.startswith("#")), "")
        out.append({"name": name, "description": comment, "settings": {k: values[k] for k in OVERRIDES}})
    return out


# ---- how big a run may be -------------------------------------------------------------------------

def estimate_run(model: GPTConfig, train: TrainConfig, vocab_size: int) -> tuple[int, int]:
    """The parameters and the bytes of memory a training run needs, estimated from its config
    alone (building the model to count would itself allocate what is being checked).

    Parameters: token embeddings (and an untied head), learned positions (gpt2), and per block
    the attention (q, k, v with ``n_kv_head`` heads, output projection), the MLP (GELU: two
    matrices, SwiGLU: three, MoE: three per expert plus the router) and two norms; biases when
    the config has them.

    Memory: 16 bytes a parameter (fp32 weights and gradients, AdamW's two moments), plus one
    micro-batch's activations: 34 bytes per token and channel per layer at 16 bits in
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (section 4.1, without the attention scores, which SDPA's fused kernels do not keep), so
    68 at fp32; plus the logits, their log-softmax and its gradient (12 bytes per token and
    vocabulary entry) and the RoPE tables.

    Args:
        model: the run's model config (``intermediate_size``, ``n_kv_head`` resolved).
        train: its train config (``batch_size`` is the micro-batch in sequences).
        vocab_size: the vocabulary, in tokens.

    Returns:
        ``(parameters, bytes)``.
    """
    C, L, T, B, V = model.n_embd, model.n_layer, model.block_size, train.batch_size, vocab_size
    kv, inner, bias = model.n_kv_head * model.head_dim, model.intermediate_size, int(bool(model.bias))
    attn = C * C + 2 * C * kv + C * C + bias * (2 * C + 2 * kv)
    if model.n_expert:
        mlp = model.n_expert * 3 * C * inner + C * model.n_expert
    elif model.family == "llama":
        mlp = 3 * C * inner + bias * (2 * inner + C)
    else:
        mlp = 2 * C * inner + bias * (inner + C)
    norm = C * (1 + bias) if model.family == "gpt2" else C
    params = V * C * (1 if model.tie_embeddings else 2) + (T * C if model.family == "gpt2" else 0)
    params += L * (attn + mlp + 2 * norm) + norm
    memory = 16 * params + 68 * L * T * B * C + 12 * B * T * V + (8 * T * model.head_dim if model.family == "llama" else 0)
    return params, memory


def meta_vocab_size(data: str | None) -> int | None:
    """The ``vocab_size`` in a prepared data folder's ``meta.json``, or None (no folder, no file,
    not a positive integer)."""
    if not data:
        return None
    try:
        vocab = json.loads((Path(data) / "meta.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None


def default_memory_limit() -> int:
    """Half this machine's RAM in bytes (8 GiB where the OS does not say): the default of
    ``--max-run-memory``."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30


# ---- routes --------------------------------------------------------------------------------------

def add_routes(app: FastAPI, host, runs: TrainingRuns) -> None:
    """Add the pages, ``/static``, and the run routes to ``app``.

    Args:
        app: the app of :func:`barkgpt.server.app.create_app`.
        host: its :class:`~barkgpt.server.app.ModelHost` (``/load`` attaches a run's model to it).
        runs: the runs folder and its training process.
    """
    for route in PAGES:
        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)
    app.mount(STATIC_PREFIX.rstrip("/"), StaticFiles(directory=STATIC_DIR), name="static")
    load_lock = asyncio.Lock()

    @app.get("/v1/presets")
    def presets():
        """The presets a run can start from, with their settings."""
        return {"object": "list", "data": list_presets(), "overrides": list(OVERRIDES)}

    @app.get("/v1/runs")
    def list_runs():
        """The runs under ``--runs``, most recently changed first."""
        return runs.list_runs()

    @app.get("/v1/runs/{name}")
    def get_run(name: str):
        """One run: summary, metrics rows, resolved config, latest samples, checkpoints, log tail."""
        return runs.detail(name)

    @app.post("/v1/runs", status_code=201)
    def start_run(body: StartRunRequest):
        """Start ``barkgpt train --preset P --out-dir RUNS/NAME`` with the overrides (one run at a time)."""
        return runs.start(body)

    @app.post("/v1/runs/{name}/stop")
    def stop_run(name: str):
        """Ask the run's process to stop (SIGINT): it saves ``last/`` and exits."""
        return runs.stop(name)

    @app.post("/v1/runs/{name}/load")
    async def load_run(name: str):
        """Serve the run's ``best/`` (else ``last/``) checkpoint from now on, as model id ``name``."""
        path = runs.folder(name)
        gen, _ = host.ready()  # 503 while the first model loads or the server stops
        checkpoints = checkpoint_infos(path, runs.root)  # best/ first, as load_generator picks
        if not checkpoints:
            raise ApiError(409, f"the run '{name}' has no checkpoint yet; wait for its first evaluation",
                           code="no_checkpoint")
        device = str(next(gen.model.parameters()).device)
        async with load_lock:  # the folder checked above, resolved: nothing else is read
            new = await asyncio.to_thread(load_generator, (path / checkpoints[0]["name"]).resolve(), device)
            await asyncio.to_thread(host.attach, new, name)  # compiles the decode step: off the event loop
        return {"model": name, "max_model_len": new.block_size}


async def page():
    """The web page, ``index.html`` (revalidated on each visit, so an upgrade shows at once)."""
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
