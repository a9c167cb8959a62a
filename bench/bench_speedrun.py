"""CPU speedrun on char-level tiny Shakespeare: time to val loss 1.886, and the best val loss in 10 minutes.

Both figures are wall clock from process start: each run is ``python -m barkgpt train`` as a
subprocess, timed from just before it starts, so the imports, the data loading, the model build,
any compile and every evaluation count. The bench polls the run's ``metrics.jsonl``
(``barkgpt/runlog.py``) every 20 ms and stamps each val row when it appears (a row is written
right after its evaluation, so the stamp includes the evaluation).

- **target**: the first eval with val loss <= ``--target`` (1.886: where nanoGPT's CPU recipe,
  ``../shared/bench/reference_gpt.py``, ends its 2000 steps); the run is stopped there. With
  compile on it runs twice: first with fresh, empty inductor and C++ extension caches (``cold``:
  the first run on a machine, the attention kernel's build included), then again on those caches
  (``warm``).
- **ten_minutes**: the best val loss among the evals stamped within ``--seconds`` (600) of the
  start; a run still going then is stopped.

The evals that decide it are the shakespeare-char preset's fixed val windows: block_size 64 and
600 evenly spaced windows (``eval_iters`` 50 x ``batch_size`` 12; ``TokenWindows.eval_batches``).
A recipe with another ``batch_size`` keeps the same 600 windows with ``eval_iters`` = 600 /
``batch_size``; the bench reads each run's ``config.yaml`` and exits if its windows differ.

    python bench/bench_speedrun.py [--target-only | --ten-only] [--cold-only | --warm-only] [train flags...]

Flags the bench does not know (``--learning-rate 0.004``, ``--batch-size 24``...) go to both
``barkgpt train`` runs, after the preset. Prints one JSON line and appends a section to
bench/RESULTS.md (``write_results`` from bench/bench_train.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import OUT, REPO, SHARED, write_results  # noqa: E402

# the shakespeare-char preset's evaluation: its context and its 50 batches of 12 windows
EVAL_BLOCK_SIZE, EVAL_WINDOWS = 64, 50 * 12
POLL_S = 0.02


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target-only", action="store_true", help="only the time-to-target run(s)")
    p.add_argument("--ten-only", action="store_true", help="only the 10-minute run")
    p.add_argument("--cold-only", action="store_true", help="target run: no second run on warm caches (compile on)")
    p.add_argument("--warm-only", action="store_true", help="target run: one run on this machine's own caches (experiments)")
    p.add_argument("--target", type=float, default=1.886, help="val loss to reach (nats per character)")
    p.add_argument("--seconds", type=float, default=600, help="wall clock of the long run, from process start")
    p.add_argument("--target-preset", default="shakespeare-char-speedrun")
    p.add_argument("--ten-preset", default="shakespeare-char-10m")
    p.add_argument("--no-write", action="store_true", help="print the JSON line only (experiments)")
    a, train_flags = p.parse_known_args()

    data = prepared_data()
    summary = {"target_val_loss": a.target, "seconds_limit": a.seconds, "train_flags": train_flags}
    if not a.ten_only:
        caches = Path(tempfile.mkdtemp(prefix="speedrun-cache-"))
        cold_env = {"TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TORCH_EXTENSIONS_DIR": str(caches / "ext")}
        first = run(a.target_preset, data, train_flags, "target", a.target, 900, {} if a.warm_only else cold_env)
        first["caches"] = (
            "none: compile off" if not first["compile"] else "this machine's" if a.warm_only else "cold: fresh, empty"
        )
        summary["target"] = first
        if first["compile"] and not (a.warm_only or a.cold_only):  # again, on the caches the cold run filled
            summary["target_warm"] = run(a.target_preset, data, train_flags, "target", a.target, 900, cold_env)
            summary["target_warm"]["caches"] = "warm: filled by the cold run"
        shutil.rmtree(caches, ignore_errors=True)
    if not a.target_only:
        summary["ten_minutes"] = run(a.ten_preset, data, train_flags, "10m", None, a.seconds, {})
    print(json.dumps(summary), flush=True)
    if not a.no_write:
        write_results("speedrun: char-level tiny Shakespeare, time to val 1.886 and best val in 10 minutes (CPU)", summary)


def prepared_data() -> Path:
    """The char-level tiny Shakespeare folder (bench/out/shakespeare-char), prepared if missing
    (outside the timing, as nanoGPT's ``prepare.py`` runs before its ``train.py``)."""
    text = SHARED / "data" / "tinyshakespeare.txt"
    if not text.is_file():
        sys.exit(f"needs {text} (the shared/ folder beside the repo)")
    data = OUT / "shakespeare-char"
    if not (data / "meta.json").is_file():
        from barkgpt.data import prepare_dataset

        prepare_dataset(text, data, tokenizer="char")
    return data


def run(preset: str, data: Path, flags: list[str], name: str, target: float | None, limit_s: float, env: dict) -> dict:
    """Train ``preset`` on ``data`` as a subprocess and stamp its val rows from process start.

    Stops the run at the first val loss <= ``target`` (when given) or at ``limit_s`` seconds.

    Returns:
        ``{"preset", "seconds" (to the target; None if not reached), "step", "val_loss",
        "best_val_loss" (within ``limit_s``), "first_step_s" (process start to the first train
        row), "steps_per_s", "compile", "evals": [[step, seconds, val_loss], ...]}``.
    """
    out_dir = OUT / f"speedrun-{name}"
    shutil.rmtree(out_dir, ignore_errors=True)
    metrics = out_dir / "metrics.jsonl"
    cmd = [sys.executable, "-m", "barkgpt", "train", "--preset", preset, "--data", str(data), "--out-dir", str(out_dir), *flags]
    log = open(OUT / f"speedrun-{name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
    evals, seen, first_row, hit = [], 0, None, None
    while True:
        done = proc.poll() is not None  # read once more after the exit: the last rows
        now = time.perf_counter() - t0
        rows = read_metrics(metrics)
        for r in rows[seen:]:
            if first_row is None and "train_loss" in r:
                first_row = (r["step"], now)
            if "val_loss" in r:
                evals.append([r["step"], round(now, 2), r["val_loss"]])
                if hit is None and target is not None and r["val_loss"] <= target:
                    hit = evals[-1]
        seen = len(rows)
        if done or hit is not None or now > limit_s:
            break
        time.sleep(POLL_S)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()
    if proc.returncode not in (0, -9) and hit is None:
        sys.exit(f"{' '.join(cmd)} failed (exit {proc.returncode}); see {log.name}")
    cfg = check_windows(out_dir / "config.yaml")
    within = [e for e in evals if e[1] <= limit_s]
    best = min(within, key=lambda e: e[2]) if within else None
    last_step = first_row and rows and max(r["step"] for r in rows)
    return {
        "preset": preset,
        "seconds": hit[1] if hit else None,
        "step": (hit or best or [None])[0],
        "val_loss": hit[2] if hit else None,
        "best_val_loss": best[2] if best else None,
        "best_at_s": best[1] if best else None,
        "first_step_s": first_row[1] if first_row else None,
        "steps_per_s": round((last_step - first_row[0]) / (evals[-1][1] - first_row[1]), 2) if evals and first_row else None,
        "compile": cfg["train"]["compile"],
        "batch_size": cfg["train"]["batch_size"],
        "model": {k: cfg["model"][k] for k in ("n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size", "dropout")},
        "evals": evals,
    }


def read_metrics(path: Path) -> list[dict]:
    """The rows written so far (a torn last line and a missing file are skipped)."""
    from barkgpt.runlog import read_rows

    return read_rows(path, strict=False)


def check_windows(config_yaml: Path) -> dict:
    """The run's resolved config; exits unless its evals use the preset's val windows."""
    import yaml

    cfg = yaml.safe_load(config_yaml.read_text())
    block, windows = cfg["model"]["block_size"], cfg["train"]["eval_iters"] * cfg["train"]["batch_size"]
    if (block, windows) != (EVAL_BLOCK_SIZE, EVAL_WINDOWS):
        sys.exit(
            f"{config_yaml}: evals use {windows} windows of {block} tokens, not the shakespeare-char preset's "
            f"{EVAL_WINDOWS} of {EVAL_BLOCK_SIZE}; set --block-size 64 and --eval-iters 600/batch_size"
        )
    return cfg


if __name__ == "__main__":
    main()
