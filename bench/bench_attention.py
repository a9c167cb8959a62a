"""Causal attention on CPU, forward + backward: our kernel (barkgpt/csrc/cpu_attention.cpp)
against PyTorch's ``F.scaled_dot_product_attention`` (flash attention on CPU), side by side.

Each shape times both on q, k, v taken as strided views of one fused (B, T, H + 2 H_kv, D)
projection, as the model has them, with autograd (the backward of the views included), in
alternating blocks over several rounds; ``speedup`` is the median of the per-round ratios
(flash time / ours). The first shape is the shakespeare-char preset's. Appends to bench/RESULTS.md.

    python bench/bench_attention.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(12, 64, 4, 1, 32), (12, 64, 4, 4, 32), (8, 128, 8, 2, 16), (4, 256, 4, 1, 32)]  # (B, T, H, H_kv, D)


def main() -> None:
    """Time both attentions at each of :data:`SHAPES`, print one JSON line per shape (median
    microseconds of one forward + backward, and the median per-round speedup) and append them to
    bench/RESULTS.md; exits with a message when the kernel cannot be built here."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from bench_train import write_results

    from barkgpt import cpu_attention

    if not cpu_attention.load():
        sys.exit("the CPU attention kernel is not available here (see the warning above)")

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.size(2) != k.size(2)
        ).transpose(1, 2)

    rows = []
    for B, T, H, H_kv, D in SHAPES:
        qkv = torch.randn(B, T, H + 2 * H_kv, D, requires_grad=True)
        grad = torch.randn(B, T, H, D)

        def timed(attend, n=10, qkv=qkv, grad=grad, heads=(H, H_kv, H_kv)):  # this shape's tensors, bound now
            t = time.perf_counter()
            for _ in range(n):
                q, k, v = qkv.split(list(heads), dim=2)
                attend(q, k, v).backward(grad)
            return (time.perf_counter() - t) / n * 1e6

        for attend in (sdpa, cpu_attention.causal_attention):  # warm up
            timed(attend, 3)
        ours, flash = [], []
        for _ in range(a.rounds):
            ours.append(timed(cpu_attention.causal_attention))
            flash.append(timed(sdpa))
        row = {
            "B": B,
            "T": T,
            "H": H,
            "H_kv": H_kv,
            "D": D,
            "ours_us": round(statistics.median(ours)),
            "sdpa_us": round(statistics.median(flash)),
            "speedup": round(statistics.median(f / o for f, o in zip(flash, ours)), 2),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    write_results("attention: CPU kernel vs F.scaled_dot_product_attention, fwd + bwd", {"rounds": a.rounds, "shapes": rows})


if __name__ == "__main__":
    main()
