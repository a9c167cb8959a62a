"""The training loop: data, AdamW, warmup + cosine schedule, evaluation, checkpoints, resume.

In nanoGPT's ``train.py`` spirit, with what it leaves to the user done here: exact resume
(optimizer, step, data sampler and RNG states in ``last/trainer_state.pt``), atomic
checkpoints, Ctrl-C that saves, a NaN guard, ``metrics.jsonl`` and a ``loss.png``.

What resume guarantees (on CPU, where the math is deterministic): after any number of SIGINTs
(Ctrl-C, the page's Stop) at any moments, or SIGKILLs, ``--resume`` logs the same losses, step
for step, as the run that was never stopped. Each step is a transaction: the sampler and RNG
states are taken before its batch is drawn, and an interrupt before its update is saved with
those states and the old step (the step is redone); the update itself (optimizer steps,
``zero_grad``, the step count and its log line) holds a SIGINT until it is done
(:class:`DeferredSigint`). An interrupt during an evaluation saves ``last/`` marked
``eval_pending`` and the resumed run evaluates that step again. An evaluation writes, in order:
its ``metrics.jsonl`` line, its sample, ``best/`` (when better), ``last/``; so a kill at any
point leaves ``best/`` holding the model whose val loss ``last/`` records as the best (or a
better one, which resume then takes as the best).

One loop serves pretraining and fine-tuning: it reads batches from a *batch source*, either
``data.TokenWindows`` (random windows of a token file) or ``conversations.ChatRows`` (packed
conversations whose targets are ``IGNORE_INDEX`` off the assistant's tokens, with segment ids
that :class:`SegmentMask` turns into per-conversation attention). :func:`finetune` is that loop
started from a checkpoint on chat data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from barkgpt import cpu_attention
from barkgpt.checkpoint import (CONFIG_NAME, find_checkpoint, load_model, load_trainer_state, read_checkpoint_config,
                                recover_checkpoint, save_checkpoint)
from barkgpt.common import (BarkError, atomic_write_text, atomic_write_via, bits_per_byte, compile_fn, peak_flops, progress,
                            remove_leftovers, resolve_device, resolve_dtype, token_nll_and_bytes)
from barkgpt.config import GPTConfig, TrainConfig, config_to_dict, dump_yaml
from barkgpt.conversations import (IGNORE_INDEX, ChatRows, bark_chat_rows, file_sha256, load_conversations,
                                   split_conversations)
from barkgpt.data import TokenWindows, prepare_bark, prepare_dataset
from barkgpt.distributed import all_reduce_mean, full_model_state, setup, teardown, wrap_model
from barkgpt.engine import Engine
from barkgpt.model import GPT
from barkgpt.optim import build_optimizers
from barkgpt.tokenizer import Tokenizer

# Fine-tuning starts from a trained model on a small chat set: fewer, gentler steps than
# TrainConfig's pretraining defaults (flags and --config still override each one).
FINETUNE_DEFAULTS = {"max_iters": 300, "learning_rate": 3e-4, "min_lr": 3e-5, "warmup_iters": 30,
                     "eval_interval": 50, "eval_iters": 20, "log_interval": 5, "batch_size": 8}


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Learning rate at step ``it``: linear warmup to ``learning_rate`` over ``warmup_iters``,
    cosine decay to ``min_lr`` at ``lr_decay_iters``, then ``min_lr`` (SGDR, Loshchilov & Hutter
    2016; nanoGPT's ``get_lr``)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def resolve_data(cfg: TrainConfig) -> Path:
    """The prepared data folder for ``cfg.data``, preparing it into ``out_dir/data`` if needed.

    Raises:
        BarkError: no ``--data`` given, or a path that does not exist.
    """
    if cfg.data is None:
        raise BarkError("no training data: pass --data DIR (from barkgpt prepare), a .txt/.jsonl file, or use --preset bark")
    target = Path(cfg.out_dir) / "data"
    if cfg.data == "bark":
        if not (target / "meta.json").is_file():
            prepare_bark(target)
        return target
    src = Path(cfg.data)
    if (src / "meta.json").is_file():
        return src
    if not src.exists():
        raise BarkError(f"--data {src} does not exist; prepare data with barkgpt prepare --input FILE --out DIR")
    if not (target / "meta.json").is_file():
        prepare_dataset(src, target, tokenizer=cfg.tokenizer, vocab_size=cfg.tokenizer_vocab_size)
    return target


def open_source(cfg: TrainConfig):
    """The batch source for ``cfg.data``: the generated Bark chat set for ``bark-chat``, else the
    prepared token files (:func:`resolve_data`).

    Raises:
        BarkError: as :func:`resolve_data`.
    """
    if cfg.data == "bark-chat":
        return bark_chat_rows(seed=cfg.seed)
    return TokenWindows(resolve_data(cfg))


class SegmentMask:
    """Attention within segments only, for rows packed with several conversations.

    Passed to ``GPT.forward`` as its ``kv_cache`` argument, whose interface (``positions``,
    ``attn_mask``, ``update``, ``advance``) lets a caller give each row its own positions and an
    attention mask; this one caches nothing. Each token attends causally to the tokens of its own
    segment, and positions restart at 0 where a segment starts, so a packed row computes exactly
    what its conversations would one by one (the "packing without cross-contamination" of
    Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination").

    Args:
        segments: (B, T) int64 segment ids, constant over each contiguous run.
    """

    def __init__(self, segments: torch.Tensor):
        B, T = segments.size()
        t = torch.arange(T, device=segments.device)
        starts = torch.ones_like(segments, dtype=torch.bool)  # (B, T) True where a segment begins
        starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
        first = torch.where(starts, t, 0).cummax(dim=1).values  # (B, T) index of each segment's first token
        self.pos = t - first  # (B, T) position within the segment
        same = segments.unsqueeze(2) == segments.unsqueeze(1)  # (B, T, T) query and key in one segment
        causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
        self.mask = (same & causal).unsqueeze(1)  # (B, 1, T, T), True where attention is allowed

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the tokens: counted from each one's segment start."""
        return self.pos

    def attn_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, T) bool: causal attention within the segment."""
        return self.mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values pass through: nothing is cached."""
        return k, v

    def advance(self, T: int) -> None:
        """Nothing to count."""


def model_loss(model: GPT, batch: tuple) -> torch.Tensor:
    """Mean cross-entropy of a batch ``(x, y)`` or ``(x, y, segments)`` of (B, T) tensors,
    over the targets that are not ``IGNORE_INDEX`` (segments: see :class:`SegmentMask`)."""
    x, y, *rest = batch
    return model(x, y, SegmentMask(rest[0]) if rest else None)[1]


@torch.no_grad()
def estimate_loss(model: GPT, source, cfg: TrainConfig, block_size: int, device: str, autocast,
                  token_bytes: np.ndarray) -> dict:
    """Loss and bits per byte over ``source.eval_batches`` of each split (``eval_iters`` batches
    of ``batch_size``; evenly spaced, the same every time: see ``TokenWindows.eval_batches``).

    The loss is per target token, ``<EOS>`` included; bits per byte follows the one definition in
    :func:`common.token_nll_and_bytes` (tokens that stand for no bytes, such as ``<EOS>``, count
    neither loss nor bytes), the same as ``barkgpt eval``'s.

    Returns:
        ``{"train": float, "val": float, "train_bpb": float, "val_bpb": float}``, losses in nats
        per target token.
    """
    model.eval()
    out = {}
    byte_counts = torch.as_tensor(token_bytes, dtype=torch.int64, device=device)
    for split in ("train", "val"):
        nll, n_targets, nll_bytes, n_bytes = 0.0, 0, 0.0, 0
        for batch in source.eval_batches(split, cfg.eval_iters, cfg.batch_size, block_size):
            x, y, *rest = to_device(batch, device)
            with autocast:
                logits, _ = model(x, y, SegmentMask(rest[0]) if rest else None)
            sums = token_nll_and_bytes(logits, y, byte_counts)
            nll, n_targets = nll + sums["nll"], n_targets + sums["targets"]
            nll_bytes, n_bytes = nll_bytes + sums["nll_bytes"], n_bytes + sums["bytes"]
        out[split] = nll / max(n_targets, 1)
        out[f"{split}_bpb"] = bits_per_byte(nll_bytes, n_bytes)
    model.train()
    return out


def to_device(batch: tuple, device: str) -> tuple:
    """Numpy int64 arrays -> torch tensors on ``device`` (pinned, non-blocking on CUDA)."""
    tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in batch)
    if device.startswith("cuda"):
        return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)
    return tuple(t.to(device) for t in tensors)


@torch.no_grad()
def resize_vocab(model: GPT, vocab_size: int) -> GPT:
    """A copy of ``model`` with ``vocab_size`` token embeddings (and output rows), for added tokens.

    Existing rows keep their weights; each new row starts at the mean of the existing rows
    (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"), so the new
    tokens start out as an average token rather than as noise that the first updates must undo.

    Raises:
        BarkError: ``vocab_size`` is smaller than the model's (that would drop tokens).
    """
    old = model.config.vocab_size
    if vocab_size < old:
        raise BarkError(f"cannot shrink the vocabulary from {old} to {vocab_size} tokens")
    device = model.transformer.wte.weight.device
    bigger = GPT(dataclasses.replace(model.config, vocab_size=vocab_size)).to(device)
    state = model.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        w = state[name]  # (old, n_embd)
        state[name] = torch.cat([w, w.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)])
    bigger.load_state_dict(state)
    return bigger.train(model.training)


def save_figure(fig, png_path: Path) -> None:
    """Write a matplotlib figure to ``png_path`` atomically (a temporary file, then a rename), then close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write_via(png_path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(metrics_path: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl`` (blank lines skipped).

    A torn last line (a kill in the middle of writing it) is dropped with a warning on stderr.

    Raises:
        BarkError: a line before the last is not a JSON object with a ``step``, naming the file
            and the line.
    """
    lines = metrics_path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    rows = []
    for k, (i, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError:
            if k == len(numbered) - 1:
                print(f"warning: {metrics_path} line {i} is torn (a kill while it was written); dropped it", file=sys.stderr)
                break
            raise BarkError(f"{metrics_path} line {i} is not a JSON row with a step; fix or delete that line") from None
        rows.append(row)
    return rows


def rewrite_rows(path: Path, rows: list[dict]) -> None:
    """Replace a JSON-lines file with ``rows``, atomically."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot_losses(rows: list[dict], png_path: Path) -> None:
    """Draw train and val loss (and learning rate) from ``metrics.jsonl`` rows into ``loss.png``
    (titled with the run folder's name)."""
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
    from the ``expert_share`` entries of ``metrics.jsonl`` rows, into ``experts.png``."""
    plt = pyplot()
    rows = [r for r in rows if "expert_share" in r]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    shares = np.array([r["expert_share"] for r in rows])  # (n_logs, n_expert)
    fig, ax = plt.subplots(figsize=(8, 3.5), dpi=100)
    for e in range(shares.shape[1]):
        ax.plot(steps, shares[:, e], lw=1, label=f"expert {e}")
    ax.axhline(1 / shares.shape[1], color="gray", ls="--", lw=1, label="balanced")
    ax.set_xlabel("step")
    ax.set_ylabel("share of routed tokens")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"{png_path.parent.name}: expert load")
    save_figure(fig, png_path)


def expert_share(model: GPT) -> list[float] | None:
    """Each expert's share of the token assignments in the last forward, over all layers; None
    for a dense model."""
    if not model.config.n_expert:
        return None
    counts = sum(b.mlp.expert_tokens.float() for b in model.transformer.h)
    return [round(x, 4) for x in (counts / counts.sum()).tolist()]


def rng_state() -> dict:
    """Python, NumPy (global) and torch RNG states, for exact resume."""
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].tolist(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), 624, 0, 0.0))
    torch.set_rng_state(state["torch"])


def _tuples(x):
    """Lists back to tuples (what ``random.setstate`` wants after a round trip)."""
    return tuple(_tuples(i) for i in x) if isinstance(x, (list, tuple)) else x


class DeferredSigint:
    """SIGINT as ``KeyboardInterrupt``, except inside :meth:`critical`, which holds it until the
    section is done and raises it then: an update that must not be cut in half (the optimizer
    steps of every optimizer, ``zero_grad``, the step count) finishes first.

    Used as a context manager around training: it installs its handler on entry and puts the
    previous one back on exit. Off the main thread (where Python cannot set signal handlers)
    it does nothing and SIGINT keeps its usual behaviour. :attr:`hold` set True holds every
    SIGINT from then on (used while the interrupted run saves ``last/``).
    """

    def __init__(self):
        self.hold = False  # True: SIGINT only sets `pending`
        self.pending = False  # a SIGINT arrived while held
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False

    def _handle(self, signum, frame):
        if self.hold:
            self.pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def critical(self):
        """Hold SIGINT inside the ``with`` block; a held one is raised when the block ends."""
        self.hold = True
        try:
            yield
        finally:
            self.hold = False
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt


SIGNAL_HOOK_POINTS = ("forward", "update", "eval", "best_saved", "last_saved")


def signal_hook_from_env() -> Callable[[str, int], None] | None:
    """Test-only: ``BARKGPT_TEST_SIGNAL=NAME@point@step`` (e.g. ``INT@update@7``, ``KILL@best_saved@10``)
    makes training send itself signal ``SIGNAME`` the first time it reaches ``point`` at
    ``step``, so tests can stop a real process at an exact moment. Points: ``forward`` (the batch
    is drawn), ``update`` (after the first optimizer's step, before the rest of the update),
    ``eval`` (an evaluation's losses are computed), ``best_saved``, ``last_saved`` (in an
    evaluation). Unset (always, outside tests): None.

    Raises:
        BarkError: the variable is set but malformed.
    """
    spec = os.environ.get("BARKGPT_TEST_SIGNAL")
    if not spec:
        return None
    parts = spec.split("@")
    if len(parts) != 3 or not hasattr(signal, f"SIG{parts[0]}") or parts[1] not in SIGNAL_HOOK_POINTS or not parts[2].isdigit():
        raise BarkError(f"BARKGPT_TEST_SIGNAL={spec!r} is not NAME@point@step with a point in {SIGNAL_HOOK_POINTS}; unset it")
    signum, point, at = getattr(signal, f"SIG{parts[0]}"), parts[1], int(parts[2])
    fired = []

    def hook(where: str, step: int) -> None:
        if where == point and step == at and not fired:
            fired.append(True)
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # SIGKILL lands here; a SIGINT's handler runs at the next bytecode
    return hook


def train(model_cfg: GPTConfig, cfg: TrainConfig, resume: bool = False, quiet: bool = False, source=None) -> dict:
    """Train a model and write checkpoints, metrics and plots to ``cfg.out_dir``.

    A run started from a checkpoint (``cfg.init_from``) is evaluated once before its first step,
    so ``metrics.jsonl`` holds the loss before fine-tuning at step 0; if the data's tokenizer has
    more tokens than the checkpoint, the embeddings grow first (:func:`resize_vocab`).

    Args:
        model_cfg: the model shape (``vocab_size`` None takes the tokenizer's).
        cfg: the run settings.
        resume: continue from ``out_dir/last`` (optimizer, step, sampler and RNG states).
        quiet: no progress bar or start banner.
        source: the batch source (``TokenWindows``, ``ChatRows``, or anything with their
            ``tokenizer``, ``meta``, ``check``, ``batch``, ``eval_batches`` and ``describe``);
            None opens ``cfg.data`` with :func:`open_source`.

    Returns:
        Summary dict: ``step``, ``train_loss``, ``val_loss``, ``best_val_loss``, ``tokens_per_s``
        (over training steps only), ``mfu`` (model FLOPs utilization, ``flops_per_token`` x
        tokens/s over the GPUs' peak bf16 FLOP/s; None off known CUDA GPUs; also in each
        ``metrics.jsonl`` log line), ``train_seconds`` (time in training steps), ``elapsed_s``
        (wall clock of the whole run, across resumes), ``interrupted``.

    Under torchrun (``WORLD_SIZE`` > 1; see :mod:`barkgpt.distributed`) every rank runs this:
    each takes its own slice of every global batch of ``batch_size * world_size`` rows (one
    sampler, seeded alike on every rank), gradients are averaged by DDP (or FSDP2 with
    ``cfg.fsdp``), logged losses are averaged across ranks, and rank 0 alone writes files.

    Raises:
        BarkError: bad data, a model that does not match the checkpoint on resume, a resume with
            another world size, a NaN loss (the last good checkpoint is kept).
    """
    ctx = setup(resolve_device(cfg.device), cfg.fsdp)
    try:
        result = _train(model_cfg, cfg, ctx, resume, quiet or not ctx.is_main, source)
    except BaseException:
        teardown(ctx, wait=False)
        raise
    teardown(ctx)
    return result


def _train(model_cfg: GPTConfig, cfg: TrainConfig, ctx, resume: bool, quiet: bool, source) -> dict:
    """:func:`train`'s body, on one rank (``ctx``: :class:`barkgpt.distributed.DistContext`)."""
    out_dir = Path(cfg.out_dir)
    device = ctx.device
    dtype = resolve_dtype(cfg.dtype, device)
    source = source if source is not None else open_source(cfg)
    tokenizer, meta = source.tokenizer, source.meta

    # ---- the model: fresh, from a checkpoint (fine-tuning), or resumed
    state = None
    if resume:
        last = out_dir / "last"
        ckpt = recover_checkpoint(last, repair=True)  # also restores last/ from a kill between a save's two renames
        if ckpt is None:
            raise no_checkpoint_error(out_dir)
        model, saved = load_model(ckpt, device)
        saved_cfg = GPTConfig(**saved["model"])
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=saved_cfg.vocab_size)
        if dataclasses.asdict(saved_cfg) != dataclasses.asdict(model_cfg):
            diff = [k for k, v in dataclasses.asdict(model_cfg).items() if dataclasses.asdict(saved_cfg)[k] != v]
            raise BarkError(f"--resume: the checkpoint in {last} has a different model ({', '.join(f'{k}={dataclasses.asdict(saved_cfg)[k]}' for k in diff)}); use the same model flags or a new --out-dir")
        state = load_trainer_state(ckpt)
    elif cfg.init_from != "scratch":
        model, saved = load_model(cfg.init_from, device)
        if model.config.vocab_size < tokenizer.vocab_size:  # fine-tuning added tokens (chat roles)
            model = resize_vocab(model, tokenizer.vocab_size)
        model_cfg = model.config
    else:
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).to(device)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise BarkError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; drop --vocab-size to use the tokenizer's")
    block_size = model_cfg.block_size
    source.check(block_size)
    model.train()

    raw_model = model
    model = wrapped = wrap_model(model, ctx)  # DDP, or FSDP2 sharding raw_model in place
    optimizers = build_optimizers(raw_model, cfg, device)
    rng = np.random.default_rng(cfg.seed)  # the batch sampler: its state is the data position
    step, best_val, tokens_seen = 0, float("inf"), 0
    run_id = uuid.uuid4().hex  # ties best/ to the run whose last/ records its val loss
    if state is not None:
        saved_world = state.get("world_size", 1)
        if saved_world != ctx.world_size:
            raise BarkError(f"--resume: {out_dir / 'last'} was written by {saved_world} process(es) and this run has "
                            f"{ctx.world_size}; resume with --nproc {saved_world} (the batch stream depends on it)")
        saved_opt = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
        if len(saved_opt) != len(optimizers):
            raise BarkError(f"--resume: {out_dir / 'last'} was trained with another --optimizer; resume with the same one")
        for opt, opt_state in zip(optimizers, saved_opt):
            if ctx.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(opt_state)
        rng.bit_generator.state = state["sampler"]
        set_rng_state(state["rng"])
        step, best_val, tokens_seen = state["step"], state["best_val_loss"], state["tokens_seen"]
        run_id = state.get("run_id") or run_id
        best_val = min(best_val, recorded_best(out_dir / "best", run_id))  # a kill between writing best/ and last/
    else:
        torch.manual_seed(cfg.seed + 1)  # dropout stream, independent of the init
    eval_pending = bool(state and state.get("eval_pending"))  # interrupted in this step's evaluation: redo it

    # ---- clean up after kills, write the resolved config before step 0 (rank 0 writes every file)
    metrics_path, samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out_dir, ["last", "best", "config.yaml", "metrics.jsonl", "samples.jsonl", "loss.png", "experts.png"])
        atomic_write_text(out_dir / "config.yaml", dump_yaml(config_to_dict(model_cfg, cfg)))
        if state is not None:  # drop rows from after the resumed step (and of the evaluation to redo)
            for path in (metrics_path, samples_path):
                if path.exists():
                    rewrite_rows(path, [r for r in read_metrics(path) if r["step"] < step or r["step"] == step and not (
                        eval_pending and (path == samples_path or "val_loss" in r))])
        else:
            atomic_write_text(metrics_path, "")
            samples_path.unlink(missing_ok=True)

    if device == "cpu":
        if cfg.compile:  # like the compile, a one-time build (~15 s) for faster steps
            cpu_attention.load(quiet=quiet)  # the short-context attention kernel
        torch.set_flush_denormal(True)  # denormal floats in grads/optimizer state are ~100x slower on x86 (reset on return)
    if cfg.compile:
        model = compile_fn(model, device)
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * block_size * ctx.world_size
    if not quiet:
        ranks = f" x {ctx.world_size} ranks ({'FSDP' if ctx.fsdp else 'DDP'})" if ctx.enabled else ""
        print(f"model: {model_cfg.family}, {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{raw_model.flops_per_token() / 1e6:.1f} MFLOPs/token, head_dim {model_cfg.head_dim}; "
              f"{tokens_per_iter:,} tokens/iteration; device {device}{ranks}, dtype {dtype}, optimizer {cfg.optimizer}; "
              f"data {source.describe(block_size)}")

    info = {"data": {k: meta.get(k) for k in ("source", "source_sha256", "tokenizer", "train_tokens", "val_tokens", "val_fraction")},
            "run_id": run_id}
    token_bytes = np.asarray(tokenizer.token_bytes(), dtype=np.int64)
    hook = signal_hook_from_env() or (lambda point, step: None)
    # the states at the start of the step in progress (None between steps): an interrupt before
    # the update saves these with the old step, so the resumed run draws the same batch again
    snap = None
    last_is_current = state is not None  # last/ holds exactly the present state (nothing to save on Ctrl-C)

    def checkpoint(name: str, last_loss: dict | None = None):
        """Save ``name`` (last/ or best/) from rank 0; under FSDP every rank joins the gather."""
        extra = {**info, "step": step, "tokens_seen": tokens_seen, **({"val_loss": last_loss["val"]} if last_loss else {})}
        full = full_model_state(model, ctx) if ctx.fsdp else None  # a gather: every rank takes part
        opt_states = None
        if name == "last":
            if ctx.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

                opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
                opt_states = [get_optimizer_state_dict(model, o, options=opts) for o in optimizers]
            else:
                opt_states = [o.state_dict() for o in optimizers]
        if not ctx.is_main:
            return
        trainer_state = None
        if name == "last":
            sampler, rngs = snap if snap is not None else (rng.bit_generator.state, rng_state())
            trainer_state = {"optimizer": opt_states, "sampler": sampler, "rng": rngs, "step": step,
                             "best_val_loss": best_val, "tokens_seen": tokens_seen, "elapsed_s": elapsed,
                             "world_size": ctx.world_size, "run_id": run_id, "eval_pending": eval_pending}
        save_checkpoint(out_dir / name, raw_model, tokenizer, extra, trainer_state, state=full)

    def log(row: dict):
        if not ctx.is_main:
            return
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate():
        """Evaluate, then write (in this order, see the module docstring) the val row, the sample,
        best/ and last/, and the plots."""
        nonlocal best_val, eval_pending, last_is_current
        eval_pending = True  # until last/ holds this evaluation's outcome
        # eager model: a compiled one would recompile for eval mode and no_grad, for ~20 forwards
        losses = estimate_loss(raw_model, source, cfg, block_size, device, autocast, token_bytes)
        hook("eval", step)
        log({"step": step, "val_loss": round(losses["val"], 5), "val_perplexity": round(math.exp(min(losses["val"], 50)), 4),
             "val_bpb": round(losses["val_bpb"], 5), "eval_train_loss": round(losses["train"], 5), "elapsed_s": round(elapsed, 3)})
        write_sample()
        if losses["val"] < best_val:
            checkpoint("best", losses)  # before last/ records it as the best
            hook("best_saved", step)
            best_val = losses["val"]
        eval_pending = False
        checkpoint("last", losses)
        last_is_current = True
        hook("last_saved", step)
        if ctx.is_main:
            rows = read_metrics(metrics_path)
            plot_losses(rows, out_dir / "loss.png")
            plot_experts(rows, out_dir / "experts.png")
        return losses

    def write_sample():
        ids = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else [tokenizer.eos_id]
        ids = ids[-block_size:]
        toks = [s[0] for s in Engine(raw_model).generate(ids, max_new_tokens=min(64, block_size), temperature=0.8, top_k=50,
                                                          seed=step, stop_ids=[tokenizer.eos_id])]  # one document or reply
        raw_model.train()
        text = tokenizer.decode([t for t in toks if t is not None and t != tokenizer.eos_id])
        if not ctx.is_main:  # every rank samples (an FSDP forward needs them all); rank 0 writes
            return
        with open(samples_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": cfg.sample_prompt, "text": text}) + "\n")

    def forward_backward(m, batches):
        """Accumulate gradients over the micro-batches; returns the last micro-batch's loss.

        Across ranks, gradients are synchronized on the last micro-batch only (DDP's ``no_sync``,
        FSDP2's ``set_requires_gradient_sync``)."""
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if ctx.fsdp:
                raw_model.set_requires_gradient_sync(last)
            with wrapped.no_sync() if ctx.enabled and not ctx.fsdp and not last else contextlib.nullcontext():
                with autocast:
                    loss = model_loss(m, batch)
                scaler.scale(loss / len(batches)).backward()
        return loss

    flops_per_token, peak = raw_model.flops_per_token(), peak_flops(device)
    # every rank draws the whole global batch (one data stream for any world size) and reads its rows
    rank_rows = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size) if ctx.enabled else slice(None)

    def mfu(tokens_per_s: float) -> float | None:
        """Model FLOPs utilization of all ranks together; None off known GPUs."""
        return flops_per_token * tokens_per_s / (peak * ctx.world_size) if peak else None
    t_start = time.perf_counter()
    elapsed0 = state.get("elapsed_s", 0.0) if state else 0.0  # wall clock of the runs before a resume
    elapsed = elapsed0
    losses, interrupted, last_loss = None, False, float("nan")
    bar = progress(total=cfg.max_iters, desc="train", unit="step", initial=step) if not quiet else None
    t_log, tok_log = time.perf_counter(), 0
    loop_s, step0 = 0.0, step  # time in training steps only (no eval, checkpoints or plots)
    with DeferredSigint() as sigint:
        try:
            if (cfg.init_from != "scratch" and state is None) or eval_pending:  # the starting point, or a redo
                losses = evaluate()
                t_log = time.perf_counter()
            while step < cfg.max_iters:
                snap = (rng.bit_generator.state, rng_state())  # before the batch is drawn
                t_step = time.perf_counter()
                lr = get_lr(step, cfg)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = lr * group.get("lr_scale", 1.0)
                batches = [to_device(source.batch("train", cfg.batch_size * ctx.world_size, block_size, rng, rank_rows), device)
                           for _ in range(cfg.gradient_accumulation_steps)]
                hook("forward", step)
                try:
                    loss = forward_backward(model, batches)
                except Exception as e:  # noqa: BLE001 - a failed compile falls back to eager, once
                    if model is wrapped or step > step0:
                        raise
                    print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training without compile")
                    model = wrapped
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    loss = forward_backward(model, batches)
                last_loss = all_reduce_mean(loss.item(), ctx)
                if not math.isfinite(last_loss):
                    raise BarkError(f"the loss became {last_loss} at step {step}; the last good checkpoint in {out_dir / 'last'} is kept. Lower --learning-rate or set --grad-clip 1.0")
                with sigint.critical():  # the update: all of it, or (before it) none of it
                    if cfg.grad_clip > 0:
                        for opt in optimizers:
                            scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip, foreach=True)
                    for i, opt in enumerate(optimizers):
                        scaler.step(opt)
                        if i == 0:
                            hook("update", step)
                    scaler.update()
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                    step += 1
                    snap, last_is_current = None, False
                    eval_pending = step % cfg.eval_interval == 0 or step == cfg.max_iters  # this step's eval is owed
                    loop_s += time.perf_counter() - t_step
                    tokens_seen += tokens_per_iter
                    tok_log += tokens_per_iter
                    if step % cfg.log_interval == 0 or step == cfg.max_iters:
                        now = time.perf_counter()
                        tps = tok_log / max(now - t_log, 1e-9)
                        elapsed = elapsed0 + now - t_start
                        share = expert_share(raw_model)
                        log({"step": step, "train_loss": round(last_loss, 5), "lr": lr, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3),
                             **({"mfu": round(mfu(tps), 4)} if peak else {}), **({"expert_share": share} if share else {})})
                        t_log, tok_log = now, 0
                        if bar is not None:
                            bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                if bar is not None:
                    bar.update(1)
                if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                    elapsed = elapsed0 + time.perf_counter() - t_start
                    losses = evaluate()
                    if bar is not None:
                        bar.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} (perplexity {math.exp(losses['val']):.2f})")
                    t_log, tok_log = time.perf_counter(), 0  # keep eval time out of tokens/s
        except KeyboardInterrupt:
            sigint.hold = True  # the save below finishes even if Ctrl-C comes again
            interrupted = True
            elapsed = elapsed0 + time.perf_counter() - t_start
            if not last_is_current:
                checkpoint("last")
            if not quiet:
                redo = "; its evaluation is redone first" if eval_pending else ""
                print(f"\ninterrupted: saved {out_dir / 'last'} at step {step}{redo}; continue with --resume")
        finally:
            sigint.hold = True  # a Ctrl-C from here on finds nothing left to stop
            if bar is not None:
                bar.close()
            torch.set_flush_denormal(False)  # process-wide state: back to the default for the caller
    total = elapsed0 + time.perf_counter() - t_start
    tps = (step - step0) * tokens_per_iter / max(loop_s, 1e-9)
    return {"step": step, "train_loss": last_loss, "val_loss": losses["val"] if losses else None,
            "best_val_loss": best_val, "tokens_per_s": tps, "mfu": mfu(tps),
            "train_seconds": loop_s, "elapsed_s": total, "interrupted": interrupted}


def no_checkpoint_error(out_dir: Path) -> BarkError:
    """The error for ``--resume`` without a ``last/`` checkpoint, whose advice never wipes a run:
    when ``out_dir`` holds a run's files, training there without ``--resume`` would replace them."""
    last = out_dir / "last"
    kept = [name for name in ("best", "metrics.jsonl", "samples.jsonl") if (out_dir / name).exists()]
    if kept:
        return BarkError(f"--resume found no checkpoint in {last}, but {out_dir} holds a run ({', '.join(kept)}) that "
                         f"cannot be resumed; keep it and train into a new --out-dir (--init-from {out_dir / 'best'} "
                         f"starts from its best model), or delete {out_dir} to start over there")
    return BarkError(f"--resume found no checkpoint in {last}; drop --resume to start a new run in {out_dir}")


def recorded_best(best: Path, run_id: str) -> float:
    """The val loss in ``best/config.json`` when ``best/`` belongs to run ``run_id``, else inf.

    A kill after ``best/`` is written but before ``last/`` records its val loss leaves ``best/``
    better than the recorded best; resume takes the lower of the two so that ``best/`` is only
    ever replaced by a better model.
    """
    found = recover_checkpoint(best)
    if found is None:
        return float("inf")
    try:
        config = json.loads((found / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return float("inf")
    val = config.get("val_loss") if isinstance(config, dict) and config.get("run_id") == run_id else None
    return float(val) if isinstance(val, (int, float)) and math.isfinite(val) else float("inf")


def finetune(model_path: str | Path, data: str | Path, cfg: TrainConfig, val_fraction: float = 0.1,
             group_field: str = "tree_id", resume: bool = False, quiet: bool = False) -> dict:
    """Fine-tune a trained model on conversations (supervised fine-tuning on assistant turns).

    Loads the conversations (:func:`conversations.load_conversations`), splits them by
    ``group_field`` (:func:`conversations.split_conversations`, seeded by ``cfg.seed``), gives
    the model's tokenizer the chat role tokens if it lacks them (``Tokenizer.with_chat_tokens``;
    the embeddings grow to match), and runs :func:`train` from the checkpoint over packed rows
    whose loss counts only assistant tokens. Checkpoints, resume, ``metrics.jsonl`` (step 0 holds
    the loss before fine-tuning) and ``loss.png`` are as ``train``'s; the saved tokenizer carries
    the chat template that ``chat``, ``serve`` and the exports use.

    Args:
        model_path: a run or checkpoint folder (``best/`` is preferred in a run folder).
        data: a ``.jsonl`` of OpenAI ``messages`` or ShareGPT ``conversations`` rows.
        cfg: run settings (``init_from`` and ``data`` are set from the two paths above).
        val_fraction: share of the groups held out for validation, in (0, 0.5].
        group_field: the row field that groups conversations (rows without it stand alone).
        resume: continue from ``cfg.out_dir/last``.
        quiet: no progress bar or banner.

    Returns:
        :func:`train`'s summary dict.

    Raises:
        BarkError: no checkpoint at ``model_path``, bad chat data, or anything ``train`` raises.
    """
    ckpt = find_checkpoint(model_path)
    base = GPTConfig(**read_checkpoint_config(ckpt)["model"])
    tokenizer, added = Tokenizer.load(ckpt).with_chat_tokens()
    train_c, val_c = split_conversations(load_conversations(data, group_field), val_fraction, cfg.seed)
    splits = {"train": [c["messages"] for c in train_c], "val": [c["messages"] for c in val_c]}
    meta = {"source": str(Path(data).resolve()), "source_sha256": file_sha256(data), "base_model": str(ckpt.resolve())}
    source = ChatRows(tokenizer, splits, meta)
    changes = {"init_from": str(ckpt), "data": str(data)}
    first_user = next((m for m in splits["val"][0] if m["role"] == "user"), None)
    if not cfg.sample_prompt and first_user is not None:  # samples.jsonl then shows a reply to a held-out prompt
        changes["sample_prompt"] = tokenizer.apply_chat_template([first_user])
    cfg = dataclasses.replace(cfg, **changes)
    if not quiet and added:
        print(f"added {added} chat role tokens (<|system|> <|user|> <|assistant|>) and their chat template; "
              f"embeddings grow from {base.vocab_size} to {tokenizer.vocab_size} rows")
    model_cfg = dataclasses.replace(base, vocab_size=max(base.vocab_size, tokenizer.vocab_size))
    return train(model_cfg, cfg, resume=resume, quiet=quiet, source=source)
