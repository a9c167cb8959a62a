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

How it reads: :func:`train` builds a :class:`Trainer` and runs it. The trainer's state between
steps (step, best val loss, tokens seen, run id, ``eval_pending``, and at a save the sampler, RNG
and optimizer states) is one :class:`~barkgpt.checkpoint.TrainState`, saved in ``last/`` and
restored on resume; each step of the loop is a short method (:meth:`Trainer.train_step`,
:meth:`~Trainer.update`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.save`). ``metrics.jsonl``
and the plots are :mod:`barkgpt.runlog`'s, which the web page reads with the same parser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from barkgpt import cpu_attention
from barkgpt.checkpoint import (
    CONFIG_NAME,
    TrainState,
    find_checkpoint,
    load_model,
    read_checkpoint_config,
    recover_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from barkgpt.common import (
    BarkError,
    DeferredSigint,
    atomic_write_text,
    bits_per_byte,
    compile_fn,
    get_lr,
    peak_flops,
    progress,
    remove_leftovers,
    resolve_device,
    resolve_dtype,
    token_nll_and_bytes,
)
from barkgpt.config import GPTConfig, TrainConfig, config_to_dict, dump_yaml
from barkgpt.conversations import ChatRows, file_sha256, load_conversations, split_conversations
from barkgpt.data import BUILTIN_DATASETS, TokenWindows, builtin_dataset, prepare_dataset
from barkgpt.distributed import all_reduce_mean, full_model_state, setup, teardown, wrap_model
from barkgpt.engine import Engine
from barkgpt.model import GPT
from barkgpt.optim import build_optimizers
from barkgpt.planner import REFIT_STEPS, StepClock
from barkgpt.runlog import METRICS_NAME, SAMPLES_NAME, append_row, plot_run, truncate_for_resume
from barkgpt.tokenizer import Tokenizer
from barkgpt.trackers import Trackers

# Fine-tuning starts from a trained model on a small chat set: fewer, gentler steps than
# TrainConfig's pretraining defaults (flags and --config still override each one).
FINETUNE_DEFAULTS = {
    "max_iters": 300,
    "learning_rate": 3e-4,
    "min_lr": 3e-5,
    "warmup_iters": 30,
    "eval_interval": 50,
    "eval_iters": 20,
    "log_interval": 5,
    "batch_size": 8,
}


def resolve_data(cfg: TrainConfig) -> Path:
    """The prepared data folder for ``cfg.data`` (a path), preparing it into ``out_dir/data`` if needed.

    Built-in generated datasets (names, not paths) are :func:`open_source`'s; this takes paths.

    Raises:
        BarkError: no ``--data`` given, or a path that does not exist.
    """
    if cfg.data is None:
        raise BarkError(
            "no training data: pass --data DIR (from barkgpt prepare), a .txt/.jsonl file, "
            "or use a preset (barkgpt train --preset NAME)"
        )
    target = Path(cfg.out_dir) / "data"
    src = Path(cfg.data)
    if (src / "meta.json").is_file():
        return src
    if not src.exists():
        names = ", ".join(sorted(BUILTIN_DATASETS)) or "none registered"
        raise BarkError(
            f"--data {src} does not exist; prepare data with barkgpt prepare --input FILE --out DIR, pass a "
            f".txt/.jsonl file, or name a built-in generated dataset ({names}; in Python, import the module "
            f"that registers it first)"
        )
    if not (target / "meta.json").is_file():
        prepare_dataset(src, target, tokenizer=cfg.tokenizer, vocab_size=cfg.tokenizer_vocab_size, text_field=cfg.text_field)
    return target


def open_source(cfg: TrainConfig):
    """The batch source for ``cfg.data``: a built-in generated dataset's (``data.builtin_dataset``,
    the hook that edge modules fill on import), else the prepared token files
    (:func:`resolve_data`).

    A builder gets ``out_dir/data`` and ``cfg.seed``; a folder it returns is opened as
    ``TokenWindows``, any other value is the batch source itself.

    Raises:
        BarkError: as :func:`resolve_data`, or as the builder raises.
    """
    builder = builtin_dataset(cfg.data)
    if builder is not None:
        made = builder(Path(cfg.out_dir) / "data", cfg.seed)
        return TokenWindows(made) if isinstance(made, (str, Path)) else made
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
def estimate_loss(model: GPT, source, cfg: TrainConfig, block_size: int, device: str, autocast, token_bytes: np.ndarray) -> dict:
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


def expert_share(model: GPT) -> list[float] | None:
    """Each expert's share of the token assignments in the last forward, over all layers; None
    for a dense model."""
    if not model.config.n_expert:
        return None
    counts = sum(b.mlp.expert_tokens.float() for b in model.transformer.h)
    return [round(x, 4) for x in (counts / counts.sum()).tolist()]


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


def train(
    model_cfg: GPTConfig, cfg: TrainConfig, resume: bool = False, quiet: bool = False, source=None, trainer_class=None
) -> dict:
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
        trainer_class: :class:`Trainer` (None) or a subclass with another objective
            (``dpo.DPOTrainer``), built with the same arguments.

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
        result = (trainer_class or Trainer)(model_cfg, cfg, ctx, resume, quiet or not ctx.is_main, source).run()
    except BaseException:
        teardown(ctx, wait=False)
        raise
    teardown(ctx)
    return result


def build_model(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, device: str, resume_from: Path | None) -> GPT:
    """The model to train, on ``device`` in train mode: the one in ``resume_from`` (a recovered
    ``last/``), else the one at ``cfg.init_from`` (its embeddings grown to the tokenizer's
    vocabulary, :func:`resize_vocab`), else a fresh one initialised with seed ``cfg.seed``.

    Raises:
        BarkError: on resume, a checkpoint whose model differs from ``model_cfg`` (naming the
            fields); a ``vocab_size`` below the tokenizer's; as :func:`checkpoint.load_model`.
    """
    if resume_from is not None:
        model, saved = load_model(resume_from, device)
        saved_shape = dataclasses.asdict(GPTConfig(**saved["model"]))
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=saved_shape["vocab_size"])
        diff = [k for k, v in dataclasses.asdict(model_cfg).items() if saved_shape[k] != v]
        if diff:
            raise BarkError(
                f"--resume: the checkpoint in {resume_from.parent / 'last'} has a different model "
                f"({', '.join(f'{k}={saved_shape[k]}' for k in diff)}); use the same model flags or a new --out-dir"
            )
    elif cfg.init_from != "scratch":
        model, _ = load_model(cfg.init_from, device)
        if model.config.vocab_size < tokenizer.vocab_size:  # fine-tuning added tokens (chat roles)
            model = resize_vocab(model, tokenizer.vocab_size)
    else:
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).to(device)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise BarkError(
            f"vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; "
            f"drop --vocab-size to use the tokenizer's"
        )
    return model.train()


def set_lr(optimizers: list, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr`` times its ``lr_scale`` (default 1)."""
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


class Trainer:
    """One rank's training run: the model, its optimizers and batch source, and the
    :class:`~barkgpt.checkpoint.TrainState` that every method reads and advances.

    Built by :func:`train`; :meth:`run` trains to ``cfg.max_iters``. The pieces, in the order a
    step goes through them: :meth:`train_step` (draw the batches, :meth:`forward_backward`),
    :meth:`update` (under :meth:`DeferredSigint.critical`), :meth:`log_train`, and every
    ``eval_interval`` steps :meth:`evaluate` (:meth:`write_sample`, :meth:`save` of ``best/``
    and ``last/``, the plots). See the module docstring for what makes resume exact.

    Attributes:
        state: the run's :class:`TrainState` (step, best val loss, tokens seen, run id...).
        snap: the sampler and torch RNG states taken at the start of the step in progress (None
            between steps): an interrupt before the update saves these with the old step, so
            the resumed run draws the same batch again.
        last_is_current: ``last/`` holds exactly the present state (nothing to save on Ctrl-C).
    """

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, ctx, resume: bool, quiet: bool, source):
        self.cfg, self.ctx, self.quiet = cfg, ctx, quiet
        self.clock = StepClock(cfg.max_time)  # the deadline counts from here: data, model and compile included
        self.out_dir, self.device = Path(cfg.out_dir), ctx.device
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.source = source if source is not None else open_source(cfg)
        self.tokenizer = self.source.tokenizer
        last = resume_checkpoint(self.out_dir) if resume else None
        self.raw_model = build_model(model_cfg, cfg, self.tokenizer, self.device, last)
        self.model_cfg = self.raw_model.config
        self.block_size = self.model_cfg.block_size
        self.source.check(self.block_size)
        self.model = self.wrapped = wrap_model(self.raw_model, ctx)  # DDP, or FSDP2 sharding raw_model in place
        self.optimizers = build_optimizers(self.raw_model, cfg, self.device)
        self.rng = np.random.default_rng(cfg.seed)  # the batch sampler: its state is the data position
        self.resumed = last is not None
        self.state = self.restore(TrainState.load(last)) if last is not None else TrainState(world_size=ctx.world_size)
        if last is None:
            torch.manual_seed(cfg.seed + 1)  # dropout stream, independent of the init
        self.metrics_path, self.samples_path = self.out_dir / METRICS_NAME, self.out_dir / SAMPLES_NAME
        if ctx.is_main:
            self.prepare_out_dir()
        self.trackers = Trackers(cfg.log_to if ctx.is_main else [], self.out_dir, config_to_dict(self.model_cfg, cfg))
        self.setup_runtime()
        self.info = {
            "data": {
                k: self.source.meta.get(k)
                for k in ("source", "source_sha256", "tokenizer", "train_tokens", "val_tokens", "val_fraction")
            },
            "run_id": self.state.run_id,
        }
        self.token_bytes = np.asarray(self.tokenizer.token_bytes(), dtype=np.int64)
        self.hook = signal_hook_from_env() or (lambda point, step: None)
        self.snap, self.last_is_current = None, self.resumed
        self.losses, self.last_loss, self.sigint, self.bar = None, float("nan"), None, None
        # every rank draws the whole global batch (one data stream for any world size) and reads its rows
        self.rank_rows = slice(ctx.rank * cfg.batch_size, (ctx.rank + 1) * cfg.batch_size) if ctx.enabled else slice(None)

    # ---- setup: resume, the run folder, compile and autocast

    def restore(self, state: TrainState) -> TrainState:
        """Load a resumed run's optimizer, sampler and RNG states; returns ``state`` with its best
        val loss lowered to ``best/``'s when a kill fell between writing ``best/`` and ``last/``.

        Raises:
            BarkError: another world size or another optimizer than the saved run's.
        """
        last, ctx = self.out_dir / "last", self.ctx
        if state.world_size != ctx.world_size:
            raise BarkError(
                f"--resume: {last} was written by {state.world_size} process(es) and this run has "
                f"{ctx.world_size}; resume with --nproc {state.world_size} (the batch stream depends on it)"
            )
        if len(state.optimizer or []) != len(self.optimizers):
            raise BarkError(f"--resume: {last} was trained with another --optimizer; resume with the same one")
        for opt, opt_state in zip(self.optimizers, state.optimizer):
            if ctx.fsdp:
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
            else:
                opt.load_state_dict(opt_state)
        self.rng.bit_generator.state = state.sampler
        set_rng_state(state.rng)
        state.best_val_loss = min(state.best_val_loss, recorded_best(self.out_dir / "best", state.run_id))
        state.optimizer = state.sampler = state.rng = None  # loaded; save() takes them fresh
        return state

    def prepare_out_dir(self) -> None:
        """(Rank 0) Clean up after kills, write the resolved ``config.yaml`` before step 0, and
        start the logs: empty for a new run; for a resumed one, without the rows from after its
        step (and those of the evaluation it redoes)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.out_dir, ["last", "best", "config.yaml", METRICS_NAME, SAMPLES_NAME, "loss.png", "experts.png"])
        atomic_write_text(self.out_dir / "config.yaml", dump_yaml(config_to_dict(self.model_cfg, self.cfg)))
        if not self.resumed:
            atomic_write_text(self.metrics_path, "")
            self.samples_path.unlink(missing_ok=True)
            return
        truncate_for_resume(self.metrics_path, self.samples_path, self.state.step, self.state.eval_pending)

    def setup_runtime(self) -> None:
        """The CPU kernel and denormal setting, ``torch.compile``, autocast and the loss scaler;
        then the start banner (model size, tokens per iteration, device, data)."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        if device == "cpu":
            if cfg.compile:  # like the compile, a one-time build (~15 s) for faster steps
                cpu_attention.load(quiet=self.quiet)  # the short-context attention kernel
            torch.set_flush_denormal(True)  # denormal floats in grads/optimizer state are ~100x slower on x86 (reset on return)
        if cfg.compile:
            self.model = compile_fn(self.model, device)
        self.autocast = (
            torch.autocast(device.split(":")[0], dtype=getattr(torch, self.dtype))
            if self.dtype != "float32"
            else contextlib.nullcontext()
        )
        self.scaler = torch.amp.GradScaler(enabled=self.dtype == "float16")
        self.tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * self.block_size * ctx.world_size
        self.flops_per_token, self.peak = self.raw_model.flops_per_token(), peak_flops(device)
        if not self.quiet:
            ranks = f" x {ctx.world_size} ranks ({'FSDP' if ctx.fsdp else 'DDP'})" if ctx.enabled else ""
            print(
                f"model: {self.model_cfg.family}, {self.raw_model.num_params() / 1e6:.2f}M parameters, "
                f"{self.flops_per_token / 1e6:.1f} MFLOPs/token, head_dim {self.model_cfg.head_dim}; "
                f"{self.tokens_per_iter:,} tokens/iteration; device {device}{ranks}, dtype {self.dtype}, "
                f"optimizer {cfg.optimizer}; data {self.source.describe(self.block_size)}"
            )

    # ---- the loop

    def run(self) -> dict:
        """Train from ``state.step`` to ``cfg.max_iters``; a SIGINT saves ``last/`` and returns.

        Returns:
            :func:`train`'s summary dict.
        """
        cfg, st = self.cfg, self.state
        self.t_start = self.t_log = time.perf_counter()
        self.elapsed0 = st.elapsed_s  # wall clock of the runs before a resume
        self.tok_log, self.loop_s, self.step0 = 0, 0.0, st.step  # loop_s: time in training steps only
        self.bar = progress(total=cfg.max_iters, desc="train", unit="step", initial=st.step) if not self.quiet else None
        interrupted = False
        with DeferredSigint() as self.sigint:
            try:
                if (cfg.init_from != "scratch" and not self.resumed) or st.eval_pending:  # the starting point, or a redo
                    self.evaluate()
                    self.t_log = time.perf_counter()
                while st.step < self.cfg.max_iters and not self.time_up():  # self.cfg: refit_to_time may change it
                    self.train_step()
                if st.step < self.cfg.max_iters and not self.last_is_current:  # stopped by max_time: evaluate and save now
                    self.evaluate()
            except KeyboardInterrupt:
                self.sigint.hold = True  # the save below finishes even if Ctrl-C comes again
                interrupted = True
                self.save_interrupted()
            finally:
                self.sigint.hold = True  # a Ctrl-C from here on finds nothing left to stop
                if self.bar is not None:
                    self.bar.close()
                torch.set_flush_denormal(False)  # process-wide state: back to the default for the caller
                self.trackers.close()
        return self.summary(interrupted)

    def eval_due(self) -> bool:
        """Whether the step just done is evaluated: ``eval_interval`` steps after the latest
        evaluation (the first at ``eval_interval``), and the last step. Counting from the latest
        evaluation rather than on a grid of multiples matters when ``fit_to_time`` changes the
        interval: the next evaluation then comes a whole new interval later, not at the next
        multiple of it (which could be a few steps away)."""
        st, cfg = self.state, self.cfg
        if st.step == cfg.max_iters:
            return True
        if st.last_eval_step is None:
            return st.step % cfg.eval_interval == 0
        return st.step - st.last_eval_step >= cfg.eval_interval

    def train_step(self) -> None:
        """One step, as a transaction: take the sampler and RNG states, draw the batches,
        accumulate the gradients, then :meth:`update` with SIGINT held; evaluate when due.

        Raises:
            BarkError: the loss is not finite (``last/`` keeps the last good state).
            KeyboardInterrupt: a SIGINT outside the update.
        """
        cfg, st = self.cfg, self.state
        # before the batch is drawn: the sampler and torch's RNG (dropout) are what a step advances;
        # Python's and NumPy's global RNGs are read at save time (44 us a step saved: no step uses them)
        self.snap = (self.rng.bit_generator.state, torch.get_rng_state())
        t_step = time.perf_counter()
        lr = get_lr(st.step, cfg)
        set_lr(self.optimizers, lr)
        rows = cfg.batch_size * self.ctx.world_size
        batches = [
            to_device(self.source.batch("train", rows, self.block_size, self.rng, self.rank_rows), self.device)
            for _ in range(cfg.gradient_accumulation_steps)
        ]
        self.hook("forward", st.step)
        loss = self.forward_backward_or_uncompile(batches)
        self.last_loss = all_reduce_mean(loss.item(), self.ctx)
        if not math.isfinite(self.last_loss):
            raise BarkError(
                f"the loss became {self.last_loss} at step {st.step}; the last good checkpoint in "
                f"{self.out_dir / 'last'} is kept. Lower --learning-rate or set --grad-clip 1.0"
            )
        with self.sigint.critical():  # the update: all of it, or (before it) none of it
            self.update(lr, t_step)
        self.clock.step_done(time.perf_counter() - t_step)
        if self.bar is not None:
            self.bar.update(1)
        if cfg.fit_to_time and st.step - self.step0 == REFIT_STEPS:
            self.refit_to_time()
        if self.eval_due():
            st.elapsed_s = self.elapsed0 + time.perf_counter() - self.t_start
            t_eval = time.perf_counter()
            losses = self.evaluate()
            self.clock.eval_done(time.perf_counter() - t_eval)
            if cfg.fit_to_time and st.step < self.cfg.max_iters:  # the evaluation is measured now, and the machine's speed
                self.refit_to_time()
            if self.bar is not None:
                self.bar.write(self.eval_line(losses))
            self.t_log, self.tok_log = time.perf_counter(), 0  # keep eval time out of tokens/s

    def forward_backward_or_uncompile(self, batches: list[tuple]) -> torch.Tensor:
        """:meth:`forward_backward` on the compiled model; if the compile fails at the run's
        first step, once more on the eager model, which the run keeps from then on."""
        try:
            return self.forward_backward(self.model, batches)
        except Exception as e:  # noqa: BLE001 - a failed compile falls back to eager, once
            if self.model is self.wrapped or self.state.step > self.step0:
                raise
            print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training without compile")
            self.model = self.wrapped
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return self.forward_backward(self.model, batches)

    def forward_backward(self, model, batches: list[tuple]) -> torch.Tensor:
        """Accumulate gradients over the micro-batches (each a tuple of (B, T) tensors); returns
        the last micro-batch's loss (a scalar tensor, nats per target token).

        Across ranks, gradients are synchronized on the last micro-batch only (DDP's ``no_sync``,
        FSDP2's ``set_requires_gradient_sync``)."""
        ctx = self.ctx
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            if ctx.fsdp:
                self.raw_model.set_requires_gradient_sync(last)
            with self.wrapped.no_sync() if ctx.enabled and not ctx.fsdp and not last else contextlib.nullcontext():
                with self.autocast:
                    loss = self.batch_loss(model, batch)
                self.scaler.scale(loss / len(batches)).backward()
        return loss

    def batch_loss(self, model, batch: tuple) -> torch.Tensor:
        """The training objective of one micro-batch (a scalar tensor): :func:`model_loss`, the
        next-token cross-entropy. A subclass with another objective (``dpo.DPOTrainer``) overrides it."""
        return model_loss(model, batch)

    def update(self, lr: float, t_step: float) -> None:
        """The update, which SIGINT does not cut in half: clip, step every optimizer, zero the
        gradients, count the step (and its tokens), and write its log line when due."""
        cfg, st = self.cfg, self.state
        if cfg.grad_clip > 0:
            for opt in self.optimizers:
                self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip, foreach=True)
        for i, opt in enumerate(self.optimizers):
            self.scaler.step(opt)
            if i == 0:
                self.hook("update", st.step)
        self.scaler.update()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        st.step += 1
        self.snap, self.last_is_current = None, False
        st.eval_pending = self.eval_due()  # this step's evaluation is owed
        self.loop_s += time.perf_counter() - t_step
        st.tokens_seen += self.tokens_per_iter
        self.tok_log += self.tokens_per_iter
        if st.step % cfg.log_interval == 0 or st.step == cfg.max_iters:
            self.log_train(lr)

    def log_train(self, lr: float) -> None:
        """Write a train row (loss, learning rate, tokens/s since the last row, MFU, expert
        shares) to ``metrics.jsonl`` and the progress bar."""
        st, now = self.state, time.perf_counter()
        tps = self.tok_log / max(now - self.t_log, 1e-9)
        st.elapsed_s = self.elapsed0 + now - self.t_start
        share = expert_share(self.raw_model)
        eta = self.eta()
        self.log(
            {
                "step": st.step,
                "train_loss": round(self.last_loss, 5),
                "lr": lr,
                "tokens_per_s": round(tps, 1),
                "elapsed_s": round(st.elapsed_s, 3),
                **({"eta_s": round(eta, 1)} if eta is not None else {}),
                **({"mfu": round(self.mfu(tps), 4)} if self.peak else {}),
                **({"expert_share": share} if share else {}),
            }
        )
        self.t_log, self.tok_log = now, 0
        if self.bar is not None:
            ends = {"ends": time.strftime("%H:%M:%S", time.localtime(time.time() + eta))} if eta is not None else {}
            self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", **ends)

    def refit_to_time(self) -> None:
        """Re-fit the run to ``cfg.max_time`` from the measured step and evaluation times
        (``fit_to_time``; done after ``REFIT_STEPS`` steps and after each evaluation): set
        ``max_iters`` (and the cosine's ``lr_decay_iters``) to the steps that fit, keeping the
        number of evaluations, and write the new ``config.yaml``. The compile, the machine's load
        and the plan's estimates all show in the measured times, so the schedule ends on time."""
        cfg, st, clock = self.cfg, self.state, self.clock
        n_evals = math.ceil(cfg.max_iters / cfg.eval_interval)
        left = cfg.max_time - clock.elapsed() - self.evals_left() * clock.eval_guess() - 0.5
        new = max(st.step + 1, st.step + int(left / max(clock.step_s or clock.first_s, 1e-6)))
        new = round(all_reduce_mean(float(new), self.ctx))  # one schedule for every rank
        if new == cfg.max_iters:
            return
        self.cfg = cfg = dataclasses.replace(
            cfg,
            max_iters=new,
            lr_decay_iters=new,
            eval_interval=max(1, math.ceil(new / n_evals)),
            warmup_iters=min(cfg.warmup_iters, new - 1),
        )
        if self.ctx.is_main:
            atomic_write_text(self.out_dir / "config.yaml", dump_yaml(config_to_dict(self.model_cfg, cfg)))
        if self.bar is not None:
            self.bar.total = new
            ms = (clock.step_s or 0.0) * 1e3
            self.bar.write(f"re-fitted to max_time: {new:,} steps at {ms:.1f} ms/step, eval every {cfg.eval_interval}")

    def time_up(self) -> bool:
        """Whether ``cfg.max_time`` leaves no room for another step and the final evaluation
        (:meth:`StepClock.out_of_time`); every rank stops when one does."""
        if self.cfg.max_time is None:
            return False
        return all_reduce_mean(float(self.clock.out_of_time()), self.ctx) > 0

    def eta(self) -> float | None:
        """Forecast seconds to the run's end from the measured step and evaluation times
        (:class:`~barkgpt.planner.StepClock`), the evaluations still due included."""
        return self.clock.eta(self.cfg.max_iters - self.state.step, self.evals_left())

    def evals_left(self) -> int:
        """Evaluations still due (:meth:`eval_due`): one every ``eval_interval`` steps after the
        latest and one at ``max_iters``."""
        cfg, st = self.cfg, self.state
        last = st.last_eval_step if st.last_eval_step is not None else st.step - st.step % cfg.eval_interval
        return max(0, math.ceil((cfg.max_iters - last) / cfg.eval_interval))

    def mfu(self, tokens_per_s: float) -> float | None:
        """Model FLOPs utilization of all ranks together; None off known GPUs."""
        return self.flops_per_token * tokens_per_s / (self.peak * self.ctx.world_size) if self.peak else None

    # ---- evaluation, samples, checkpoints, logs

    def evaluate(self) -> dict:
        """Evaluate, then write (in this order, see the module docstring) the val row, the
        sample, ``best/`` (when better) and ``last/``, and the plots.

        Returns:
            :func:`estimate_loss`'s dict.
        """
        st = self.state
        st.eval_pending = True  # until last/ holds this evaluation's outcome
        st.last_eval_step = st.step
        losses = self.estimate()
        self.hook("eval", st.step)
        self.log(self.eval_row(losses))
        self.write_sample()
        if losses["val"] < st.best_val_loss:
            self.save("best", losses)  # before last/ records it as the best
            self.hook("best_saved", st.step)
            st.best_val_loss = losses["val"]
        st.eval_pending = False
        self.save("last", losses)
        self.last_is_current = True
        self.hook("last_saved", st.step)
        if self.ctx.is_main:
            plot_run(self.out_dir)
        self.losses = losses
        return losses

    def estimate(self) -> dict:
        """The evaluation's numbers: :func:`estimate_loss` (a subclass with another objective
        overrides it and :meth:`eval_row`); ``"val"`` decides ``best/``."""
        # eager model: a compiled one would recompile for eval mode and no_grad, for ~20 forwards
        return estimate_loss(self.raw_model, self.source, self.cfg, self.block_size, self.device, self.autocast, self.token_bytes)

    def eval_line(self, losses: dict) -> str:
        """The line the progress bar prints after an evaluation's ``losses`` (:meth:`estimate`)."""
        return (
            f"step {self.state.step}: train {losses['train']:.4f}, val {losses['val']:.4f} "
            f"(perplexity {math.exp(losses['val']):.2f})"
        )

    def eval_row(self, losses: dict) -> dict:
        """The ``metrics.jsonl`` row of an evaluation's ``losses`` (:meth:`estimate`)."""
        return {
            "step": self.state.step,
            "val_loss": round(losses["val"], 5),
            "val_perplexity": round(math.exp(min(losses["val"], 50)), 4),
            "val_bpb": round(losses["val_bpb"], 5),
            "eval_train_loss": round(losses["train"], 5),
            "elapsed_s": round(self.state.elapsed_s, 3),
        }

    def write_sample(self) -> None:
        """Sample one document (or reply to ``cfg.sample_prompt``), at most 64 tokens, seeded by
        the step; rank 0 appends it to ``samples.jsonl``."""
        tok, step = self.tokenizer, self.state.step
        ids = (tok.encode(self.cfg.sample_prompt) if self.cfg.sample_prompt else [tok.eos_id])[-self.block_size :]
        toks = [
            s[0]
            for s in Engine(self.raw_model).generate(
                ids, max_new_tokens=min(64, self.block_size), temperature=0.8, top_k=50, seed=step, stop_ids=[tok.eos_id]
            )
        ]
        self.raw_model.train()
        text = tok.decode([t for t in toks if t is not None and t != tok.eos_id])
        if self.ctx.is_main:  # every rank samples (an FSDP forward needs them all); rank 0 writes
            append_row(self.samples_path, {"step": step, "prompt": self.cfg.sample_prompt, "text": text})

    def save(self, name: str, losses: dict | None = None) -> None:
        """Save checkpoint ``name`` (``last`` with the trainer state, or ``best``) from rank 0;
        under FSDP every rank joins the gather of the weights (and optimizer states)."""
        ctx, st = self.ctx, self.state
        extra = {**self.info, "step": st.step, "tokens_seen": st.tokens_seen, **({"val_loss": losses["val"]} if losses else {})}
        full = full_model_state(self.model, ctx) if ctx.fsdp else None  # a gather: every rank takes part
        opt_states = self.optimizer_states() if name == "last" else None
        if not ctx.is_main:
            return
        trainer_state = None
        if name == "last":
            rngs = rng_state()
            sampler = self.rng.bit_generator.state
            if self.snap is not None:  # inside a step: its start-of-step sampler and torch RNG
                sampler, rngs["torch"] = self.snap
            trainer_state = dataclasses.replace(st, sampler=sampler, rng=rngs, optimizer=opt_states, world_size=ctx.world_size)
        save_checkpoint(self.out_dir / name, self.raw_model, self.tokenizer, extra, trainer_state, state=full)

    def optimizer_states(self) -> list[dict]:
        """Each optimizer's ``state_dict()`` (under FSDP, the full states, gathered to the CPU)."""
        if not self.ctx.fsdp:
            return [o.state_dict() for o in self.optimizers]
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return [get_optimizer_state_dict(self.model, o, options=opts) for o in self.optimizers]

    def log(self, row: dict) -> None:
        """Append ``row`` to ``metrics.jsonl`` and the ``--log-to`` trackers (rank 0 only)."""
        if self.ctx.is_main:
            append_row(self.metrics_path, row)
            self.trackers.log(row)

    def save_interrupted(self) -> None:
        """After a SIGINT: save ``last/`` unless it already holds this state, and say how to go on."""
        st = self.state
        st.elapsed_s = self.elapsed0 + time.perf_counter() - self.t_start
        if not self.last_is_current:
            self.save("last")
        if not self.quiet:
            redo = "; its evaluation is redone first" if st.eval_pending else ""
            print(f"\ninterrupted: saved {self.out_dir / 'last'} at step {st.step}{redo}; continue with --resume")

    def summary(self, interrupted: bool) -> dict:
        """:func:`train`'s summary dict (see there)."""
        st = self.state
        total = self.elapsed0 + time.perf_counter() - self.t_start
        tps = (st.step - self.step0) * self.tokens_per_iter / max(self.loop_s, 1e-9)
        return {
            "step": st.step,
            "train_loss": self.last_loss,
            "val_loss": self.losses["val"] if self.losses else None,
            "best_val_loss": st.best_val_loss,
            "tokens_per_s": tps,
            "mfu": self.mfu(tps),
            "train_seconds": self.loop_s,
            "elapsed_s": total,
            "interrupted": interrupted,
        }


def resume_checkpoint(out_dir: Path) -> Path:
    """The ``last/`` checkpoint to resume in ``out_dir``, restored first from a kill between a
    save's two renames (:func:`checkpoint.recover_checkpoint` with ``repair``).

    Raises:
        BarkError: there is none (:func:`no_checkpoint_error`).
    """
    found = recover_checkpoint(out_dir / "last", repair=True)
    if found is None:
        raise no_checkpoint_error(out_dir)
    return found


def no_checkpoint_error(out_dir: Path) -> BarkError:
    """The error for ``--resume`` without a ``last/`` checkpoint, whose advice never wipes a run:
    when ``out_dir`` holds a run's files, training there without ``--resume`` would replace them."""
    last = out_dir / "last"
    kept = [name for name in ("best", "metrics.jsonl", "samples.jsonl") if (out_dir / name).exists()]
    if kept:
        return BarkError(
            f"--resume found no checkpoint in {last}, but {out_dir} holds a run ({', '.join(kept)}) that "
            f"cannot be resumed; keep it and train into a new --out-dir (--init-from {out_dir / 'best'} "
            f"starts from its best model), or delete {out_dir} to start over there"
        )
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


def finetune(
    model_path: str | Path,
    data: str | Path,
    cfg: TrainConfig,
    val_fraction: float = 0.1,
    group_field: str = "tree_id",
    resume: bool = False,
    quiet: bool = False,
) -> dict:
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
    splits = {"train": train_c, "val": val_c}  # rows keep their "tools" for the template
    meta = {"source": str(Path(data).resolve()), "source_sha256": file_sha256(data), "base_model": str(ckpt.resolve())}
    source = ChatRows(tokenizer, splits, meta)
    changes = {"init_from": str(ckpt), "data": str(data)}
    first_user = next((m for m in val_c[0]["messages"] if m["role"] == "user"), None)
    if not cfg.sample_prompt and first_user is not None:  # samples.jsonl then shows a reply to a held-out prompt
        changes["sample_prompt"] = tokenizer.apply_chat_template([first_user])
    cfg = dataclasses.replace(cfg, **changes)
    if not quiet and added:
        print(
            f"added {added} chat role tokens (<|system|> <|user|> <|assistant|>) and their chat template; "
            f"embeddings grow from {base.vocab_size} to {tokenizer.vocab_size} rows"
        )
    model_cfg = dataclasses.replace(base, vocab_size=max(base.vocab_size, tokenizer.vocab_size))
    return train(model_cfg, cfg, resume=resume, quiet=quiet, source=source)
