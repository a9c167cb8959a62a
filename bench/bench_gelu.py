"""GPT-2's GELU (``gelu_new``) under ``torch.compile`` on CPU, forward + backward: the tanh form
``F.gelu(approximate="tanh")`` against the same function as ``x * sigmoid(2u)``, which
``barkgpt.model.gelu_tanh`` traces to when compiling (inductor's C++ backend vectorizes ``exp``
but calls ``tanh`` per element).

Both compiled the way the trainer compiles (``common.compile_fn``: inductor, ``cpp_wrapper``), on
the MLP activation of the gpt2 bench shape (batch 12 x block 64 x 4 * 128) and of gpt2-124m at a
small batch (4 x 256 x 3072); timed in alternating blocks over several rounds; ``speedup`` is the
median of the per-round ratios (tanh time / sigmoid time). Also checks the two agree (max
absolute difference of values and gradients). Appends to bench/RESULTS.md.

    python bench/bench_gelu.py [--rounds 9] [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

SHAPES = [(12, 64, 512), (4, 256, 3072)]  # (B, T, intermediate_size)


def main() -> None:
    """Time both forms at each of :data:`SHAPES` and print and record one JSON line per shape
    (median milliseconds of one forward + backward, the median per-round speedup, and the
    largest difference between the two)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--iters", type=int, default=50, help="forward + backward passes per timed block")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F
    from bench_train import write_results

    from barkgpt.common import compile_fn
    from barkgpt.model import gelu_tanh

    forms = {
        "tanh": compile_fn(lambda x: F.gelu(x, approximate="tanh"), "cpu"),
        "sigmoid": compile_fn(gelu_tanh, "cpu"),  # traces to x * sigmoid(2u)
    }

    def block(fn, x, g) -> float:  # seconds per forward + backward
        t0 = time.perf_counter()
        for _ in range(a.iters):
            x.grad = None
            fn(x).backward(g)
        return (time.perf_counter() - t0) / a.iters

    results = []
    for shape in SHAPES:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).requires_grad_()
        g = torch.ones(shape)
        outs = {}
        for name, fn in forms.items():  # compile, warm up, and keep values and gradients to compare
            for _ in range(3):
                x.grad = None
                y = fn(x)
                y.backward(g)
            outs[name] = (y.detach(), x.grad.clone())
        times = {name: [] for name in forms}
        for _ in range(a.rounds):
            for name, fn in forms.items():
                times[name].append(block(fn, x, g))
        row = {
            "shape": list(shape),
            **{f"{name}_ms": round(1e3 * statistics.median(t), 3) for name, t in times.items()},
            "speedup": round(statistics.median(t / s for t, s in zip(times["tanh"], times["sigmoid"])), 2),
            "max_abs_diff_value": float((outs["tanh"][0] - outs["sigmoid"][0]).abs().max()),
            "max_abs_diff_grad": float((outs["tanh"][1] - outs["sigmoid"][1]).abs().max()),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    write_results("gelu_new under torch.compile: tanh form vs sigmoid form, fwd + bwd", {"rounds": a.rounds, "shapes": results})


if __name__ == "__main__":
    main()
