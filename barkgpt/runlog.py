"""A run's log: ``metrics.jsonl`` (and ``samples.jsonl``) rows and the PNG plots drawn from them,
for ``train`` (which writes them) and the web page (which reads them while they are written).

A log file holds one JSON object a line, each with an integer ``step``, appended as the run goes
(JSON Lines, https://jsonlines.org). A kill while a line is being appended leaves that last line
torn; every reader here copes with it. The plots (``loss.png``, ``experts.png``) are redrawn
from the rows after each evaluation and written atomically.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from barkgpt.common import BarkError, atomic_write_text, atomic_write_via

METRICS_NAME = "metrics.jsonl"
SAMPLES_NAME = "samples.jsonl"


def parse_rows(text: str, name: str | Path = "rows", strict: bool = True) -> list[dict]:
    """The rows of a JSON-lines text: JSON objects with an integer ``step`` (blank lines skipped).

    Args:
        text: the file's content.
        name: the file, for messages.
        strict: the trainer's reading (on ``--resume``): a torn last line (a kill in the middle
            of writing it) is dropped with a warning on stderr, and a bad line before it is an
            error, since rows after it would be lost. Not strict (the web page, reading a file
            that may be being appended): every line that is not such a row is skipped, silently.

    Raises:
        BarkError: (strict only) a line before the last is not a JSON object with a ``step``,
            naming the file and the line.
    """
    numbered = [(i, line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(numbered):
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif not strict:
            continue
        elif k == len(numbered) - 1:
            print(f"warning: {name} line {i} is torn (a kill while it was written); dropped it", file=sys.stderr)
        else:
            raise BarkError(f"{name} line {i} is not a JSON row with a step; fix or delete that line")
    return rows


def _row(line: str) -> dict | None:
    """One line as a row (a JSON object with an integer ``step``), or None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def read_rows(path: Path, strict: bool = True) -> list[dict]:
    """The rows of the JSON-lines file ``path`` (:func:`parse_rows`; undecodable bytes replaced).

    Raises:
        BarkError: (strict) a bad line before the last one.
        OSError: (strict) the file cannot be read. Not strict, a missing or unreadable file has
            no rows.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        if strict:
            raise
        return []
    return parse_rows(text, path, strict)


def finite_or_none(row: dict) -> dict:
    """``row`` with non-finite floats (a diverged loss: NaN, inf) as None, which JSON can carry."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to a JSON-lines file as one line (created if missing)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file with ``rows``, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def truncate_for_resume(metrics_path: Path, samples_path: Path, step: int, redo_eval: bool) -> None:
    """Keep the ``metrics.jsonl`` and ``samples.jsonl`` rows a run resumed at ``step`` has already
    written: those before ``step``, and those at it unless ``redo_eval`` (the resumed run redoes
    that step's evaluation, so its val row and sample go). Missing files are left alone."""
    for path in (metrics_path, samples_path):
        if path.exists():
            rewrite_rows(
                path,
                [
                    r
                    for r in read_rows(path)
                    if r["step"] < step or r["step"] == step and not (redo_eval and (path == samples_path or "val_loss" in r))
                ],
            )


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png_path: Path) -> None:
    """Write a matplotlib figure to ``png_path`` atomically (a temporary file, then a rename), then close it."""
    plt = pyplot()
    fig.tight_layout()
    atomic_write_via(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def plot_losses(rows: list[dict], png_path: Path) -> None:
    """Draw train and val loss (nats per token) and the learning rate from ``metrics.jsonl`` rows
    into ``png_path`` (``loss.png``), titled with the run folder's name."""
    plt = pyplot()
    train = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    lr = [(r["step"], r["lr"]) for r in rows if "lr" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss", lw=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if lr:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lr), color="gray", alpha=0.4, lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    ax.set_title(f"{png_path.parent.name}")
    save_figure(fig, png_path)


def plot_experts(rows: list[dict], png_path: Path) -> None:
    """Draw each expert's share of the routed tokens over training (Mixture-of-Experts runs),
    from the ``expert_share`` lists of ``metrics.jsonl`` rows, into ``png_path``
    (``experts.png``); nothing for a dense run."""
    rows = [r for r in rows if "expert_share" in r]
    if not rows:
        return
    plt = pyplot()
    steps = [r["step"] for r in rows]
    n_expert = len(rows[0]["expert_share"])
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    for e in range(n_expert):
        ax.plot(steps, [r["expert_share"][e] for r in rows], lw=1, label=f"expert {e}")
    ax.axhline(1 / n_expert, color="gray", ls="--", lw=1, label="balanced")
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{png_path.parent.name}: expert load")
    save_figure(fig, png_path)


def plot_run(out_dir: Path) -> None:
    """Redraw ``loss.png`` and ``experts.png`` in ``out_dir`` from its ``metrics.jsonl``.

    Raises:
        BarkError: as :func:`read_rows` (strict).
    """
    rows = read_rows(Path(out_dir) / METRICS_NAME)
    plot_losses(rows, Path(out_dir) / "loss.png")
    plot_experts(rows, Path(out_dir) / "experts.png")
