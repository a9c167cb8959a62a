"""Decode speed at batch 1: the KV-cache engine against naive full recompute, side by side.

Uses the shakespeare-bpe model shape (n_layer 4, n_head 4, n_embd 128, block_size 128, vocab
2048) with random weights (speed does not depend on the values), greedy decoding of
``block_size - 1`` tokens from a one-token prompt, alternating the two paths over several rounds.

    python bench/bench_decode.py [--rounds 3]
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
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import torch

    from barkgpt.config import build_configs
    from barkgpt.engine import Engine
    from barkgpt.model import GPT
    from bench_train import write_results

    model_cfg, _ = build_configs("shakespeare-bpe", overrides={"vocab_size": 2048})
    torch.manual_seed(0)
    model = GPT(model_cfg).eval()
    n = model_cfg.block_size - 1
    engine = Engine(model)

    def cached():
        t = time.perf_counter()
        toks = [s[0] for s in engine.generate([0], max_new_tokens=n, temperature=0)]
        return len(toks) / (time.perf_counter() - t), toks

    def naive():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([[0]]), n)
        return n / (time.perf_counter() - t), out[0, 1:].tolist()

    cached(), naive()  # warm up
    rows = {"kv_cache": [], "naive": []}
    for _ in range(a.rounds):
        tps, a_toks = cached()
        rows["kv_cache"].append(tps)
        tps, b_toks = naive()
        rows["naive"].append(tps)
        assert a_toks == b_toks, "cached and naive greedy decoding disagree"
    summary = {"tokens": n, "kv_cache_tokens_per_s": round(statistics.median(rows["kv_cache"]), 1),
               "naive_tokens_per_s": round(statistics.median(rows["naive"]), 1)}
    summary["ratio"] = round(summary["kv_cache_tokens_per_s"] / summary["naive_tokens_per_s"], 2)
    print(json.dumps(summary))
    write_results("decode: batch 1, greedy, shakespeare-bpe shape", summary)


if __name__ == "__main__":
    main()
