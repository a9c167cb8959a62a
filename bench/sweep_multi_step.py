"""Greedy tokens per compiled call (``Engine(multi_step=K)``) against batch-1 decode speed and the
first call's compile, on bench_decode's model (shakespeare-bpe shape, untied random weights,
127 tokens from a one-token prompt). Every K must give the same tokens (asserted). The first
call's seconds include the compile (cold only on a cold inductor cache); tokens/s is the median
of ``--rounds`` rounds, the K values alternating. Behind ``MULTI_STEP = 4`` (bench/RESULTS.md).

    python bench/sweep_multi_step.py [--steps 1,2,4,8] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from bench_decode import decode_model

    from barkgpt.engine import Engine

    model = decode_model()
    n = model.config.block_size - 1
    engines = {int(k): Engine(model, compile=True, multi_step=int(k)) for k in a.steps.split(",")}

    def run(engine) -> tuple[float, list[int]]:
        t = time.perf_counter()
        toks = [s[0] for s in engine.generate([0], max_new_tokens=n, temperature=0)]
        return time.perf_counter() - t, toks

    first, ref = {}, None
    for k, engine in engines.items():
        first[k], toks = run(engine)
        ref = ref or toks
        assert toks == ref, f"multi_step={k} gave other tokens"
    rates = {k: [] for k in engines}
    for _ in range(a.rounds):
        for k, engine in engines.items():
            seconds, toks = run(engine)
            assert toks == ref
            rates[k].append(n / seconds)
    print(
        json.dumps(
            {
                "tokens": n,
                "distinct_tokens": len(set(ref)),
                "first_call_seconds": {k: round(s, 1) for k, s in first.items()},
                "tokens_per_s": {k: round(statistics.median(r)) for k, r in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
