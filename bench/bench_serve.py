"""Serving load test: aggregate generated tokens/s at 1, 4 and 16 concurrent streams, with
p50/p99 time to first token, against a real ``barkgpt serve`` process on 127.0.0.1.

The model has the shakespeare-bpe shape (n_layer 4, n_head 4, n_embd 128, block_size 128,
byte-level BPE of 2048 tokens trained on tiny Shakespeare) with random weights: speed does not
depend on the values. Every request streams ``--max-tokens`` tokens (``<EOS>`` is possible but
rare); counts come from the usage chunk. The load comes from a lean ``httpx`` SSE reader (as
vLLM's ``benchmark_serving.py`` reads with aiohttp), not the ``openai`` SDK, whose per-chunk
parsing would take much of this 2-core machine away from the server it measures; the tests use
the official client.

Each round runs 1, 4 and 16 clients for a few seconds each; ``ratio_16_vs_1`` is the median over
rounds of the 16-client tokens/s over the 1-client tokens/s of the same round (this 2-core
machine is shared, and its speed drifts between minutes).

    python bench/bench_serve.py [--max-tokens 64] [--requests 64] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def make_model() -> Path:
    """A random-weight shakespeare-bpe-shaped checkpoint with a real BPE tokenizer."""
    out = OUT / "serve-model"
    if (out / "model.safetensors").is_file():
        return out
    import torch

    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import build_configs
    from barkgpt.model import GPT
    from barkgpt.tokenizer import Tokenizer

    text = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not text.is_file():
        sys.exit(f"needs {text} (the shared/ folder beside the repo)")
    tok = Tokenizer.train("bpe", iter([text.read_text(encoding="utf-8")]), vocab_size=2048)
    model_cfg, _ = build_configs("shakespeare-bpe", overrides={"vocab_size": tok.vocab_size})
    torch.manual_seed(0)
    save_checkpoint(out, GPT(model_cfg), tok)
    return out


async def one_request(client, max_tokens: int, seed: int) -> tuple[float, int]:
    """Stream one completion; return (time to first token in s, completion tokens)."""
    t0 = time.perf_counter()
    ttft, tokens, last = None, 0, None
    body = {"model": "bench", "prompt": "ROMEO:", "max_tokens": max_tokens, "temperature": 0.8, "seed": seed,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = line
    if last is not None:  # the usage chunk comes last
        tokens = json.loads(last[6:])["usage"]["completion_tokens"]
    return ttft or 0.0, tokens


async def load(base: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    """``requests`` requests spread over ``concurrency`` clients that each send one at a time."""
    import httpx2 as httpx  # what the openai client itself depends on

    client = httpx.AsyncClient(base_url=base, headers={"Authorization": "Bearer bench"}, timeout=300,
                               limits=httpx.Limits(max_connections=concurrency))
    results = []

    async def worker(w: int):
        for i in range(w, requests, concurrency):
            results.append(await one_request(client, max_tokens, seed=i))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await client.aclose()  # inside this event loop, before asyncio.run closes it
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {"concurrency": concurrency, "requests": len(results), "tokens": tokens, "seconds": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=64, help="requests per round at 16 clients (4 each: less ramp-up and tail); "
                                                            "1 client sends a quarter of them, 4 clients half")
    p.add_argument("--rounds", type=int, default=4, help="rounds of (1, 4, 16 clients), interleaved so machine noise hits every level")
    a = p.parse_args()

    from bench_train import write_results

    model = make_model()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the server picks its threads
    env["BARKGPT_API_KEY"] = "bench"
    proc = subprocess.Popen([sys.executable, "-m", "barkgpt", "serve", "--model", str(model), "--port", str(port),
                             "--model-name", "bench", "--max-batch-size", "16"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    levels = {1: max(a.requests // 4, 1), 4: max(a.requests // 2, 4), 16: max(a.requests, 16)}  # each level runs a few seconds
    rounds = []
    try:
        for _ in range(600):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        asyncio.run(load(base, 1, 2, a.max_tokens))  # warm up
        for r in range(a.rounds):
            rounds.append({c: asyncio.run(load(base, c, n, a.max_tokens)) for c, n in levels.items()})
            print(json.dumps({"round": r, **{f"tokens_per_s_{c}": x["tokens_per_s"] for c, x in rounds[-1].items()}}), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rows = []
    for c in levels:  # each level over all rounds
        xs = [rd[c] for rd in rounds]
        wall, tokens = sum(x["seconds"] for x in xs), sum(x["tokens"] for x in xs)
        rows.append({"concurrency": c, "requests": sum(x["requests"] for x in xs), "tokens": tokens, "seconds": round(wall, 2),
                     "tokens_per_s": round(tokens / wall, 1), "ttft_p50_ms": statistics.median(x["ttft_p50_ms"] for x in xs),
                     "ttft_p99_ms": max(x["ttft_p99_ms"] for x in xs)})
        print(json.dumps(rows[-1]))
    per_round = [round(rd[16]["tokens_per_s"] / rd[1]["tokens_per_s"], 2) for rd in rounds]
    summary = {"max_tokens": a.max_tokens, "rounds": a.rounds, "levels": rows, "ratio_16_vs_1_per_round": per_round,
               "ratio_16_vs_1": round(statistics.median(per_round), 2)}
    print(json.dumps({"ratio_16_vs_1": summary["ratio_16_vs_1"], "per_round": per_round}))
    write_results("serve: streamed completions at 1/4/16 concurrent clients, shakespeare-bpe shape", summary)


if __name__ == "__main__":
    main()
