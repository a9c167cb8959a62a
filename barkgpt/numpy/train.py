"""The training loop in NumPy: ``barkgpt train --backend numpy``.

The PyTorch trainer's run, without torch: the same batch source (``data.TokenWindows`` over a
prepared folder or a built-in generated dataset, or ``conversations.ChatRows``) drawn by the same
``np.random.default_rng(seed)`` sampler, so a seed gives the torch run's batches; the same
warmup + cosine schedule, AdamW groups and gradient clipping (:mod:`barkgpt.numpy.optim`); the
same run folder: ``config.yaml`` before step 0, ``metrics.jsonl`` rows of the same keys,
``samples.jsonl``, ``loss.png`` (:mod:`barkgpt.runlog`), and ``best/`` and ``last/`` checkpoints
that any backend loads (``model.safetensors`` under the torch model's tensor names,
``config.json``, the tokenizer files). The one difference in ``last/``: the trainer state is
``trainer_state.json`` (step, best val loss, the sampler's and the dropout generator's states)
plus ``optimizer.safetensors`` (AdamW's moments), not torch's ``trainer_state.pt``.

Resume is exact: the sampler and dropout states are taken at the start of each step, an
interrupt (SIGINT) before the update saves them with the old step, and the update itself holds a
SIGINT until it is done, so ``--resume`` logs the losses the uninterrupted run logs. The model's
initial weights come from NumPy's generator (seed ``cfg.seed``), so they are not torch's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

from barkgpt.checkpoint import CONFIG_NAME, WEIGHTS_NAME, TrainState, find_checkpoint, recover_checkpoint
from barkgpt.common import BarkError, DeferredSigint, atomic_dir, atomic_write_text, bits_per_byte, progress, remove_leftovers
from barkgpt.config import GPTConfig, TrainConfig, config_to_dict, dump_yaml
from barkgpt.conversations import ChatRows
from barkgpt.data import BUILTIN_DATASETS, TokenWindows, builtin_dataset, prepare_dataset
from barkgpt.numpy.generate import Engine
from barkgpt.numpy.model import GPT, load_weights, replace_vocab
from barkgpt.numpy.optim import AdamW, clip_grad_norm, get_lr
from barkgpt.runlog import METRICS_NAME, SAMPLES_NAME, append_row, plot_run, truncate_for_resume
from barkgpt.tokenizer import Tokenizer

STATE_NAME = "trainer_state.json"  # step, best val loss, sampler and dropout generator states
OPTIMIZER_NAME = "optimizer.safetensors"  # AdamW's moments, as flat arrays


def open_source(cfg: TrainConfig):
    """The batch source for ``cfg.data``, as ``barkgpt.train.open_source`` opens it: a built-in
    generated dataset (the ``data.register_dataset`` hook), a prepared folder, or a
    ``.txt``/``.jsonl``/folder prepared into ``out_dir/data`` first.

    Raises:
        BarkError: no ``--data``, or a path that does not exist.
    """
    builder = builtin_dataset(cfg.data)
    if builder is not None:
        made = builder(Path(cfg.out_dir) / "data", cfg.seed)
        if isinstance(made, (str, Path)):
            return TokenWindows(made)
        if not isinstance(made, ChatRows):  # e.g. preference pairs, which the torch backend's DPO trains on
            raise BarkError(
                f"--data {cfg.data} is a {type(made).__name__} dataset, which the numpy backend does not train; use --backend torch"
            )
        return made
    if cfg.data is None:
        raise BarkError("no training data: pass --data DIR (from barkgpt prepare), a .txt/.jsonl file, or use a preset")
    src, target = Path(cfg.data), Path(cfg.out_dir) / "data"
    if (src / "meta.json").is_file():
        return TokenWindows(src)
    if not src.exists():
        names = ", ".join(sorted(BUILTIN_DATASETS)) or "none registered"
        raise BarkError(
            f"--data {src} does not exist; prepare data with barkgpt prepare, pass a .txt/.jsonl file, or name a built-in dataset ({names})"
        )
    if not (target / "meta.json").is_file():
        prepare_dataset(src, target, tokenizer=cfg.tokenizer, vocab_size=cfg.tokenizer_vocab_size)
    return TokenWindows(target)


def train(model_cfg: GPTConfig, cfg: TrainConfig, resume: bool = False, quiet: bool = False, source=None) -> dict:
    """Train a model in NumPy and write the run folder ``cfg.out_dir`` (see the module docstring).

    Args:
        model_cfg: the model shape (``vocab_size`` None takes the tokenizer's).
        cfg: the run settings (``optimizer`` adamw; ``device`` auto or cpu; ``dtype`` auto or
            float32; ``compile`` and ``fsdp`` are torch's and ignored).
        resume: continue from ``out_dir/last``.
        quiet: no progress bar or banner.
        source: the batch source, or None to open ``cfg.data`` (:func:`open_source`).

    Returns:
        ``barkgpt.train.train``'s summary dict (``mfu`` None).

    Raises:
        BarkError: bad data or settings, a resume of another model or of a torch run, a NaN loss.
    """
    if cfg.device not in ("auto", "cpu") or cfg.dtype not in ("auto", "float32"):
        raise BarkError("the numpy backend trains in float32 on the CPU; drop --device/--dtype or use --backend torch")
    torch_only = [f"--{k.replace('_', '-')}" for k in ("max_time", "fit_to_time", "log_to") if getattr(cfg, k, None)]
    if torch_only:
        raise BarkError(f"{', '.join(torch_only)} are the torch trainer's; drop them or use --backend torch")
    return Trainer(model_cfg, cfg, resume, quiet, source).run()


def build_model(model_cfg: GPTConfig, cfg: TrainConfig, tokenizer: Tokenizer, last: Path | None) -> GPT:
    """The model to train: ``last/``'s (resume; it must match ``model_cfg``), the one at
    ``cfg.init_from`` (its vocabulary grown to the tokenizer's), or a fresh one (seed ``cfg.seed``).

    Raises:
        BarkError: a resumed model that differs from ``model_cfg``, or a vocabulary below the tokenizer's.
    """
    if last is not None:
        model = load_weights(last)
        saved = dataclasses.asdict(model.config)
        want = dataclasses.asdict(dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or saved["vocab_size"]))
        diff = [k for k, v in want.items() if saved[k] != v]
        if diff:
            raise BarkError(
                f"--resume: {last} has a different model ({', '.join(f'{k}={saved[k]}' for k in diff)}); use the same model flags or a new --out-dir"
            )
    elif cfg.init_from != "scratch":
        model = load_weights(find_checkpoint(cfg.init_from))
        if model.config.vocab_size < tokenizer.vocab_size:
            model = replace_vocab(model, tokenizer.vocab_size)
    else:
        model = GPT(dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size or tokenizer.vocab_size), seed=cfg.seed)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise BarkError(
            f"vocab_size {model.config.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; drop --vocab-size"
        )
    return model


def save_checkpoint(
    path: Path, model: GPT, tokenizer: Tokenizer, info: dict, state: TrainState | None, optimizer: AdamW | None
) -> None:
    """Write a checkpoint folder atomically: ``model.safetensors`` (torch's names, a tied head
    stored once), ``config.json``, the tokenizer, and for ``last/`` the trainer state and
    ``optimizer.safetensors``."""
    from safetensors.numpy import save_file

    with atomic_dir(path) as tmp:
        save_file(model.state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        config = {"model": dataclasses.asdict(model.config), **info, "backend": "numpy"}
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        if state is not None:
            fields = {k: v for k, v in dataclasses.asdict(state).items() if k != "optimizer"}
            (tmp / STATE_NAME).write_text(json.dumps(fields) + "\n", encoding="utf-8")
            save_file(optimizer.state_dict(), str(tmp / OPTIMIZER_NAME))


def load_state(last: Path) -> tuple[TrainState, dict]:
    """The trainer state and optimizer arrays of a NumPy run's ``last/``.

    Raises:
        BarkError: a torch run's ``last/`` (resume it with ``--backend torch``), or a missing or corrupt state.
    """
    from safetensors.numpy import load_file

    if not (last / STATE_NAME).is_file():
        torch_run = (last / "trainer_state.pt").is_file()
        hint = (
            "it was trained by the torch backend: resume with --backend torch"
            if torch_run
            else "start a new run with another --out-dir"
        )
        raise BarkError(f"{last} holds no {STATE_NAME} to resume the numpy backend from; {hint}")
    try:
        state = TrainState(**json.loads((last / STATE_NAME).read_text(encoding="utf-8")))
        return state, load_file(str(last / OPTIMIZER_NAME))
    except (OSError, ValueError, TypeError) as e:
        raise BarkError(f"{last / STATE_NAME} is corrupt ({type(e).__name__}); start a new run with another --out-dir") from None


def nll_and_bytes(nll: np.ndarray, targets: np.ndarray, token_bytes: np.ndarray) -> tuple[float, int, float, int]:
    """``common.token_nll_and_bytes``'s sums from per-target nll (B, T): (nll, targets, nll over
    targets with bytes, their bytes); ignored targets (-1) count for nothing."""
    y = targets.reshape(-1)
    n_bytes = token_bytes[np.maximum(y, 0)] * (y >= 0)
    has = n_bytes > 0
    flat = nll.reshape(-1).astype(np.float64)
    return float(flat.sum()), int((y >= 0).sum()), float(flat[has].sum()), int(n_bytes.sum())


class Trainer:
    """One NumPy training run: the model, AdamW, the batch source and the :class:`TrainState`.

    :meth:`run` trains to ``cfg.max_iters``: :meth:`train_step` (batches, forward, backward),
    :meth:`update` (clip, AdamW; SIGINT held), every ``eval_interval`` steps :meth:`evaluate`
    (val row, sample, ``best/``, ``last/``, plots).
    """

    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, resume: bool, quiet: bool, source):
        self.cfg, self.quiet, self.out_dir = cfg, quiet, Path(cfg.out_dir)
        self.source = source if source is not None else open_source(cfg)
        self.tokenizer = self.source.tokenizer
        last = None
        if resume:
            last = recover_checkpoint(self.out_dir / "last", repair=True)
            if last is None:
                raise BarkError(f"--resume found no checkpoint in {self.out_dir / 'last'}; drop --resume to start a new run")
        self.model = build_model(model_cfg, cfg, self.tokenizer, last)
        self.block_size = self.model.config.block_size
        self.source.check(self.block_size)
        self.optimizer = AdamW(self.model, cfg)
        self.rng = np.random.default_rng(cfg.seed)  # the batch sampler: its state is the data position
        self.dropout_rng = np.random.default_rng(cfg.seed + 1)
        self.resumed = last is not None
        self.state = self.restore(last) if last is not None else TrainState()
        self.prepare_out_dir()
        self.tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * self.block_size
        meta_keys = ("source", "source_sha256", "tokenizer", "train_tokens", "val_tokens", "val_fraction")
        self.info = {"data": {k: self.source.meta.get(k) for k in meta_keys}, "run_id": self.state.run_id}
        self.token_bytes = np.asarray(self.tokenizer.token_bytes(), dtype=np.int64)
        self.snap, self.last_is_current = None, self.resumed
        self.losses, self.last_loss, self.bar = None, float("nan"), None
        if not quiet:
            c = self.model.config
            print(
                f"model: {c.family}, {self.model.num_params() / 1e6:.2f}M parameters, {self.model.flops_per_token() / 1e6:.1f} "
                f"MFLOPs/token, head_dim {c.head_dim}; {self.tokens_per_iter:,} tokens/iteration; backend numpy (cpu, float32), "
                f"optimizer adamw; data {self.source.describe(self.block_size)}"
            )

    def restore(self, last: Path) -> TrainState:
        """Load a resumed run's optimizer, sampler and dropout states; returns its state (best val
        loss lowered to ``best/``'s if a kill fell between writing ``best/`` and ``last/``)."""
        state, opt = load_state(last)
        self.optimizer.load_state_dict(opt)
        self.rng.bit_generator.state = state.sampler
        self.dropout_rng.bit_generator.state = state.rng["dropout"]
        best = recover_checkpoint(self.out_dir / "best")
        if best is not None:
            with contextlib.suppress(OSError, ValueError):
                saved = json.loads((best / CONFIG_NAME).read_text(encoding="utf-8"))
                if saved.get("run_id") == state.run_id and isinstance(saved.get("val_loss"), (int, float)):
                    state.best_val_loss = min(state.best_val_loss, float(saved["val_loss"]))
        state.sampler = state.rng = None
        return state

    def prepare_out_dir(self) -> None:
        """Clean up after kills, write ``config.yaml``, and start the logs (a resumed run keeps
        the rows up to its step, without those of an evaluation it redoes)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.out_dir, ["last", "best", "config.yaml", METRICS_NAME, SAMPLES_NAME, "loss.png"])
        atomic_write_text(self.out_dir / "config.yaml", dump_yaml(config_to_dict(self.model.config, self.cfg)))
        self.metrics_path, self.samples_path = self.out_dir / METRICS_NAME, self.out_dir / SAMPLES_NAME
        if not self.resumed:
            atomic_write_text(self.metrics_path, "")
            self.samples_path.unlink(missing_ok=True)
            return
        truncate_for_resume(self.metrics_path, self.samples_path, self.state.step, self.state.eval_pending)

    def run(self) -> dict:
        """Train from ``state.step`` to ``cfg.max_iters``; a SIGINT saves ``last/`` and returns the summary."""
        cfg, st = self.cfg, self.state
        self.t_start = self.t_log = time.perf_counter()
        self.elapsed0, self.tok_log, self.loop_s, self.step0 = st.elapsed_s, 0, 0.0, st.step
        self.bar = progress(total=cfg.max_iters, desc="train", unit="step", initial=st.step) if not self.quiet else None
        interrupted = False
        with DeferredSigint() as self.sigint:
            try:
                if (cfg.init_from != "scratch" and not self.resumed) or st.eval_pending:
                    self.evaluate()
                    self.t_log = time.perf_counter()
                while st.step < cfg.max_iters:
                    self.train_step()
            except KeyboardInterrupt:
                self.sigint.hold, interrupted = True, True
                self.save_interrupted()
            finally:
                self.sigint.hold = True
                if self.bar is not None:
                    self.bar.close()
        return self.summary(interrupted)

    def eval_due(self) -> bool:
        """Whether the step just done is evaluated (every ``eval_interval`` steps, and the last)."""
        return self.state.step % self.cfg.eval_interval == 0 or self.state.step == self.cfg.max_iters

    def train_step(self) -> None:
        """One step as a transaction: snapshot the sampler and dropout states, draw the batches,
        accumulate gradients, then :meth:`update` with SIGINT held; evaluate when due.

        Raises:
            BarkError: the loss is not finite (``last/`` keeps the last good state).
        """
        cfg, st, model = self.cfg, self.state, self.model
        self.snap = (self.rng.bit_generator.state, self.dropout_rng.bit_generator.state)
        t_step = time.perf_counter()
        lr = get_lr(st.step, cfg)
        model.zero_grad()
        n = cfg.gradient_accumulation_steps
        for _ in range(n):
            x, y, *seg = self.source.batch("train", cfg.batch_size, self.block_size, self.rng)
            _, loss = model.forward(
                x,
                y,
                segments=seg[0] if seg else None,
                rng=self.dropout_rng if model.config.dropout or model.config.attention_dropout_p else None,
            )
            model.dlogits /= n  # the mean over micro-batches
            model.backward()
        self.last_loss = loss
        if not math.isfinite(loss):
            raise BarkError(
                f"the loss became {loss} at step {st.step}; the last good checkpoint in {self.out_dir / 'last'} is kept. Lower --learning-rate"
            )
        with self.sigint.critical():
            self.update(lr, t_step)
        if self.bar is not None:
            self.bar.update(1)
        if self.eval_due():
            st.elapsed_s = self.elapsed0 + time.perf_counter() - self.t_start
            losses = self.evaluate()
            if self.bar is not None:
                self.bar.write(
                    f"step {st.step}: train {losses['train']:.4f}, val {losses['val']:.4f} (perplexity {math.exp(losses['val']):.2f})"
                )
            self.t_log, self.tok_log = time.perf_counter(), 0

    def update(self, lr: float, t_step: float) -> None:
        """Clip, step AdamW, count the step and its tokens, and log it when due (SIGINT held)."""
        cfg, st = self.cfg, self.state
        if cfg.grad_clip > 0:
            clip_grad_norm(self.model.flat_grad, cfg.grad_clip)
        self.optimizer.step(lr)
        st.step += 1
        self.snap, self.last_is_current = None, False
        st.eval_pending = self.eval_due()
        self.loop_s += time.perf_counter() - t_step
        st.tokens_seen += self.tokens_per_iter
        self.tok_log += self.tokens_per_iter
        if st.step % cfg.log_interval == 0 or st.step == cfg.max_iters:
            now = time.perf_counter()
            tps = self.tok_log / max(now - self.t_log, 1e-9)
            st.elapsed_s = self.elapsed0 + now - self.t_start
            row = {
                "step": st.step,
                "train_loss": round(self.last_loss, 5),
                "lr": lr,
                "tokens_per_s": round(tps, 1),
                "elapsed_s": round(st.elapsed_s, 3),
            }
            append_row(self.metrics_path, row)
            self.t_log, self.tok_log = now, 0
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")

    def estimate_loss(self) -> dict:
        """Loss and bits per byte over ``source.eval_batches`` of each split, as
        ``barkgpt.train.estimate_loss``: ``{"train", "val", "train_bpb", "val_bpb"}``."""
        out = {}
        for split in ("train", "val"):
            sums = np.zeros(4)
            for x, y, *seg in self.source.eval_batches(split, self.cfg.eval_iters, self.cfg.batch_size, self.block_size):
                self.model.forward(x, y, segments=seg[0] if seg else None)
                sums += nll_and_bytes(self.model.nll, y, self.token_bytes)
            out[split] = float(sums[0] / max(sums[1], 1))
            out[f"{split}_bpb"] = bits_per_byte(float(sums[2]), int(sums[3]))
        return out

    def evaluate(self) -> dict:
        """Evaluate, then write the val row, the sample, ``best/`` (when better), ``last/`` and the plots."""
        st = self.state
        st.eval_pending = True
        losses = self.estimate_loss()
        append_row(
            self.metrics_path,
            {
                "step": st.step,
                "val_loss": round(losses["val"], 5),
                "val_perplexity": round(math.exp(min(losses["val"], 50)), 4),
                "val_bpb": round(losses["val_bpb"], 5),
                "eval_train_loss": round(losses["train"], 5),
                "elapsed_s": round(st.elapsed_s, 3),
            },
        )
        self.write_sample()
        if losses["val"] < st.best_val_loss:
            self.save("best", losses)
            st.best_val_loss = losses["val"]
        st.eval_pending = False
        self.save("last", losses)
        self.last_is_current = True
        plot_run(self.out_dir)
        self.losses = losses
        return losses

    def write_sample(self) -> None:
        """Sample one document (or a reply to ``cfg.sample_prompt``), at most 64 tokens, seeded
        by the step, into ``samples.jsonl``."""
        tok, step = self.tokenizer, self.state.step
        ids = (tok.encode(self.cfg.sample_prompt) if self.cfg.sample_prompt else [tok.eos_id])[-self.block_size :]
        steps = Engine(self.model).generate(
            ids, max_new_tokens=min(64, self.block_size), temperature=0.8, top_k=50, seed=step, stop_ids=[tok.eos_id]
        )
        text = tok.decode([s[0] for s in steps if s[0] is not None and s[0] != tok.eos_id])
        append_row(self.samples_path, {"step": step, "prompt": self.cfg.sample_prompt, "text": text})

    def save(self, name: str, losses: dict | None = None) -> None:
        """Save ``best/`` or ``last/`` (with the trainer state; inside a step, its start-of-step states)."""
        st = self.state
        info = {**self.info, "step": st.step, "tokens_seen": st.tokens_seen, **({"val_loss": losses["val"]} if losses else {})}
        state = None
        if name == "last":
            sampler, dropout = self.snap or (self.rng.bit_generator.state, self.dropout_rng.bit_generator.state)
            state = dataclasses.replace(st, sampler=sampler, rng={"dropout": dropout})
        save_checkpoint(self.out_dir / name, self.model, self.tokenizer, info, state, self.optimizer)

    def save_interrupted(self) -> None:
        """After a SIGINT: save ``last/`` unless it holds this state already, and say how to go on."""
        self.state.elapsed_s = self.elapsed0 + time.perf_counter() - self.t_start
        if not self.last_is_current:
            self.save("last")
        if not self.quiet:
            print(f"\ninterrupted: saved {self.out_dir / 'last'} at step {self.state.step}; continue with --resume")

    def summary(self, interrupted: bool) -> dict:
        """``barkgpt.train.train``'s summary dict."""
        st = self.state
        tps = (st.step - self.step0) * self.tokens_per_iter / max(self.loop_s, 1e-9)
        return {
            "step": st.step,
            "train_loss": self.last_loss,
            "val_loss": self.losses["val"] if self.losses else None,
            "best_val_loss": st.best_val_loss,
            "tokens_per_s": tps,
            "mfu": None,
            "train_seconds": self.loop_s,
            "elapsed_s": self.elapsed0 + time.perf_counter() - self.t_start,
            "interrupted": interrupted,
        }
