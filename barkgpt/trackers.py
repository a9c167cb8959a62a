"""Experiment trackers beside ``metrics.jsonl``: ``--log-to tensorboard`` and ``--log-to wandb``.

Each tracker gets the same rows the trainer appends to ``metrics.jsonl`` (:mod:`barkgpt.runlog`):
every numeric field but ``step`` becomes a scalar at that step, under ``train/`` (rows with a
``train_loss``) or ``val/`` (evaluation rows). They are optional extras (``pip install
'barkgpt[track]'``), imported only when asked for:

- TensorBoard: event files in ``out_dir/tensorboard``, written with
  ``torch.utils.tensorboard.SummaryWriter`` (which needs the ``tensorboard`` package); view them
  with ``tensorboard --logdir out_dir/tensorboard``.
- Weights & Biases: a run in ``out_dir/wandb``, offline unless ``WANDB_MODE`` says otherwise
  (``WANDB_MODE=online`` with a login uploads as it goes; an offline run uploads later with
  ``wandb sync out_dir/wandb/offline-run-*``). Offline needs no network and no account.
"""

from __future__ import annotations

import os
from pathlib import Path

from barkgpt.common import BarkError

TRACKERS = ("tensorboard", "wandb")


class Trackers:
    """The trackers of one run; :meth:`log` sends a ``metrics.jsonl`` row to each, :meth:`close`
    flushes them. With no tracker named, both do nothing.

    Args:
        names: tracker names from ``TrainConfig.log_to`` (``tensorboard``, ``wandb``).
        out_dir: the run folder (each tracker writes in a subfolder of it).
        config: the run's ``{"model": ..., "train": ...}`` dict, recorded with the run.

    Raises:
        BarkError: an unknown tracker, or one whose package is not installed (naming the extra).
    """

    def __init__(self, names: list[str], out_dir: str | Path, config: dict):
        self.sinks = []
        out_dir = Path(out_dir)
        for name in dict.fromkeys(names):  # once each, in order
            if name == "tensorboard":
                self.sinks.append(_TensorBoard(out_dir, config))
            elif name == "wandb":
                self.sinks.append(_WandB(out_dir, config))
            else:
                raise BarkError(f"--log-to {name!r} is not a tracker; use one of {', '.join(TRACKERS)}")

    def log(self, row: dict) -> None:
        """Send the numbers of one ``metrics.jsonl`` row (with its integer ``step``)."""
        if not self.sinks:
            return
        prefix = "train" if "train_loss" in row else "val"
        scalars = {
            f"{prefix}/{k}": float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for sink in self.sinks:
            sink.log(scalars, row["step"])

    def close(self) -> None:
        """Flush and close every tracker (safe to call twice)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _missing(name: str, package: str) -> BarkError:
    """The one-line error for a tracker whose package is missing."""
    return BarkError(f"--log-to {name} needs the {package} package; pip install 'barkgpt[track]' (or drop --log-to {name})")


class _TensorBoard:
    """TensorBoard event files in ``out_dir/tensorboard``."""

    def __init__(self, out_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {line}" for line in _yaml(config).splitlines()))

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """A Weights & Biases run in ``out_dir/wandb``, offline unless ``WANDB_MODE`` is set."""

    def __init__(self, out_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb") from None
        mode = os.environ.get("WANDB_MODE") or "offline"  # the user's setting wins; no network by default
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "barkgpt",
            name=out_dir.name,
            dir=str(out_dir),
            mode=mode,
            config=config,
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
        )

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


def _yaml(config: dict) -> str:
    """The config as YAML text (for TensorBoard's text tab)."""
    import yaml

    return yaml.safe_dump(config, sort_keys=False)
