"""Checkpoint folders: ``model.safetensors`` + ``config.json`` + tokenizer files (+ ``trainer_state.pt``).

A checkpoint is a directory, written to a temporary sibling and renamed into place
(``common.atomic_dir``), so a crash, Ctrl-C or SIGKILL during a save leaves the previous one
intact (or, for a kill between the two renames, at ``last.old/``, which :func:`recover_checkpoint`
restores). A run folder holds ``last/`` (the latest state, for ``--resume``) and ``best/`` (the
lowest validation loss, for sampling and export). ``last/`` also holds the trainer's state
(:class:`TrainState`: step, best val loss, sampler and RNG states, optimizer states) that
``--resume`` continues from exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from barkgpt.common import BarkError, atomic_dir, recover_dir
from barkgpt.config import GPTConfig
from barkgpt.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch and the model load in the functions that need them: the NumPy backend
    from barkgpt.model import GPT  # reads checkpoint folders with this module and never imports torch

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAINER_STATE_NAME = "trainer_state.pt"


def rng_state() -> dict:
    """The Python, NumPy (global, with its position in the key) and torch (CPU) RNG states, for
    exact resume; plain lists and numbers that ``torch.load(weights_only=True)`` reads."""
    import torch

    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy = {"key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    return {"python": random.getstate(), "numpy": numpy, "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured (after a ``torch.save``/``load`` round trip).
    An older run's NumPy state (the key alone) restarts at the key's end, as it was saved."""
    import torch

    random.setstate(_tuples(state["python"]))
    numpy = state["numpy"] if isinstance(state["numpy"], dict) else {"key": state["numpy"], "pos": 624}
    np.random.set_state(
        (
            "MT19937",
            np.array(numpy["key"], dtype=np.uint32),
            numpy["pos"],
            numpy.get("has_gauss", 0),
            numpy.get("cached_gaussian", 0.0),
        )
    )
    torch.set_rng_state(state["torch"])


def _tuples(x):
    """Lists back to tuples (what ``random.setstate`` wants after a round trip)."""
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x


@dataclasses.dataclass
class TrainState:
    """Where a training run stands between two steps: what ``--resume`` needs to go on exactly as
    if it had never stopped. :func:`save_checkpoint` writes its :meth:`to_dict` as
    ``last/trainer_state.pt``; :meth:`load` reads it back.

    The sampler and RNG states are taken at the start of a step, before its batch is drawn, so a
    run interrupted inside a step saves them with the old ``step`` and redoes that step.
    """

    step: int = 0  # optimizer updates done
    best_val_loss: float = float("inf")  # lowest val loss so far (nats per token); best/ holds that model
    tokens_seen: int = 0  # training tokens consumed, all ranks together
    elapsed_s: float = 0.0  # wall clock seconds of the run, across resumes
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)  # ties best/ to this run's last/
    eval_pending: bool = False  # interrupted in this step's evaluation: the resumed run redoes it
    last_eval_step: int | None = None  # the latest evaluation's step (None: none yet, evals on the eval_interval grid)
    world_size: int = 1  # processes that trained it (the batch stream depends on it)
    sampler: dict | None = None  # the batch sampler's ``np.random.Generator.bit_generator.state``
    rng: dict | None = None  # :func:`rng_state` (Python, NumPy, torch)
    optimizer: list | None = None  # one ``state_dict()`` per optimizer (full states under FSDP)

    def to_dict(self) -> dict:
        """The state as plain containers and tensors, what ``torch.load(weights_only=True)`` reads
        (shallow: the optimizer states' tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict, name: str = "trainer state") -> TrainState:
        """The state from :meth:`to_dict`'s dict; keys a run of an older version did not write
        take their defaults (a single optimizer's state becomes a one-item list).

        Args:
            d: the dict.
            name: what it was read from, for the error (``.../last/trainer_state.pt``).

        Raises:
            BarkError: not a dict with a ``step``, or keys this version does not know.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names) if isinstance(d, dict) else []
        if not isinstance(d, dict) or "step" not in d or unknown:
            problem = f"has unknown keys {', '.join(unknown)}" if unknown else "holds no step"
            raise BarkError(
                f"{name} {problem}: it was written by another barkgpt version (or is damaged) and "
                f"cannot be resumed; start a new run with another --out-dir"
            )
        d = dict(d)
        if d.get("optimizer") is not None and not isinstance(d["optimizer"], list):
            d["optimizer"] = [d["optimizer"]]
        if not d.get("run_id"):
            d.pop("run_id", None)
        return cls(**d)

    @classmethod
    def load(cls, path: str | Path) -> TrainState:
        """The state in checkpoint folder ``path`` (:func:`load_trainer_state`).

        Raises:
            BarkError: as :func:`load_trainer_state` and :meth:`from_dict`.
        """
        return cls.from_dict(load_trainer_state(path), str(Path(path) / TRAINER_STATE_NAME))


def save_checkpoint(
    path: str | Path,
    model: GPT,
    tokenizer: Tokenizer,
    info: dict | None = None,
    trainer_state: TrainState | dict | None = None,
    state: dict | None = None,
) -> Path:
    """Write a checkpoint folder atomically.

    Args:
        path: the folder to create or replace (e.g. ``runs/x/last``).
        model: the (uncompiled) model; tied ``lm_head.weight`` is stored once, as ``transformer.wte.weight``.
        tokenizer: saved beside the weights (``tokenizer.json``, ``tokenizer_config.json``).
        info: extra JSON-able facts for ``config.json`` (step, val_loss, tokens_seen, data...).
        trainer_state: the :class:`TrainState` (or a plain dict) for ``--resume``, written as
            ``trainer_state.pt``; None writes none (``best/``).
        state: the weights to write instead of ``model.state_dict()`` (FSDP's gathered full
            state: ``model`` then only supplies the config).

    Returns:
        The checkpoint folder.
    """
    import torch
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: v.detach().to("cpu").contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    with atomic_dir(path) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"model": dataclasses.asdict(model.config), **(info or {})}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        if trainer_state is not None:
            as_dict = trainer_state.to_dict() if isinstance(trainer_state, TrainState) else trainer_state
            torch.save(as_dict, tmp / TRAINER_STATE_NAME)
    return path


def recover_checkpoint(path: str | Path, repair: bool = False) -> Path | None:
    """The complete checkpoint folder for ``path``: ``path`` itself, or ``path.old`` when a kill
    fell between the two renames of a save (:func:`common.atomic_dir`); None when neither is complete.

    The one place that decides whether a checkpoint is there: ``--resume``, :func:`find_checkpoint`
    (``sample``, ``serve``, ``eval``, exports) and the web page's checkpoint list use it.

    Args:
        path: a checkpoint folder (``runs/x/last``).
        repair: rename ``path.old`` back to ``path`` (:func:`common.recover_dir`). Only the run's
            own trainer does (at ``--resume``): a reader that renamed while a trainer was between
            its two renames would make the trainer's second rename fail. Readers load ``path.old``
            as it is; so does a repair whose rename fails (a read-only folder).
    """
    path = Path(path)
    if repair:
        with contextlib.suppress(OSError):
            recover_dir(path)
    for candidate in (path, path.with_name(path.name + ".old")):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / CONFIG_NAME).is_file():
            return candidate
    return None


def find_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """The checkpoint folder to load for ``path``.

    ``path`` may be a checkpoint folder itself, or a run folder holding ``best/`` and/or
    ``last/`` (``prefer`` picks which comes first). A checkpoint caught between the two renames
    of its save is recovered (:func:`recover_checkpoint`).

    Raises:
        BarkError: nothing loadable is there.
    """
    path = Path(path)
    order = [prefer, "last" if prefer == "best" else "best"]
    for candidate in [path, *(path / name for name in order)]:
        found = recover_checkpoint(candidate)
        if found is not None:
            return found
    if not path.exists():
        raise BarkError(f"{path} does not exist; pass a run folder (e.g. runs/shakespeare-char) or a checkpoint folder")
    raise BarkError(
        f"no checkpoint in {path} (expected {WEIGHTS_NAME} and {CONFIG_NAME}, or best/ or last/); train one with barkgpt train"
    )


def read_checkpoint_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of a checkpoint folder.

    Raises:
        BarkError: missing or not valid JSON, or no ``model`` section.
    """
    path = Path(path) / CONFIG_NAME
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
        GPTConfig(**config["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BarkError(f"{path} is missing or corrupt ({type(e).__name__}); re-export or retrain the checkpoint") from None
    return config


def load_model(path: str | Path, device: str = "cpu", prefer: str = "best") -> tuple[GPT, dict]:
    """Build a :class:`GPT` from a checkpoint and load its weights.

    Returns:
        ``(model, config)``: the model on ``device`` in eval mode, and the ``config.json`` dict.

    Raises:
        BarkError: no checkpoint, or a corrupt/truncated ``model.safetensors`` or one whose
            tensors do not match the config.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from barkgpt.model import GPT

    ckpt = find_checkpoint(path, prefer)
    config = read_checkpoint_config(ckpt)
    model = GPT(GPTConfig(**config["model"]))
    try:
        state = load_file(str(ckpt / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise BarkError(
            f"{ckpt / WEIGHTS_NAME} is corrupt or truncated ({str(e).splitlines()[0][:80]}); use another checkpoint (last/ or best/) or retrain"
        ) from None
    expected = model.state_dict()
    for name, tensor in state.items():  # load_state_dict's size-mismatch error is a page long
        if name in expected and tensor.shape != expected[name].shape:
            raise BarkError(
                f"{ckpt / WEIGHTS_NAME} does not match its config.json: {name} is {tuple(tensor.shape)} in the "
                f"weights but {tuple(expected[name].shape)} for the config's model; the checkpoint is inconsistent, "
                f"fix config.json or use another checkpoint"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.config.tie_embeddings else set()
    if set(missing) - allowed_missing or unexpected:
        bad = sorted(set(missing) - allowed_missing) + sorted(unexpected)
        raise BarkError(
            f"{ckpt / WEIGHTS_NAME} does not match its config.json ({len(bad)} tensors differ, e.g. {bad[0]}); the checkpoint is inconsistent"
        )
    return model.to(device).eval(), config


def load_checkpoint(path: str | Path, device: str = "cpu", prefer: str = "best") -> tuple[GPT, Tokenizer, dict]:
    """Load model, tokenizer and ``config.json`` of a checkpoint (see :func:`load_model`).

    Raises:
        BarkError: as :func:`load_model`, or missing tokenizer files.
    """
    model, config = load_model(path, device, prefer)
    tokenizer = Tokenizer.load(find_checkpoint(path, prefer))
    return model, tokenizer, config


def load_trainer_state(path: str | Path) -> dict:
    """Read ``trainer_state.pt`` (optimizer, step, RNG states) with ``weights_only=True``, as the
    dict :meth:`TrainState.to_dict` wrote (:meth:`TrainState.load` makes it a ``TrainState``).

    Raises:
        BarkError: the file is missing or unreadable.
    """
    import torch

    file = Path(path) / TRAINER_STATE_NAME
    if not file.is_file():
        raise BarkError(
            f"{file} not found: --resume needs a checkpoint written by barkgpt train; to start a new run, use another --out-dir"
        )
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise BarkError(
            f"{file} is corrupt ({type(e).__name__}): this run cannot be resumed; start a new one with another --out-dir"
        ) from None
