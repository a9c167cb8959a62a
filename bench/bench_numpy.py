"""Training speed of the NumPy backend against PyTorch eager, side by side in one run.

Two shapes, each the model and batch of a preset: ``bark`` (llama, block_size 32, 2 layers,
4 heads, n_embd 64, batch 32, vocabulary 11) and ``shakespeare-char`` (llama, block_size 64,
4 layers, 4 query heads on 1 kv head, n_embd 128, SwiGLU width 256, batch 12, vocabulary 69).
A step is what training does: forward, cross-entropy, backward, gradient clipping, AdamW
(torch: fused AdamW, eager, no ``torch.compile``, float32, measured with its default threads
and with one thread, ``OMP_NUM_THREADS=1``, which on a loaded 2-core machine can be the faster;
NumPy: its flat-buffer AdamW, float32, one BLAS thread, as ``barkgpt train --backend numpy``
sets it).
Batches are random token windows (speed does not depend on the text).

Each measurement runs in its own process, so the NumPy one never imports torch; a round runs
NumPy then torch for each shape, back to back, so machine noise hits both alike; the figure is
the median over rounds of tokens/s over ``--iters`` steps after 5 warmup steps; ``ratio`` is
NumPy / torch with default threads, ``ratio_1thread`` NumPy / torch on one thread, and
``ratio_best`` NumPy / the faster torch of each round. Prints JSON lines and appends a section to bench/RESULTS.md.

    python bench/bench_numpy.py [--iters 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"bark": 11, "shakespeare-char": 69}  # preset -> vocabulary size of its tokenizer

WORKER = """
import json, sys, time
import numpy as np
from barkgpt.config import build_configs
import dataclasses
backend, preset, iters, vocab = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
model_cfg, cfg = build_configs(preset, overrides={"optimizer": "adamw", "compile": False})
model_cfg = dataclasses.replace(model_cfg, vocab_size=vocab)
B, T = cfg.batch_size, model_cfg.block_size
rng = np.random.default_rng(0)
batches = [(rng.integers(0, vocab, (B, T)), rng.integers(0, vocab, (B, T))) for _ in range(8)]
if backend == "numpy":
    from barkgpt.numpy.model import GPT
    from barkgpt.numpy.optim import AdamW, clip_grad_norm
    model = GPT(model_cfg, seed=0)
    opt = AdamW(model, cfg)
    def step(i):
        x, y = batches[i % 8]
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        clip_grad_norm(model.flat_grad, cfg.grad_clip)
        opt.step(cfg.learning_rate)
else:
    import torch
    from barkgpt.model import GPT
    from barkgpt.optim import build_optimizers
    model = GPT(model_cfg).train()
    (opt,) = build_optimizers(model, cfg, "cpu")
    tb = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    def step(i):
        x, y = tb[i % 8]
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
for i in range(5):
    step(i)
t = time.perf_counter()
for i in range(iters):
    step(i)
dt = time.perf_counter() - t
print(json.dumps({"tokens_per_s": round(iters * B * T / dt, 1), "step_ms": round(dt / iters * 1e3, 3), "torch_loaded": "torch" in sys.modules}))
"""


def measure(backend: str, preset: str, iters: int) -> dict:
    """One worker process's JSON line."""
    env = dict(os.environ)
    if backend == "numpy":
        env.setdefault("OPENBLAS_NUM_THREADS", "1")  # as `barkgpt train --backend numpy` (cli.use_numpy_backend)
    if backend == "torch-1thread":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-c", WORKER, backend.split("-")[0], preset, str(iters), str(SHAPES[preset])]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode != 0:
        sys.exit(f"{backend} worker failed on {preset}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=100, help="timed steps per measurement")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (numpy, torch) per shape")
    p.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    a = p.parse_args()
    load = os.getloadavg()[0]
    backends = ("numpy", "torch", "torch-1thread")
    rows = {(b, s): [] for s in SHAPES for b in backends}
    for _ in range(a.rounds):
        for preset in SHAPES:
            for backend in backends:
                r = measure(backend, preset, a.iters)
                assert r["torch_loaded"] == (backend != "numpy"), r
                rows[backend, preset].append(r)
    summary = {"bench": "numpy", "iters": a.iters, "rounds": a.rounds, "load_before": round(load, 2)}
    for preset in SHAPES:
        tps = {b: statistics.median(r["tokens_per_s"] for r in rows[b, preset]) for b in backends}
        per_round = list(zip(*(rows[b, preset] for b in backends)))  # (numpy, torch, torch-1thread) of each round
        line = {
            "shape": preset,
            "numpy_tokens_per_s": tps["numpy"],
            "torch_eager_tokens_per_s": tps["torch"],
            "torch_eager_1thread_tokens_per_s": tps["torch-1thread"],
            "ratio": round(statistics.median(n["tokens_per_s"] / t["tokens_per_s"] for n, t, _ in per_round), 3),
            "ratio_1thread": round(statistics.median(n["tokens_per_s"] / t1["tokens_per_s"] for n, _, t1 in per_round), 3),
            "ratio_best": round(
                statistics.median(n["tokens_per_s"] / max(t["tokens_per_s"], t1["tokens_per_s"]) for n, t, t1 in per_round), 3
            ),
        }
        print(json.dumps(line), flush=True)
        summary[preset] = line
    print(json.dumps(summary))
    if not a.no_results:
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(f"\n## numpy backend vs torch eager, training ({stamp}, load {load:.1f})\n")
            f.write(
                f"`python bench/bench_numpy.py --iters {a.iters} --rounds {a.rounds}`\n\n```json\n{json.dumps(summary, indent=2)}\n```\n"
            )


if __name__ == "__main__":
    main()
