"""The training runs of ``barkgpt serve --runs DIR``: :class:`TrainingRuns` lists and describes
the run folders (what ``train.py`` writes: ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``,
``last/`` and ``best/``; read with :mod:`barkgpt.server.runfiles`), and runs one ``barkgpt train``
child process at a time, whose output goes to the run's ``train.log``. The routes over it are in
:mod:`barkgpt.server.web`.

A run name is one path component matching :data:`RUN_NAME`, and every file of a run is read only
when it resolves (symlinks followed) inside the runs folder. A run started here reads data only
under the data roots (the runs folder and each ``--data-root``; see
:func:`~barkgpt.server.security.resolve_data`), and only up to the size limits
(``--max-run-params``, ``--max-run-memory``, :func:`~barkgpt.server.run_limits.estimate_run`); its process gets the
server's environment without ``BARKGPT_API_KEY``.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from barkgpt import runlog
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig, build_configs, coerce_value, field_types, preset_names, preset_path
from barkgpt.data import builtin_dataset
from barkgpt.server.errors import ApiError
from barkgpt.server.native_protocol import StartRunRequest
from barkgpt.server.run_limits import DEFAULT_VOCAB, default_memory_limit, estimate_run, meta_vocab_size
from barkgpt.server.runfiles import checkpoint_infos, read_config, read_jsonl, read_metrics, tail, thin_rows
from barkgpt.server.security import inside, resolve_data

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # one path component: no '/', never '.' or '..'
OVERRIDES = (
    "data",
    "max_iters",
    "learning_rate",
    "batch_size",
    "eval_interval",
    "warmup_iters",
    "seed",
    "n_layer",
    "n_head",
    "n_embd",
    "block_size",
)  # what a run started from the page may change
MAX_METRIC_ROWS = 2000  # train-loss rows sent for a curve; longer runs are thinned (eval rows always kept)
SAMPLES_SHOWN = 5  # latest samples.jsonl entries in a run's detail
LOG_TAIL_LINES = 30  # lines of train.log in a run's detail
ACTIVE_S = 60.0  # a run not started here whose metrics changed this recently is "active"
STOP_TIMEOUT_S = 30.0  # at server shutdown, how long a training child gets to save last/ after SIGINT
MAX_OVERRIDE_INT = 2**31 - 1  # the largest integer an override may hold
SECRET_ENV = ("BARKGPT_API_KEY",)  # environment variables a training child does not inherit


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

    def __init__(
        self, root: str | None, data_roots: Sequence[str] = (), max_params: int = 200_000_000, max_memory: int | None = None
    ):
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
            raise ApiError(
                404,
                "this server has no runs folder; start it with barkgpt serve --runs DIR",
                "not_found_error",
                code="no_runs_folder",
            )
        if not RUN_NAME.fullmatch(name):
            raise ApiError(
                400,
                "a run name is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit",
                param="name",
                code="invalid_run_name",
            )
        path = self.root / name
        if must_exist and not (self._own(path) and path.is_dir() and self._is_run(path)):
            raise ApiError(
                404, f"no run named '{name}' in the runs folder", "not_found_error", param="name", code="run_not_found"
            )
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
        return {
            "name": path.name,
            "status": status,
            "step": step,
            "max_iters": max_iters,
            "train_loss": last.get("train_loss"),
            "val_loss": val_rows[-1]["val_loss"] if val_rows else None,
            "best_val_loss": min((r["val_loss"] for r in val_rows), default=None),
            "lr": last.get("lr"),
            "tokens_per_s": last.get("tokens_per_s"),
            "elapsed_s": elapsed,
            "eta_s": eta,
            "updated": max(mtimes, default=None),
            "has_checkpoint": bool(checkpoints),
        }

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
            raise ApiError(
                400, f"unknown preset '{req.preset}'; presets: {', '.join(names)}", param="preset", code="invalid_preset"
            )
        unknown = sorted(set(req.overrides) - set(OVERRIDES))
        if unknown:
            raise ApiError(
                400,
                f"cannot override {', '.join(unknown)} from the page; allowed: {', '.join(OVERRIDES)}",
                param="overrides",
                code="invalid_override",
            )
        types = {**field_types(GPTConfig), **field_types(TrainConfig)}
        overrides = {k: coerce_value(k, v, types[k]) for k, v in req.overrides.items() if v not in (None, "")}
        for k, v in overrides.items():  # before any config check runs on them (a divisor search, say)
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_OVERRIDE_INT:
                raise ApiError(
                    400, f"{k} must be at most {MAX_OVERRIDE_INT}, got {v}", param=f"overrides.{k}", code="invalid_override"
                )
        model_cfg, train_cfg = build_configs(req.preset, None, {**overrides, "out_dir": str(path)})  # checks it all
        if train_cfg.data is None:
            raise ApiError(
                400,
                f"the preset '{req.preset}' names no data; give data (a folder from barkgpt prepare or a text file)",
                param="overrides.data",
                code="missing_data",
            )
        if builtin_dataset(train_cfg.data) is None:  # a registered generated corpus is a name, not a path
            data = resolve_data(train_cfg.data, self.data_roots)
            if data is None:
                raise ApiError(
                    400,
                    f"data '{train_cfg.data}' is not a file or folder under the server's data roots "
                    "(the --runs folder and each --data-root; symlinks are followed); put the data "
                    "there, or start the server with --data-root DIR",
                    param="overrides.data",
                    code="data_outside_roots",
                )
            overrides["data"] = str(data)
        self._check_size(model_cfg, train_cfg, overrides.get("data"))
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]
        cmd = [sys.executable, "-m", "barkgpt", "train", "--preset", req.preset, "--out-dir", str(path), *flags]
        env = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                raise ApiError(
                    409, f"the run '{self.proc_name}' is training; stop it before starting another", code="run_in_progress"
                )
            if os.path.lexists(path):  # a dangling symlink too
                raise ApiError(409, f"a run named '{req.name}' exists; pick another name", param="name", code="run_exists")
            if self.proc is not None and self.proc.returncode != 0 and not self.stopping:
                self.failed.add(self.proc_name)  # still said after the next run starts
            path.mkdir(parents=True)
            with open(path / "train.log", "wb") as log:
                self.proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env={**env, "PYTHONUNBUFFERED": "1"}
                )
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
            raise ApiError(
                400,
                f"this run would have about {params:,} parameters, more than the {self.max_params:,} "
                "this server allows (--max-run-params); lower n_layer or n_embd",
                param="overrides",
                code="run_too_large",
            )
        if memory > self.max_memory:
            raise ApiError(
                400,
                f"this run would need about {memory / 2**30:.1f} GiB to train, more than the "
                f"{self.max_memory / 2**30:.1f} GiB this server allows (--max-run-memory); lower "
                "batch_size, block_size, n_layer or n_embd",
                param="overrides",
                code="run_too_large",
            )

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
        comment = next(
            (line.lstrip("# ").strip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")), ""
        )
        out.append({"name": name, "description": comment, "settings": {k: values[k] for k in OVERRIDES}})
    return out
