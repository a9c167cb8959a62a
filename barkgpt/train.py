"""The training loop: data, AdamW, warmup + cosine schedule, evaluation, checkpoints, resume.

In nanoGPT's ``train.py`` spirit, with what it leaves to the user done here: exact resume
(optimizer, step, data sampler and RNG states in ``last/trainer_state.pt``), atomic
checkpoints, Ctrl-C that saves, a NaN guard, ``metrics.jsonl`` and a ``loss.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from barkgpt.checkpoint import find_checkpoint, load_model, load_trainer_state, save_checkpoint
from barkgpt.common import BarkError, atomic_write_text, progress, resolve_device, resolve_dtype
from barkgpt.config import GPTConfig, TrainConfig, config_to_dict, dump_yaml
from barkgpt.data import get_batch, load_split, prepare_bark, prepare_dataset, read_meta
from barkgpt.engine import Engine
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer


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


def configure_optimizer(model: GPT, cfg: TrainConfig, device: str) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with weight decay on 2-D weights only (matmuls and
    embeddings), none on norms and biases; fused where the device supports it (CPU and CUDA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device.split(":")[0] in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


@torch.no_grad()
def estimate_loss(model: GPT, splits: dict, cfg: TrainConfig, block_size: int, device: str, autocast) -> dict:
    """Mean loss over ``eval_iters * batch_size`` windows of each split, evenly spaced from its
    start to its end.

    Evenly spaced windows instead of random ones: every eval sees the same windows, so evals are
    comparable across steps and runs, and the training sampler's state is untouched (exact
    resume). It is still a sample: on tiny Shakespeare's val split, 240 windows (20 batches of 12)
    land within about 0.02 nats of the loss over the whole split, while 20 random batches, as
    nanoGPT and the reference draw them, range from 1.64 to 1.72 for one model. Raise
    ``eval_iters`` for tighter figures.

    Returns:
        ``{"train": float, "val": float}`` in nats per token.
    """
    model.eval()
    out = {}
    for name, data in splits.items():
        starts = np.linspace(0, len(data) - block_size - 1, cfg.eval_iters * cfg.batch_size).astype(np.int64)
        losses = []
        for ix in np.array_split(starts, cfg.eval_iters):
            buf = np.asarray(data[ix[:, None] + np.arange(block_size + 1)], dtype=np.int64)  # (B, T+1)
            x, y = to_device((buf[:, :-1], buf[:, 1:]), device)
            with autocast:
                losses.append(model(x, y)[1].item())
        out[name] = float(np.mean(losses))
    model.train()
    return out


def to_device(batch, device: str):
    """Numpy (x, y) int64 arrays -> torch tensors on ``device`` (pinned, non-blocking on CUDA)."""
    x, y = (torch.from_numpy(a) for a in batch)
    if device.startswith("cuda"):
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Draw train and val loss (and learning rate) from ``metrics.jsonl`` into ``loss.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
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
    ax.set_title(f"{metrics_path.parent.name}")
    fig.tight_layout()
    tmp = png_path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, png_path)


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


def train(model_cfg: GPTConfig, cfg: TrainConfig, resume: bool = False, quiet: bool = False) -> dict:
    """Train a model and write checkpoints, metrics and plots to ``cfg.out_dir``.

    Args:
        model_cfg: the model shape (``vocab_size`` None takes the tokenizer's).
        cfg: the run settings.
        resume: continue from ``out_dir/last`` (optimizer, step, sampler and RNG states).
        quiet: no progress bar or start banner.

    Returns:
        Summary dict: ``step``, ``train_loss``, ``val_loss``, ``best_val_loss``, ``tokens_per_s``
        (over training steps only), ``train_seconds`` (time in training steps), ``elapsed_s``
        (wall clock of the whole run, across resumes), ``interrupted``.

    Raises:
        BarkError: bad data, a model that does not match the checkpoint on resume, a NaN loss
            (the last good checkpoint is kept).
    """
    out_dir = Path(cfg.out_dir)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    data_dir = resolve_data(cfg)
    meta = read_meta(data_dir)
    tokenizer = Tokenizer.load(data_dir)
    splits = {"train": load_split(data_dir, "train"), "val": load_split(data_dir, "val")}

    # ---- the model: fresh, from a checkpoint (fine-tuning), or resumed
    state = None
    if resume:
        last = out_dir / "last"
        try:
            ckpt = find_checkpoint(last)
        except BarkError:
            raise BarkError(f"--resume found no checkpoint in {last}; train without --resume first") from None
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
        model_cfg = model.config
    else:
        if model_cfg.vocab_size is None:
            model_cfg = dataclasses.replace(model_cfg, vocab_size=tokenizer.vocab_size)
        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg).to(device)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise BarkError(f"vocab_size {model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}; drop --vocab-size to use the tokenizer's")
    block_size = model_cfg.block_size
    for name, data in splits.items():
        if len(data) <= block_size + 1:
            raise BarkError(f"the {name} split has {len(data)} tokens, not more than block_size {block_size} + 1; lower --block-size or use more data")
    model.train()

    optimizer = configure_optimizer(model, cfg, device)
    rng = np.random.default_rng(cfg.seed)  # the batch sampler: its state is the data position
    step, best_val, tokens_seen = 0, float("inf"), 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["sampler"]
        set_rng_state(state["rng"])
        step, best_val, tokens_seen = state["step"], state["best_val_loss"], state["tokens_seen"]
    else:
        torch.manual_seed(cfg.seed + 1)  # dropout stream, independent of the init

    # ---- write the resolved config before step 0
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", dump_yaml(config_to_dict(model_cfg, cfg)))
    metrics_path = out_dir / "metrics.jsonl"
    if state is not None and metrics_path.exists():  # drop lines from after the resumed step
        keep = [l for l in metrics_path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
        atomic_write_text(metrics_path, "".join(l + "\n" for l in keep))
    elif state is None:
        atomic_write_text(metrics_path, "")
        (out_dir / "samples.jsonl").unlink(missing_ok=True)

    raw_model = model
    if device == "cpu":
        torch.set_flush_denormal(True)  # denormal floats in grads/optimizer state are ~100x slower on x86 (reset on return)
    if cfg.compile:
        model = torch.compile(model)
    autocast = torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(enabled=dtype == "float16")
    tokens_per_iter = cfg.batch_size * cfg.gradient_accumulation_steps * block_size
    if not quiet:
        print(f"model: {model_cfg.family}, {raw_model.num_params() / 1e6:.2f}M parameters, "
              f"{raw_model.flops_per_token() / 1e6:.1f} MFLOPs/token, head_dim {model_cfg.head_dim}; "
              f"{tokens_per_iter:,} tokens/iteration; device {device}, dtype {dtype}; "
              f"data {meta.get('train_tokens', len(splits['train'])):,} train tokens ({tokenizer.kind}, vocab {tokenizer.vocab_size})")

    info = {"data": {k: meta.get(k) for k in ("source", "source_sha256", "tokenizer", "train_tokens", "val_tokens")}}

    def checkpoint(name: str, last_loss: dict | None = None):
        extra = {**info, "step": step, "tokens_seen": tokens_seen, **({"val_loss": last_loss["val"]} if last_loss else {})}
        trainer_state = None
        if name == "last":
            trainer_state = {"optimizer": optimizer.state_dict(), "sampler": rng.bit_generator.state, "rng": rng_state(),
                             "step": step, "best_val_loss": best_val, "tokens_seen": tokens_seen, "elapsed_s": elapsed, "world_size": 1}
        save_checkpoint(out_dir / name, raw_model, tokenizer, extra, trainer_state)

    def log(row: dict):
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate():
        nonlocal best_val
        # eager model: a compiled one would recompile for eval mode and no_grad, for ~20 forwards
        losses = estimate_loss(raw_model, splits, cfg, block_size, device, autocast)
        log({"step": step, "val_loss": round(losses["val"], 5), "val_perplexity": round(math.exp(min(losses["val"], 50)), 4),
             "eval_train_loss": round(losses["train"], 5), "elapsed_s": round(elapsed, 3)})
        is_best = losses["val"] < best_val
        best_val = min(best_val, losses["val"])
        checkpoint("last", losses)
        if is_best:
            checkpoint("best", losses)
        write_sample()
        plot_losses(metrics_path, out_dir / "loss.png")
        return losses

    def write_sample():
        ids = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else [tokenizer.eos_id]
        ids = ids[-block_size:]
        toks = [s[0] for s in Engine(raw_model).generate(ids, max_new_tokens=min(64, block_size), temperature=0.8, top_k=50, seed=step)]
        raw_model.train()
        text = tokenizer.decode([t for t in toks if t is not None and t != tokenizer.eos_id])
        with open(out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, "prompt": cfg.sample_prompt, "text": text}) + "\n")

    def forward_backward(m, batches):
        """Accumulate gradients over the micro-batches; returns the last micro-batch's loss."""
        for x, y in batches:
            with autocast:
                _, loss = m(x, y)
            scaler.scale(loss / len(batches)).backward()
        return loss

    t_start = time.perf_counter()
    elapsed0 = state.get("elapsed_s", 0.0) if state else 0.0  # wall clock of the runs before a resume
    elapsed = elapsed0
    losses, interrupted, last_loss = None, False, float("nan")
    bar = progress(total=cfg.max_iters, desc="train", unit="step", initial=step) if not quiet else None
    t_log, tok_log = time.perf_counter(), 0
    loop_s, step0 = 0.0, step  # time in training steps only (no eval, checkpoints or plots)
    try:
        while step < cfg.max_iters:
            t_step = time.perf_counter()
            lr = get_lr(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [to_device(get_batch(splits["train"], cfg.batch_size, block_size, rng), device)
                       for _ in range(cfg.gradient_accumulation_steps)]
            try:
                loss = forward_backward(model, batches)
            except Exception as e:  # noqa: BLE001 - a failed compile falls back to eager, once
                if model is raw_model or step > step0:
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); training without compile")
                model = raw_model
                optimizer.zero_grad(set_to_none=True)
                loss = forward_backward(model, batches)
            last_loss = loss.item()
            if not math.isfinite(last_loss):
                raise BarkError(f"the loss became {last_loss} at step {step}; the last good checkpoint in {out_dir / 'last'} is kept. Lower --learning-rate or set --grad-clip 1.0")
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip, foreach=True)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loop_s += time.perf_counter() - t_step
            tokens_seen += tokens_per_iter
            tok_log += tokens_per_iter
            if bar is not None:
                bar.update(1)
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                now = time.perf_counter()
                tps = tok_log / max(now - t_log, 1e-9)
                elapsed = elapsed0 + now - t_start
                log({"step": step, "train_loss": round(last_loss, 5), "lr": lr, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 3)})
                if bar is not None:
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
                t_log, tok_log = now, 0
            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                elapsed = elapsed0 + time.perf_counter() - t_start
                losses = evaluate()
                if bar is not None:
                    bar.write(f"step {step}: train {losses['train']:.4f}, val {losses['val']:.4f} (perplexity {math.exp(losses['val']):.2f})")
                t_log, tok_log = time.perf_counter(), 0  # keep eval time out of tokens/s
    except KeyboardInterrupt:
        interrupted = True
        checkpoint("last")
        if not quiet:
            print(f"\ninterrupted: saved {out_dir / 'last'} at step {step}; continue with --resume")
    finally:
        if bar is not None:
            bar.close()
        torch.set_flush_denormal(False)  # process-wide state: back to the default for the caller
    total = elapsed0 + time.perf_counter() - t_start
    return {"step": step, "train_loss": last_loss, "val_loss": losses["val"] if losses else None,
            "best_val_loss": best_val, "tokens_per_s": (step - step0) * tokens_per_iter / max(loop_s, 1e-9),
            "train_seconds": loop_s, "elapsed_s": total, "interrupted": interrupted}
