"""Where a training step of the gpt2 path goes, against reference_gpt.py, in one run.

The gpt2 path is our trainer on reference_gpt.py's own architecture (``bench_train.gpt2_overrides``:
4x128, batch 12, block 64). This script answers "where does it lose, and how far could it go":

- **reference**: reference_gpt.py's ms per step (300 iterations, its own process, eager: its only mode).
- **phases**: our compiled step (the trainer's model, ``build_optimizers``' AdamW and its clip),
  timed in parts (forward, backward, clip, AdamW, zero_grad), the median of 100 steps after 30 of
  warmup. The trainer's own loop (batches from the prepared data, logging) is not in it:
  ``bench_train.py`` measures that.
- **gemm_floor_ms**: the same step's matrix multiplies alone, each Linear's forward and its two
  backward GEMMs at the step's shapes, timed in a loop: the time no trainer can go below without
  fewer FLOPs. ``reference_ms / gemm_floor_ms`` is the most any trainer could reach over the
  reference at these shapes on this machine; ``needed_other_ms`` is what may remain for
  everything else at 1.3x.
- **kernels** (``--kernels``): the torch profiler's table of one compile with inductor's kernel
  profiling on (``cpp_wrapper`` off, so each generated kernel is its own row), 20 steps.
- **compile_options** (``--ab``): ``cpp_wrapper`` on (the trainer's default), off, and
  ``max_autotune`` with inductor's C++ GEMM template, interleaved in rounds of 25 steps.

    python bench/profile_train_step.py [--kernels] [--ab] [--no-results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHARED, gpt2_overrides, write_results  # noqa: E402

SHAPE = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)
VARIANTS = {
    "cpp_wrapper": {"cpp_wrapper": True},
    "plain": {},
    "max_autotune_cpp_gemm": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"},
}


def make_step(options: dict, seed: int = 0):
    """A compiled gpt2-path training step and the model: ``step(times)`` runs one step on random
    (batch, block_size) windows of a 65-token stream and, given a dict, appends each phase's ms."""
    import torch

    from barkgpt.config import build_configs
    from barkgpt.model import GPT
    from barkgpt.optim import build_optimizers

    model_cfg, train_cfg = build_configs("shakespeare-char", overrides={**gpt2_overrides(SHAPE), "vocab_size": 69})
    torch.manual_seed(seed)
    model = GPT(model_cfg)
    compiled = torch.compile(model, options=options or None)
    (opt,) = build_optimizers(model, train_cfg, "cpu")  # the trainer's AdamW: groups, betas, fused
    data = torch.randint(0, 65, (200_000,))
    B, T = SHAPE["batch_size"], SHAPE["block_size"]

    def step(times: dict | None = None) -> None:
        ix = torch.randint(len(data) - T - 1, (B,))
        x = torch.stack([data[i : i + T] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + T] for i in ix])
        t = [time.perf_counter()]
        _, loss = compiled(x, y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip, foreach=True)
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        loss.item()
        t.append(time.perf_counter())
        if times is not None:
            for name, a, b in zip(("forward", "backward", "clip", "adamw", "zero_grad"), t, t[1:]):
                times.setdefault(name, []).append((b - a) * 1000)
            times.setdefault("step", []).append((t[-1] - t[0]) * 1000)

    return model, step


def gemm_floor_ms(model, rounds: int = 200) -> float:
    """ms per step of the step's GEMMs alone: for each Linear (the tied head included) at
    M = batch * block_size rows, the forward ``x @ W^T`` (M, K) x (K, N), the input gradient
    ``dY @ W`` and the weight gradient ``dY^T @ x``, each timed alone in a loop of ``rounds``
    (no bias: its add is not a GEMM)."""
    import torch

    M = SHAPE["batch_size"] * SHAPE["block_size"]
    total = 0.0
    for module in [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        N, K = module.weight.shape
        x, w, gy = torch.randn(M, K), torch.randn(N, K), torch.randn(M, N)
        for a, b in ((x, w.t()), (gy, w), (gy.t(), x)):  # forward, input grad, weight grad
            for _ in range(20):
                a @ b
            t0 = time.perf_counter()
            for _ in range(rounds):
                a @ b
            total += (time.perf_counter() - t0) / rounds
    return total * 1000


def reference_ms() -> float:
    """reference_gpt.py's ms per iteration over 300 iterations at SHAPE (its own process)."""
    ref, text = SHARED / "bench" / "reference_gpt.py", SHARED / "data" / "tinyshakespeare.txt"
    if not ref.is_file() or not text.is_file():
        sys.exit(f"needs {ref} and {text} (the shared/ folder beside the repo)")
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SHAPE.items()]
    out = subprocess.run(
        [sys.executable, str(ref), "--data", str(text), "--max-iters", "300", *flags], capture_output=True, text=True
    )
    if out.returncode:
        sys.exit(f"reference_gpt.py failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_iter"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernels", action="store_true", help="also print the profiler's kernel table")
    p.add_argument("--ab", action="store_true", help="also A/B the compile options in interleaved rounds")
    p.add_argument("--no-results", action="store_true", help="print only; do not append to bench/RESULTS.md")
    a = p.parse_args()
    import torch

    from barkgpt import cpu_attention

    torch.set_num_threads(2)
    cpu_attention.load()
    summary: dict = {"shape": SHAPE, "reference_ms": reference_ms()}
    model, step = make_step(VARIANTS["cpp_wrapper"])
    for _ in range(30):
        step()
    times: dict = {}
    for _ in range(100):
        step(times)
    summary["phases_ms"] = {k: round(statistics.median(v), 2) for k, v in times.items()}
    floor = gemm_floor_ms(model)
    step_ms = summary["phases_ms"]["step"]
    summary.update(
        {
            "ratio": round(summary["reference_ms"] / step_ms, 3),
            "gemm_floor_ms": round(floor, 2),
            "other_ms": round(step_ms - floor, 2),
            "max_ratio_at_gemm_floor": round(summary["reference_ms"] / floor, 3),
            "needed_other_ms_for_1_3x": round(summary["reference_ms"] / 1.3 - floor, 2),
        }
    )
    print(json.dumps(summary), flush=True)
    if a.kernels:
        import torch._inductor.config as inductor_config
        from torch.profiler import ProfilerActivity, profile

        inductor_config.cpp.enable_kernel_profile = True
        _, plain = make_step(VARIANTS["plain"], seed=1)
        for _ in range(30):
            plain()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                plain()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        inductor_config.cpp.enable_kernel_profile = False
    if a.ab:
        steps = {}
        for i, (name, options) in enumerate(VARIANTS.items()):
            steps[name] = make_step(options, seed=2 + i)[1]
            for _ in range(30):
                steps[name]()
        rounds = {name: [] for name in steps}
        for _ in range(6):
            for name, fn in steps.items():
                t0 = time.perf_counter()
                for _ in range(25):
                    fn()
                rounds[name].append(round((time.perf_counter() - t0) / 25 * 1000, 2))
        summary["compile_options_ms"] = {n: {"median": statistics.median(v), "rounds": v} for n, v in rounds.items()}
        print(json.dumps(summary["compile_options_ms"]), flush=True)
    if not a.no_results:
        write_results("train step: where the gpt2 path's time goes (profile_train_step.py)", summary)


if __name__ == "__main__":
    main()
