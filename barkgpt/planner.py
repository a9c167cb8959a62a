"""The run planner: ``barkgpt train --data X --budget 10m`` sizes a run to a wall-clock budget.

With no preset, the plan (1) prepares the data, with a tokenizer chosen by corpus size;
(2) measures this machine: one thread against all cores, then seconds per training step of a
ladder of model shapes, a few steps each, smallest first; (3) picks the shape whose measured
speed gives the lowest predicted loss in the time left, and the batch, optimizer, learning rate,
warmup, steps, dropout and compile that go with it, so that the whole run (preparation,
measuring, compile, training, evaluations, checkpoints) ends within the budget. The clock runs
from process start. The trainer then keeps the promise: ``TrainConfig.fit_to_time`` re-fits the
steps to the measured step and evaluation times (after ``REFIT_STEPS`` steps, which hold the
compile, and after each evaluation, as the machine's load drifts), ``TrainConfig.max_time``
stops the run in time for its final evaluation and checkpoint, and :class:`StepClock` gives the
progress bar its ETA from the measured times.

The rules, each with its source (tuned on this project's 2-core CPU; ``bench/bench_autopilot.py``
compares the plan with a grid of sizes and learning rates at the same wall clock):

- Loss as a function of parameters N and tokens D: Chinchilla's fit L = E + A/N^a + B/D^b
  (Hoffmann et al. 2022, eq. 10, Approach 3), whose optimum is ~20 tokens per parameter.
- Repeated data is worth less: D' = U + U R* (1 - exp(-R/R*)) effective tokens for U unique
  tokens seen R more times, R* = 15.4 (Muennighoff et al. 2023, "Scaling Data-Constrained
  Language Models", eq. 5); up to ~4 epochs are about as good as fresh data, and beyond
  ``EPOCH_CAP`` passes more steps buy almost nothing, so the plan stops there.
- Dropout when data repeats: 0.1 past 4 epochs, 0.2 past 16 (nanoGPT's shakespeare-char recipe
  trains its ~30 epochs with 0.2).
- Tokenizer by corpus size: characters for small corpora (nanoGPT's tiny Shakespeare), byte-level
  BPE with a vocabulary that grows with the corpus above (Tao et al. 2024, "Scaling Laws with
  Vocabulary": the best vocabulary grows with compute and data).
- Shapes: llama family (RoPE, RMSNorm, SwiGLU, multi-query attention), the faster one on CPU
  (bench/RESULTS.md); head_dim 32 below 384 wide and 64 from there; depth grows with width
  (as nanochat's ``--depth`` dial ties width to depth).
- AdamW (Loshchilov & Hutter 2019), beta2 0.99 for small batches (nanoGPT's shakespeare-char),
  peak learning rate 2e-3 at 128 wide, scaled by (128/n_embd)^0.5, warmup 5% of the steps
  (10 to 200), cosine to a tenth (Chinchilla's schedule).
- Compile when it pays: on CPU torch.compile costs ~20 s cold for ~1.3x faster steps
  (bench/RESULTS.md), so it pays in runs of 5 minutes or more; on a GPU from 2 minutes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from barkgpt.common import BarkError, resolve_device, resolve_dtype
from barkgpt.config import GPTConfig, TrainConfig

DEFAULT_BUDGET_S = 600.0  # `barkgpt train --data X` alone plans for 10 minutes
MIN_BUDGET_S = 10.0  # below this nothing useful trains: preparing and one evaluation take seconds
CHINCHILLA = {"A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022, eq. 10
CHINCHILLA_TOKENS_PER_PARAM = 20  # the compute-optimal ratio of that fit
REPEAT_R_STAR = 15.4  # Muennighoff et al. 2023, eq. 5
EPOCH_CAP = 16  # passes over the data after which the plan stops (Muennighoff et al. 2023, fig. 3)
DROPOUT_RULES = ((16, 0.2), (4, 0.1))  # (more epochs than, dropout)
CHAR_MAX_BYTES = 4 << 20  # corpora under 4 MiB are tokenized by character
BPE_VOCAB_RULES = ((64 << 20, 2048), (1 << 30, 8192))  # (corpus under N bytes, vocabulary); above: 32768
BPE_VOCAB_LARGE = 32768
MIN_CORPUS_TOKENS = 4096  # a train split below this is too small for any model
MIN_STEPS = 30  # a plan with fewer steps than this is refused: the budget is too small
# (n_layer, n_embd): the shapes measured, smallest first
LADDER = ((2, 64), (3, 96), (4, 128), (4, 192), (6, 256), (6, 384), (8, 512), (12, 768), (16, 1024), (24, 1536))
MEASURE_SHARE = 0.06  # at most this share of the budget (at least 3 s) goes to measuring shapes
EVALS = 5  # evaluations in a planned run (the last at its end)
REFIT_STEPS = 20  # the trainer re-fits max_iters to the deadline once, after this many measured steps (fit_to_time)
SETUP_S = 1.0  # seconds before the plan's clock started (imports) and between planning and step 0
EXIT_RESERVE_S = 2.0  # the deadline leaves this for the process to end (torch's teardown takes ~1 s on a busy machine)
COMPILE_MIN_BUDGET_S = {"cpu": 300.0, "cuda": 120.0}
COMPILE_FIRST_S = {"cpu": 25.0, "cuda": 40.0}  # the compile's first step, reserved; the trainer re-fits its steps after it
LR_BASE, LR_WIDTH = 2e-3, 128  # peak AdamW learning rate at 128 wide


def parse_budget(text: str) -> float:
    """Seconds in a budget such as ``90s``, ``10m``, ``2h``, ``1h30m`` or ``45`` (seconds).

    Raises:
        BarkError: not such a duration, or not positive.
    """
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text or "")
    if not parts or not any(parts.groups()):
        raise BarkError(f"--budget {text!r} is not a duration; write 90s, 10m, 2h or 1h30m")
    h, m, s = (float(g) if g else 0.0 for g in parts.groups())
    seconds = 3600 * h + 60 * m + s
    if seconds <= 0:
        raise BarkError(f"--budget {text!r} is not positive; give 10m, say")
    return seconds


def format_duration(seconds: float) -> str:
    """``90`` -> ``1m30s``; ``600`` -> ``10m``; ``7.5`` -> ``7.5s``."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s else "")


def process_start_time() -> float:
    """When this process started (``time.time()`` seconds), from ``/proc``; now where there is none."""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + float(stat[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime in clock ticks
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


# ---- the rules ------------------------------------------------------------------------------


def choose_tokenizer(n_bytes: int) -> tuple[str, int | None]:
    """``(kind, vocab_size)`` for a corpus of ``n_bytes``: char under ``CHAR_MAX_BYTES``, else bpe
    with a vocabulary by size (``BPE_VOCAB_RULES``)."""
    if n_bytes < CHAR_MAX_BYTES:
        return "char", None
    return "bpe", next((v for limit, v in BPE_VOCAB_RULES if n_bytes < limit), BPE_VOCAB_LARGE)


def shape(n_layer: int, n_embd: int, block_size: int, vocab_size: int, dropout: float = 0.0) -> GPTConfig:
    """The ladder's model at (``n_layer``, ``n_embd``): llama family, head_dim 32 below 384 wide
    and 64 from there, one key/value head per 4 query heads."""
    n_head = max(1, n_embd // (32 if n_embd < 384 else 64))
    n_kv = max(1, n_head // 4)
    while n_head % n_kv:
        n_kv -= 1
    return GPTConfig(
        family="llama",
        vocab_size=vocab_size,
        block_size=block_size,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv,
        n_embd=n_embd,
        dropout=dropout,
    )


def block_size_for(n_embd: int, device: str) -> int:
    """Context length: 64 tokens up to 128 wide, 128 up to 384, 256 above (512 on a GPU)."""
    if n_embd <= 128:
        return 64
    if n_embd <= 384:
        return 128
    return 512 if device.startswith("cuda") else 256


def batch_size_for(block_size: int, device: str) -> int:
    """Windows per step: 1,024 tokens a step on CPU (small models learn most per token with
    small batches; McCandlish et al. 2018's critical batch starts small), 32Ki on a GPU."""
    tokens = 32768 if device.startswith("cuda") else 1024
    return max(4, tokens // block_size)


def predicted_loss(n_params: int, tokens: float, unique_tokens: int) -> float:
    """Chinchilla's reducible loss A/N^a + B/D'^b, with D' the effective tokens of ``tokens``
    drawn from ``unique_tokens`` (Muennighoff et al. 2023's repetition discount)."""
    c = CHINCHILLA
    u = min(tokens, unique_tokens)
    repeats = tokens / max(u, 1) - 1
    effective = u + u * REPEAT_R_STAR * (1 - math.exp(-repeats / REPEAT_R_STAR))
    return c["A"] / max(n_params, 1) ** c["alpha"] + c["B"] / max(effective, 1) ** c["beta"]


def dropout_for(epochs: float) -> float:
    """Dropout for a run over its data ``epochs`` times (``DROPOUT_RULES``)."""
    return next((p for limit, p in DROPOUT_RULES if epochs > limit), 0.0)


def learning_rate_for(n_embd: int) -> float:
    """Peak AdamW learning rate: ``LR_BASE`` at ``LR_WIDTH`` wide, scaled by (LR_WIDTH/n_embd)^0.5."""
    return round(LR_BASE * (LR_WIDTH / n_embd) ** 0.5, 5)


def memory_bytes(model: GPTConfig, n_params: int, batch_size: int) -> int:
    """Training memory estimate in bytes: fp32 weights, gradients and AdamW's two moments (16 bytes
    a parameter) plus activations, ~34 bytes per token, layer and width and 5 per attention score
    (Korthikanti et al. 2022, eq. 1, for 16-bit; twice that in fp32), and the logits."""
    b, t = batch_size, model.block_size
    acts = 2 * model.n_layer * b * t * (34 * model.n_embd + 5 * model.n_head * t)
    return 16 * n_params + acts + 3 * 4 * b * t * model.vocab_size


# ---- measuring this machine -----------------------------------------------------------------


@dataclass
class Timing:
    """One shape's measured speed: ``first_s`` (the first step: allocation, compile), ``step_s``
    (median seconds of the later steps), and the model's size."""

    model: GPTConfig
    batch_size: int
    compile: bool
    first_s: float
    step_s: float
    n_params: int
    flops_per_token: int
    loss: float = math.inf  # predicted_loss in the plan's time (set by measure_ladder)

    @property
    def tokens_per_s(self) -> float:
        """Training tokens per second at ``step_s``."""
        return self.batch_size * self.model.block_size / self.step_s


def measure(
    model_cfg: GPTConfig, batch_size: int, device: str, compile: bool, max_s: float, steps: int = 4, give_up_s: float = math.inf
) -> Timing:
    """Time training steps (forward, backward, AdamW) of ``model_cfg`` on random (B, T) tokens:
    one first step, then up to ``steps`` more or until ``max_s`` seconds have passed; a first
    step slower than ``give_up_s`` ends it (its time is then the step time too).

    The run's own setup is copied (CPU attention kernel and flushed denormals with compile on CPU,
    bf16 autocast on CUDA), so the speed is the one training will see.
    """
    import contextlib

    import torch

    from barkgpt import cpu_attention
    from barkgpt.common import compile_fn
    from barkgpt.model import GPT
    from barkgpt.optim import build_optimizers

    dtype = resolve_dtype("auto", device)
    if device == "cpu":
        if compile:
            cpu_attention.load(quiet=True)
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device).train()
    optimizers = build_optimizers(model, TrainConfig(), device)
    fn = compile_fn(model, device) if compile else model
    autocast = torch.autocast("cuda", dtype=getattr(torch, dtype)) if dtype != "float32" else contextlib.nullcontext()
    x = torch.randint(model_cfg.vocab_size, (batch_size, model_cfg.block_size + 1), device=device)
    times, t_end = [], time.perf_counter() + max_s
    try:
        while len(times) < steps + 1 and (len(times) < 2 or time.perf_counter() < t_end):
            if len(times) == 1 and times[0] > give_up_s:
                times.append(times[0])
                break
            t = time.perf_counter()
            with autocast:
                _, loss = fn(x[:, :-1], x[:, 1:])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
    finally:
        torch.set_flush_denormal(False)
    return Timing(
        model_cfg, batch_size, compile, times[0], statistics.median(times[1:]), model.num_params(), model.flops_per_token()
    )


def measure_ladder(
    vocab_size: int,
    limit_block: int,
    device: str,
    model_over: dict,
    batch_size: int | None,
    plan_s: float,
    allowance_s: float,
    unique_tokens: int,
) -> tuple[Timing, list[Timing]]:
    """Measure the ladder's shapes (with the user's model flags applied), smallest first, and
    return the one with the lowest :func:`predicted_loss` in ``plan_s`` seconds of training, and
    all timings. Stops when two larger shapes in a row predict worse, or after ``allowance_s``.

    Raises:
        BarkError: the user's model flags fit no shape (the shape's own error).
    """
    t_end, seen, timings, best, worse, error = time.perf_counter() + allowance_s, set(), [], None, 0, None
    for n_layer, n_embd in LADDER:
        try:
            cfg = candidate(n_layer, n_embd, vocab_size, limit_block, device, model_over)
        except BarkError as e:
            error = e
            continue
        if repr(cfg) in seen:
            continue
        seen.add(repr(cfg))
        left = t_end - time.perf_counter()
        if timings and (left <= 0 or 2 * 3 * timings[-1].step_s > left):  # the next shape is ~2-3x slower
            break
        bs = batch_size or batch_size_for(cfg.block_size, device)
        timing = measure(cfg, bs, device, compile=False, max_s=max(min(2.0, left / 2), 0.1))
        timings.append(timing)
        tokens = min(timing.tokens_per_s * plan_s, EPOCH_CAP * unique_tokens)
        timing.loss = predicted_loss(timing.n_params, tokens, unique_tokens)
        if best is None or timing.loss < best.loss:
            best, worse = timing, 0
        else:
            worse += 1
            if worse == 2:
                break
    if best is None:
        raise error or BarkError("no model shape fits; drop the model flags")
    return best, timings


def candidate(n_layer: int, n_embd: int, vocab_size: int, limit_block: int, device: str, model_over: dict) -> GPTConfig:
    """The ladder's shape at (``n_layer``, ``n_embd``) with the user's model flags on top (the
    heads and context follow the user's width; the user's heads are all key/value heads unless
    ``--n-kv-head`` says).

    Raises:
        BarkError: the flags make no valid model.
    """
    n_layer, n_embd = model_over.get("n_layer", n_layer), model_over.get("n_embd", n_embd)
    base = shape(n_layer, n_embd, min(block_size_for(n_embd, device), limit_block), vocab_size)
    raw = {k: getattr(base, k) for k in ("family", "vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd")}
    if {"n_head", "family"} & set(model_over) and "n_kv_head" not in model_over:
        raw["n_kv_head"] = None
    return GPTConfig(**{**raw, **model_over})


@dataclass
class Plan:
    """A planned run: the configs to train with and the numbers of the pre-flight table.

    Attributes:
        model, train: the configs (``train.max_time`` is set at launch, :meth:`launch_config`).
        budget_s: the whole run's wall clock, from process start.
        started: process start (``time.time()``).
        timing: the chosen shape's measured speed (compiled when ``train.compile``).
        notes: lines the table ends with (flags that overrode the plan, a corpus too small).
    """

    model: GPTConfig
    train: TrainConfig
    budget_s: float
    started: float
    timing: Timing
    corpus: dict
    prepare_s: float
    measure_s: float
    eval_s: float
    first_extra_s: float
    notes: list[str] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    threads: int = 0  # torch threads chosen (choose_threads)
    thread_s: dict = field(default_factory=dict)  # threads -> measured seconds per step of the small shape
    user_flags: set = field(default_factory=set)  # the fields the user's flags set

    @property
    def tokens_per_step(self) -> int:
        """Training tokens of one optimizer step."""
        return self.train.batch_size * self.train.gradient_accumulation_steps * self.model.block_size

    def forecast_end(self) -> float:
        """The forecast end (``time.time()`` seconds) of the run as planned."""
        train_s = self.train.max_iters * self.timing.step_s + self.first_extra_s
        evals = math.ceil(self.train.max_iters / self.train.eval_interval)
        return self.started + self.prepare_s + self.measure_s + SETUP_S + train_s + evals * self.eval_s

    def launch_config(self) -> TrainConfig:
        """The TrainConfig to train with now: ``max_time`` the budget's remainder (minus a second
        for the process to end), unless the user gave ``--max-time``."""
        if "max_time" in self.user_flags:
            return self.train
        return dataclasses.replace(self.train, max_time=self.time_left())

    def time_left(self) -> float:
        """Seconds from now to the budget's end, less ``EXIT_RESERVE_S`` (at least 1)."""
        return max(self.budget_s - (time.time() - self.started) - EXIT_RESERVE_S, 1.0)

    def table(self) -> str:
        """The pre-flight table: what the plan chose, what it forecasts and why."""
        return preflight_table(self)


def preflight_table(p: Plan) -> str:
    """The rows of :meth:`Plan.table`."""
    m, t, tm, c = p.model, p.train, p.timing, p.corpus
    total = t.max_iters * p.tokens_per_step
    epochs = total / max(c["train_tokens"], 1)
    rows = [
        ("data", f"{c['source']}: {c['bytes']:,} bytes -> {c['train_tokens']:,} train + {c['val_tokens']:,} val tokens"),
        ("tokenizer", f"{c['tokenizer']}, vocab {m.vocab_size}"),
        (
            "model",
            f"{m.family}, n_layer {m.n_layer}, n_head {m.n_head} (kv {m.n_kv_head}), n_embd {m.n_embd}, "
            f"block_size {m.block_size}: {tm.n_params / 1e6:.2f}M parameters",
        ),
        ("batch", f"{t.batch_size} x {m.block_size} = {p.tokens_per_step:,} tokens/step"),
        (
            "optimizer",
            f"{t.optimizer}, lr {t.learning_rate:g} (warmup {t.warmup_iters}, cosine to {t.min_lr:g}), "
            f"dropout {m.dropout:g}, compile {'on' if t.compile else 'off'}",
        ),
        (
            "steps",
            f"{t.max_iters:,} at {tm.step_s * 1e3:.1f} ms/step measured ({tm.tokens_per_s:,.0f} tokens/s, "
            f"{p.threads} thread{'s' if p.threads != 1 else ''}), eval every {t.eval_interval}; "
            f"re-fitted to the deadline after {REFIT_STEPS} steps and each eval",
        ),
        ("total tokens", f"{total / 1e6:.2f}M = {epochs:.1f} epochs over the train split"),
        ("FLOPs", f"{tm.flops_per_token * total:.2e} ({tm.flops_per_token / 1e6:.1f} MFLOPs/token)"),
        ("tokens/param", f"{total / tm.n_params:.1f} (Chinchilla: ~{CHINCHILLA_TOKENS_PER_PARAM})"),
        ("memory", f"~{memory_bytes(m, tm.n_params, t.batch_size) / 2**20:.0f} MiB to train"),
        (
            "time",
            f"prepare {p.prepare_s:.1f}s + measure {p.measure_s:.1f}s + train ~{t.max_iters * tm.step_s + p.first_extra_s:.0f}s "
            f"+ evals ~{math.ceil(t.max_iters / t.eval_interval) * p.eval_s:.0f}s",
        ),
        (
            "forecast end",
            f"{time.strftime('%H:%M:%S', time.localtime(p.forecast_end()))} "
            f"({p.forecast_end() - p.started:.0f}s of the {format_duration(p.budget_s)} budget, which ends "
            f"{time.strftime('%H:%M:%S', time.localtime(p.started + p.budget_s))})",
        ),
    ]
    shapes = ", ".join(f"{x.model.n_layer}x{x.model.n_embd} {x.step_s * 1e3:.0f} ms" for x in p.timings)
    threads = ", ".join(f"{n} thread{'s' if n != 1 else ''} {sec * 1e3:.0f} ms" for n, sec in p.thread_s.items())
    rows.insert(5, ("measured", f"{shapes} a step (n_layer x n_embd){'; ' + threads if threads else ''}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"  {k:<{width}}  {v}" for k, v in rows] + [f"  note: {n}" for n in p.notes]
    return "\n".join(lines)


# ---- the plan -------------------------------------------------------------------------------


def plan_run(budget_s: float, overrides: dict, started: float | None = None) -> Plan:
    """Plan a run of ``budget_s`` seconds over ``overrides["data"]`` (see the module docstring).

    Args:
        budget_s: the whole run's wall clock in seconds, from ``started``.
        overrides: the user's GPTConfig and TrainConfig flags (``data`` among them); each one
            replaces the plan's choice, and the table says so.
        started: when the clock started (``time.time()``); None: process start.

    Returns:
        The :class:`Plan`; :meth:`Plan.launch_config` gives the TrainConfig to train with.

    Raises:
        BarkError: no ``--data``, a budget or corpus too small (one line with what to do),
            or any data or config error.
    """
    started = process_start_time() if started is None else started
    if budget_s < MIN_BUDGET_S:
        raise BarkError(f"a {format_duration(budget_s)} budget is too short to train anything; give --budget 1m or more")
    model_keys = {f.name for f in dataclasses.fields(GPTConfig)}
    model_over = {k: v for k, v in overrides.items() if k in model_keys}
    train_over = {k: v for k, v in overrides.items() if k not in model_keys}
    if not train_over.get("data"):
        raise BarkError("--budget plans a run over your text: pass --data FILE_OR_FOLDER")
    base = TrainConfig(
        **{
            k: v
            for k, v in train_over.items()
            if k in ("data", "out_dir", "device", "text_field", "tokenizer", "tokenizer_vocab_size")
        }
    )
    device = resolve_device(base.device)
    t0 = time.perf_counter()
    data_dir, corpus = prepare_for_plan(base, train_over)
    prepare_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocab = model_over.get("vocab_size") or corpus["vocab_size"]
    limit_block = 2 ** int(math.log2(max(2, min(corpus["train_tokens"], corpus["val_tokens"]) // 2)))
    plan_s = budget_s - (time.time() - started)
    if plan_s < MIN_BUDGET_S / 2:
        raise BarkError(
            f"the {format_duration(budget_s)} budget leaves {max(plan_s, 0):.0f}s after preparing the data ({prepare_s:.0f}s), "
            f"too little to measure and train; give --budget {format_duration(max(60, 2 * budget_s))} or more"
        )
    allowance = max(3.0, MEASURE_SHARE * budget_s)
    threads, thread_s = choose_threads(vocab, device)
    best, timings = measure_ladder(
        vocab, limit_block, device, model_over, train_over.get("batch_size"), plan_s * 0.85, allowance, corpus["train_tokens"]
    )
    compile = train_over.get("compile", budget_s >= COMPILE_MIN_BUDGET_S.get(device.split(":")[0], math.inf))
    first_extra = COMPILE_FIRST_S.get(device.split(":")[0], 30.0) if compile else 0.0
    measure_s = time.perf_counter() - t0
    plan = Plan(best.model, base, budget_s, started, best, corpus, prepare_s, measure_s, 0.0, first_extra, timings=timings)
    plan.threads, plan.thread_s = threads, thread_s
    schedule(plan, train_over, model_over, str(data_dir), compile)
    return plan


def prepare_for_plan(base: TrainConfig, train_over: dict) -> tuple[Path, dict]:
    """Prepare ``base.data`` into ``out_dir/data`` with the tokenizer the corpus size calls for
    (:func:`choose_tokenizer`, unless ``--tokenizer`` says), or reuse a prepared folder.

    Returns:
        The prepared folder, and ``corpus``: ``source``, ``bytes``, ``tokenizer``, ``vocab_size``,
        ``train_tokens``, ``val_tokens``.

    Raises:
        BarkError: a missing or unreadable input, or a corpus too small for any model.
    """
    from barkgpt.data import builtin_dataset, prepare_dataset, read_meta
    from barkgpt.readers import list_input

    src, target = Path(base.data), Path(base.out_dir) / "data"
    if builtin_dataset(base.data) is not None:
        raise BarkError(
            f"--budget plans runs over text files; {base.data} is a built-in dataset with its own preset: barkgpt train --preset {base.data}"
        )
    if (src / "meta.json").is_file():
        target, n_bytes = src, None
    else:
        n_bytes = sum(list_input(src, base.text_field)[1])
        kind, vocab = choose_tokenizer(n_bytes)
        if "tokenizer" in train_over:
            kind, vocab = base.tokenizer, base.tokenizer_vocab_size
        elif "tokenizer_vocab_size" in train_over:
            vocab = base.tokenizer_vocab_size
        old = read_meta(target) if (target / "meta.json").is_file() else {}
        same = old.get("source") == str(src.resolve()) and old.get("tokenizer") == kind and vocab in (None, old.get("vocab_size"))
        if not same:
            prepare_dataset(src, target, tokenizer=kind, vocab_size=vocab, text_field=base.text_field)
    meta = read_meta(target)
    corpus = {k: meta[k] for k in ("tokenizer", "vocab_size", "train_tokens", "val_tokens")}
    corpus.update(source=str(src), bytes=n_bytes if n_bytes is not None else meta["train_tokens"] + meta["val_tokens"])
    if meta["train_tokens"] < MIN_CORPUS_TOKENS:
        raise BarkError(
            f"{src} holds only {meta['train_tokens']:,} training tokens ({meta['tokenizer']}), too few for a useful model; "
            f"give it more text (at least ~{MIN_CORPUS_TOKENS * 4 // 1024} KB)"
        )
    return target, corpus


def choose_threads(vocab_size: int, device: str) -> tuple[int, dict]:
    """Measure a small shape with 1 thread and with all cores, and keep the faster setting
    (``torch.set_num_threads``). On a machine whose cores other jobs are using, one thread can be
    several times faster than two that wait for each other. CPU only; returns ``(threads,
    {threads: seconds per step})``."""
    import torch

    if device != "cpu" or (os.cpu_count() or 1) == 1:
        return torch.get_num_threads(), {}
    cfg = shape(2, 64, 64, vocab_size)
    seconds = {}
    for n in dict.fromkeys((1, os.cpu_count() or 1)):  # one thread first: its time bounds the other's
        torch.set_num_threads(n)
        seconds[n] = measure(
            cfg, 16, device, compile=False, max_s=0.5, steps=3, give_up_s=3 * min(seconds.values(), default=math.inf)
        ).step_s
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds


def eval_seconds(timing: Timing, eval_iters: int) -> float:
    """Forecast seconds of one evaluation: 2 splits x ``eval_iters`` forward passes (a third of a
    training step each), a 64-token sample, two checkpoint saves and the plot."""
    save_s = 2 * timing.n_params * 4 * 3 / 200e6  # weights + AdamW moments at ~200 MB/s
    return 2 * eval_iters * timing.step_s / 3 + 64 * timing.step_s / max(timing.batch_size, 1) + save_s + 0.6


def schedule(plan: Plan, train_over: dict, model_over: dict, data_dir: str, compile: bool) -> None:
    """Fill ``plan.train`` and ``plan.model``: steps that fit the time left, warmup, learning rate,
    dropout by epochs, evaluations; then the user's flags on top (noted in ``plan.notes``).

    Raises:
        BarkError: the budget leaves too little time to train (one line with what to do).
    """
    tm, corpus = plan.timing, plan.corpus
    plan.user_flags = set(train_over) | set(model_over)
    evals = EVALS if plan.budget_s >= 60 else 2
    eval_iters = 20 if plan.budget_s >= 60 else 8
    plan.eval_s = eval_seconds(tm, eval_iters)
    # the seconds to train: the budget less what has passed, the exit, setup, compile, evals and the first plot (1 s)
    left = (
        plan.budget_s - (time.time() - plan.started) - EXIT_RESERVE_S - SETUP_S - plan.first_extra_s - evals * plan.eval_s - 1.0
    )
    steps = int(left / tm.step_s)
    if steps < MIN_STEPS:
        raise BarkError(
            f"the {format_duration(plan.budget_s)} budget leaves {max(left, 0):.0f}s to train after preparing the data "
            f"({plan.prepare_s:.0f}s) and measuring ({plan.measure_s:.0f}s), under {MIN_STEPS} steps; give --budget "
            f"{format_duration(max(60, 2 * plan.budget_s))} or more"
        )
    tokens_per_step = tm.batch_size * tm.model.block_size
    cap = EPOCH_CAP * corpus["train_tokens"] // tokens_per_step
    if steps > cap:
        plan.notes.append(
            f"the corpus is small for this budget: the plan stops after {EPOCH_CAP} passes over its "
            f"{corpus['train_tokens']:,} train tokens ({cap:,} of the {steps:,} steps that fit); add text to use the whole budget"
        )
        steps = cap
    epochs = steps * tokens_per_step / corpus["train_tokens"]
    chosen = {
        "learning_rate": learning_rate_for(tm.model.n_embd),
        "warmup_iters": max(10, min(200, steps // 20)),
        "max_iters": steps,
        "batch_size": tm.batch_size,
        "eval_interval": max(1, math.ceil(steps / evals)),
        "eval_iters": eval_iters,
        "log_interval": max(1, min(50, steps // 100)),
        "compile": compile,
        "fit_to_time": True,
        "max_time": plan.time_left(),
        "beta2": 0.99,
        "weight_decay": 0.1,
    }
    chosen["min_lr"] = chosen["learning_rate"] / 10
    chosen["tokenizer"] = corpus["tokenizer"]  # what the data folder holds, for config.yaml
    if "max_iters" in train_over:  # the user's steps: the deadline still stops the run, the steps stay theirs
        chosen["fit_to_time"] = False
    for key, value in train_over.items():
        if key in chosen and value != chosen[key]:
            plan.notes.append(f"--{key.replace('_', '-')} {value} overrides the plan's {chosen[key]}")
    values = {**chosen, **train_over, "data": data_dir}
    if "learning_rate" in train_over and "min_lr" not in train_over:
        values["min_lr"] = values["learning_rate"] / 10
    if values["warmup_iters"] >= values["max_iters"]:
        values["warmup_iters"] = max(0, values["max_iters"] // 10)
    plan.train = TrainConfig(**values)
    dropout = model_over.get("dropout", dropout_for(epochs))
    if "dropout" in model_over and model_over["dropout"] != dropout_for(epochs):
        plan.notes.append(f"--dropout {model_over['dropout']} overrides the plan's {dropout_for(epochs)}")
    for key in sorted(model_over):
        if key != "dropout":
            plan.notes.append(f"--{key.replace('_', '-')} {model_over[key]} is yours (the plan measured shapes with it)")
    plan.model = dataclasses.replace(tm.model, dropout=dropout)


# ---- the forecast during the run ------------------------------------------------------------


class StepClock:
    """A run's clock: measured step and evaluation times, the ETA and the deadline.

    The trainer calls :meth:`step_done` after each step and :meth:`eval_done` after each
    evaluation. The first step (allocation, compile) is kept apart; later steps feed an
    exponential moving average (weight 0.1), so the ETA follows the machine's speed as it drifts.

    Args:
        max_time: seconds from this clock's creation to the deadline (None: no deadline).
    """

    def __init__(self, max_time: float | None):
        self.t0, self.max_time = time.perf_counter(), max_time
        self.first_s: float | None = None
        self.step_s: float | None = None
        self.eval_s: float | None = None

    def step_done(self, seconds: float) -> None:
        """Record one training step's seconds."""
        if self.first_s is None:
            self.first_s = seconds
        else:
            self.step_s = seconds if self.step_s is None else 0.9 * self.step_s + 0.1 * seconds

    def eval_done(self, seconds: float) -> None:
        """Record one evaluation's seconds (sample, checkpoints and plot included)."""
        self.eval_s = seconds

    def elapsed(self) -> float:
        """Seconds since the clock started."""
        return time.perf_counter() - self.t0

    def eval_guess(self) -> float:
        """An evaluation's seconds: the last one measured, else ~20 steps and 3 seconds."""
        if self.eval_s is not None:
            return self.eval_s
        # not the first step's time, which holds one-time costs (compile); the first evaluation has
        # its own (the plot's matplotlib import, the sampler), hence the 3 s
        return 20 * (self.step_s or 0.0) + 3.0

    def eta(self, steps_left: int, evals_left: int) -> float | None:
        """Forecast seconds to the end (None before a step is measured), capped by the deadline."""
        per_step = self.step_s or self.first_s
        if per_step is None:
            return None
        eta = steps_left * per_step + evals_left * self.eval_guess()
        return max(0.0, min(eta, self.max_time - self.elapsed())) if self.max_time is not None else eta

    def out_of_time(self) -> bool:
        """Whether one more step and the final evaluation would pass the deadline (with 50% and
        20% to spare: steps and evaluations vary by that much on a shared machine)."""
        if self.max_time is None:
            return False
        return self.elapsed() + 1.5 * (self.step_s or self.first_s or 0.0) + 1.2 * self.eval_guess() > self.max_time
