"""A/B of two source trees' servers under the same load, side by side: ``barkgpt serve`` started
from each tree (its own cwd and ``PYTHONPATH``) on the bench_serve model, loaded alternately with
bench_serve's ``load()`` at 1 stream (12 requests) and 16 streams (96 requests) of 64 tokens, so
the machine's drift hits both alike. Prints each round and the medians (tokens/s). How the two
scheduler changes of issue 14 were measured (bench/RESULTS.md, "serve: two scheduler changes").

    git worktree add /tmp/old <commit>
    python bench/ab_serve.py --old /tmp/old --new . [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, required=True, help="the baseline tree")
    p.add_argument("--new", type=Path, required=True, help="the tree under test")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    from bench_serve import load, make_model, start_server

    model = make_model()
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    servers = {name: start_server(model, tree=tree) for name, tree in trees.items()}
    res = {(name, c): [] for name in trees for c in (1, 16)}
    try:
        for name in trees:
            asyncio.run(load(servers[name][1], 4, 8, 64))  # warm up
        for r in range(a.rounds):
            for name in trees:
                for c, n in ((1, 12), (16, 96)):
                    res[(name, c)].append(asyncio.run(load(servers[name][1], c, n, 64))["tokens_per_s"])
            print(r, {f"{name}-{c}": v[-1] for (name, c), v in res.items()}, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.kill()
    print({f"{name}-{c}": round(statistics.median(v)) for (name, c), v in res.items()})


if __name__ == "__main__":
    main()
