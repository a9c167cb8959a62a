"""Serving load test against real ``barkgpt serve`` processes on 127.0.0.1, with side by side:

* server tokens/s at 1 stream against in-process ``Engine.generate`` with the compiled step on
  the same model, at the server's torch thread count (``server_1_vs_engine``; the HTTP path
  should cost little: at least 0.8);
* aggregate tokens/s at 16 streams against 1 stream (``ratio_16_vs_1``, at least 6), with
  p50/p99 time to first token, at 1, 4 and 16 streams; beside it the ceiling: in-process
  ``Engine.generate`` decoding 16 rows together against 1 row (``engine_16_vs_1``, no HTTP, the
  same thread count). On this 2-core machine a 16-row step of this model is GEMM-bound (17
  matmuls at M=16), so no server can batch better than the engine alone does;
* the same 16-stream load with the compiled step on and off (``compiled_vs_eager_16``: > 1);
* with ``--json``, instead of the above: 16 streams with a JSON schema against 16 without, on the
  same compiled server (``json_vs_plain_16``: at least 0.8); the schema is a list of at least 64
  strings, so constrained replies run to ``--max-tokens`` as free ones do;
* with ``--chat``: a 10-turn chat that fills most of a 512-token context (the tinystories
  preset trained briefly with ``--block-size 512``), time to first token per turn with the
  prefix cache and with ``--no-prefix-cache``, and whether the replies are the same.

The load model has the shakespeare-bpe shape (n_layer 4, n_head 4, n_embd 128, block_size 128,
byte-level BPE of 2048 tokens trained on tiny Shakespeare) with random weights: speed does not
depend on the values. Every request streams ``--max-tokens`` tokens (``<EOS>`` is possible but
rare); counts come from the usage chunk. The load comes from a lean ``httpx`` SSE reader (as
vLLM's ``benchmark_serving.py`` reads with aiohttp), not the ``openai`` SDK, whose per-chunk
parsing would take much of this 2-core machine away from the server it measures; the tests use
the official client.

Each round runs 1, 4 and 16 clients for a few seconds each; ratios are medians over rounds of
the same round's figures (this 2-core machine is shared, and its speed drifts between minutes).

    python bench/bench_serve.py [--max-tokens 64] [--requests 64] [--rounds 4] [--chat] [--json]
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


def start_server(model: Path, *flags: str, tree: Path | None = None) -> tuple[subprocess.Popen, str]:
    """``barkgpt serve`` on a free port (API key ``bench``), once ``/health`` answers 200; with
    ``tree``, the ``barkgpt`` of that source tree (its cwd and ``PYTHONPATH``: bench/ab_serve.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the server picks its threads
    env["BARKGPT_API_KEY"] = "bench"
    if tree is not None:
        env["PYTHONPATH"] = str(tree)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "barkgpt",
            "serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--model-name",
            "bench",
            "--max-batch-size",
            "16",
            *flags,
        ],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    where = f" from {tree}" if tree is not None else ""
    for _ in range(3000):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return proc, base
        except OSError:
            if proc.poll() is not None:
                sys.exit(f"barkgpt serve {' '.join(flags)}{where} exited with {proc.returncode}")
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"barkgpt serve{where} did not come up in 10 minutes")


def engine_tokens_per_s(model_dir: Path, max_tokens: int, repeats: int = 8, rows: int = 1) -> float:
    """In-process ``Engine.generate`` with the compiled step (compiled first), on the server's
    thread count (all cores but one), from the same prompt as the load: ``rows`` rows of one
    prompt decoded together (``num_samples``), each with its own seed. At 16 rows it is the
    batching a server could reach with no HTTP at all (``engine_16_vs_1``)."""
    import torch

    from barkgpt.checkpoint import load_checkpoint
    from barkgpt.engine import Engine

    torch.set_num_threads(max(1, (os.cpu_count() or 1) - 1))
    model, tok, _ = load_checkpoint(model_dir, torch.device("cpu"))
    engine, ids = Engine(model, compile=True), tok.encode("ROMEO:")

    def run(seed):  # tokens generated for one seeded sample of `rows` rows
        steps = engine.generate(ids, max_new_tokens=max_tokens, temperature=0.8, seed=seed * rows, num_samples=rows)
        return sum(sum(t is not None for t in step) for step in steps)

    with torch.inference_mode():
        run(0)  # compile
        t0, tokens = time.perf_counter(), sum(run(i) for i in range(repeats))
    return round(tokens / (time.perf_counter() - t0), 1)


# A list of at least 64 strings: no reply of --max-tokens 64 can finish it, so constrained replies run
# to max_tokens as the free ones do (the random-weight model would close a shorter one early).
JSON_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "lines", "schema": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
}


async def one_request(client, max_tokens: int, seed: int, extra: dict | None = None) -> tuple[float, int]:
    """Stream one completion (``extra``: more body fields); return (time to first token in s, completion tokens)."""
    t0 = time.perf_counter()
    ttft, tokens, last = None, 0, None
    body = {
        "model": "bench",
        "prompt": "ROMEO:",
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
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


async def load(base: str, concurrency: int, requests: int, max_tokens: int, extra: dict | None = None) -> dict:
    """``requests`` requests spread over ``concurrency`` clients that each send one at a time."""
    import httpx2 as httpx  # what the openai client itself depends on

    client = httpx.AsyncClient(
        base_url=base, headers={"Authorization": "Bearer bench"}, timeout=300, limits=httpx.Limits(max_connections=concurrency)
    )
    results = []

    async def worker(w: int):
        for i in range(w, requests, concurrency):
            results.append(await one_request(client, max_tokens, seed=i, extra=extra))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    finally:
        await client.aclose()  # inside this event loop, before asyncio.run closes it
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "tokens": tokens,
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 1),
    }


def make_chat_model() -> Path:
    """The tinystories preset with ``--block-size 512``, trained briefly (``barkgpt train``)."""
    out = OUT / "chat-model"
    if (out / "best" / "model.safetensors").is_file() or (out / "last" / "model.safetensors").is_file():
        return out
    text = REPO.parent / "shared" / "data" / "tinystories-train-sample.txt"
    if not text.is_file():
        sys.exit(f"needs {text} (the shared/ folder beside the repo)")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "barkgpt",
            "train",
            "--preset",
            "tinystories",
            "--data",
            str(text),
            "--block-size",
            "512",
            "--max-iters",
            "40",
            "--warmup-iters",
            "5",
            "--eval-interval",
            "40",
            "--eval-iters",
            "2",
            "--batch-size",
            "4",
            "--gradient-accumulation-steps",
            "1",
            "--compile",
            "false",
            "--out-dir",
            str(out),
        ],
        check=True,
    )
    return out


CHAT_TURNS = [
    "Tell me a story about a cat.",
    "What did the cat find?",
    "Where did it go next?",
    "Who did it meet?",
    "What did they say?",
    "Was anyone sad?",
    "How did they help?",
    "What happened at night?",
    "How did the story end?",
    "What is the lesson?",
]


async def chat_ttfts(base: str, max_tokens: int, tag: str = "") -> tuple[list[float], list[str]]:
    """A 10-turn greedy chat, each turn resending the conversation; time to first token (s) and
    reply per turn. ``tag`` opens the first message, so chats with different tags share no
    prefix (each repeat's turn 1 is a prefix-cache miss)."""
    import httpx2 as httpx

    messages, ttfts, replies = [], [], []
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": "Bearer bench"}, timeout=300) as client:
        for i, text in enumerate(CHAT_TURNS):
            messages.append({"role": "user", "content": f"{tag}{text}" if i == 0 else text})
            body = {"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}
            t0, ttft, reply = time.perf_counter(), None, ""
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                r.raise_for_status()
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    delta = json.loads(line[6:])["choices"][0]["delta"] if json.loads(line[6:])["choices"] else {}
                    if ttft is None and delta.get("content"):
                        ttft = time.perf_counter() - t0
                    reply += delta.get("content") or ""
            ttfts.append(round(ttft or time.perf_counter() - t0, 4))
            replies.append(reply)
            messages.append({"role": "assistant", "content": reply})
    return ttfts, replies


def chat_bench(max_tokens: int, repeats: int = 5) -> dict:
    """TTFT per turn of :func:`chat_ttfts` with and without the prefix cache, on servers as they
    start by default (compiled decode step). The prefill is eager either way; but the first
    *visible* token can need a decode step or two more (a leading space is stripped, a byte of a
    character waits for the rest), which an eager server pays at ~4.5 ms each at turn 10's
    context, so an eager bench measures the reply's first characters as much as the prefill.
    Each turn's TTFT is the median over ``repeats`` chats that share no prefix."""
    model = make_chat_model()
    out = {}
    for name, flags in (("prefix_cache", ()), ("no_prefix_cache", ("--no-prefix-cache",))):
        proc, base = start_server(model, *flags)
        try:
            asyncio.run(chat_ttfts(base, 2, "Warm up. "))
            runs = [asyncio.run(chat_ttfts(base, max_tokens, f"Chat {r}. ")) for r in range(repeats)]
            out[name] = {
                "ttft_s": [round(statistics.median(t), 4) for t in zip(*(ttfts for ttfts, _ in runs))],
                "replies": [replies for _, replies in runs],
            }
            with urllib.request.urlopen(
                urllib.request.Request(base + "/metrics", headers={"Authorization": "Bearer bench"})
            ) as r:
                out[name]["metrics"] = {
                    line.split()[0]: float(line.split()[1])
                    for line in r.read().decode().splitlines()
                    if line.startswith("barkgpt_prefix_cache")
                }
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    for v in out.values():
        v["turn10_vs_turn1"] = round(v["ttft_s"][-1] / v["ttft_s"][0], 2)
    out["same_replies"] = out["prefix_cache"].pop("replies") == out["no_prefix_cache"].pop("replies")
    return out


def json_bench(model: Path, a) -> dict:
    """16 streams with :data:`JSON_FORMAT` against 16 without, interleaved over ``a.rounds`` rounds
    on one compiled server; ``json_vs_plain_16`` is the median of the rounds' ratios."""
    proc, base = start_server(model)
    plain, constrained = [], []
    try:
        asyncio.run(load(base, 1, 2, a.max_tokens))  # warm up (and compile the schema once)
        asyncio.run(load(base, 1, 2, a.max_tokens, {"response_format": JSON_FORMAT}))
        for r in range(a.rounds):
            plain.append(asyncio.run(load(base, 16, a.requests, a.max_tokens)))
            constrained.append(asyncio.run(load(base, 16, a.requests, a.max_tokens, {"response_format": JSON_FORMAT})))
            print(
                json.dumps({"round": r, "plain_16": plain[-1]["tokens_per_s"], "json_16": constrained[-1]["tokens_per_s"]}),
                flush=True,
            )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    ratios = [round(j["tokens_per_s"] / p["tokens_per_s"], 2) for p, j in zip(plain, constrained)]
    return {
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
        "plain_tokens_per_s_16": statistics.median(x["tokens_per_s"] for x in plain),
        "json_tokens_per_s_16": statistics.median(x["tokens_per_s"] for x in constrained),
        "json_tokens_per_request": round(sum(x["tokens"] for x in constrained) / sum(x["requests"] for x in constrained), 1),
        "json_vs_plain_16_per_round": ratios,
        "json_vs_plain_16": round(statistics.median(ratios), 2),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument(
        "--requests",
        type=int,
        default=64,
        help="requests per round at 16 clients (4 each: less ramp-up and tail); 1 client sends a quarter of them, 4 clients half",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="rounds of (1, 4, 16 clients), interleaved so machine noise hits every level"
    )
    p.add_argument("--chat", action="store_true", help="also the 10-turn prefix-cache chat on a briefly trained 512-token model")
    p.add_argument("--chat-max-tokens", type=int, default=24, help="reply tokens per chat turn")
    p.add_argument("--json", action="store_true", help="instead: 16 streams with a JSON schema against 16 without")
    a = p.parse_args()

    from bench_train import write_results

    model = make_model()
    if a.json:
        summary = json_bench(model, a)
        print(json.dumps(summary))
        write_results("serve: 16 streamed completions with a JSON schema against without, shakespeare-bpe shape", summary)
        return
    levels = {1: max(a.requests // 4, 1), 4: max(a.requests // 2, 4), 16: max(a.requests, 16)}  # each level runs a few seconds
    rounds, eager16 = [], []
    servers = {"compiled": start_server(model), "eager": start_server(model, "--compile", "false")}
    try:
        for _, base in servers.values():
            asyncio.run(load(base, 1, 2, a.max_tokens))  # warm up
        for r in range(a.rounds):
            rounds.append({c: asyncio.run(load(servers["compiled"][1], c, n, a.max_tokens)) for c, n in levels.items()})
            eager16.append(asyncio.run(load(servers["eager"][1], 16, levels[16], a.max_tokens)))
            print(
                json.dumps(
                    {
                        "round": r,
                        **{f"tokens_per_s_{c}": x["tokens_per_s"] for c, x in rounds[-1].items()},
                        "eager_tokens_per_s_16": eager16[-1]["tokens_per_s"],
                    }
                ),
                flush=True,
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    engine_1 = engine_tokens_per_s(model, a.max_tokens)  # the servers are gone: the cores are its own
    engine_16 = engine_tokens_per_s(model, a.max_tokens, repeats=4, rows=16)
    rows = []
    for c in levels:  # each level over all rounds
        xs = [rd[c] for rd in rounds]
        wall, tokens = sum(x["seconds"] for x in xs), sum(x["tokens"] for x in xs)
        rows.append(
            {
                "concurrency": c,
                "requests": sum(x["requests"] for x in xs),
                "tokens": tokens,
                "seconds": round(wall, 2),
                "tokens_per_s": round(tokens / wall, 1),
                "ttft_p50_ms": statistics.median(x["ttft_p50_ms"] for x in xs),
                "ttft_p99_ms": max(x["ttft_p99_ms"] for x in xs),
            }
        )
        print(json.dumps(rows[-1]))
    per_round = [round(rd[16]["tokens_per_s"] / rd[1]["tokens_per_s"], 2) for rd in rounds]
    on_off = [round(rd[16]["tokens_per_s"] / e["tokens_per_s"], 2) for rd, e in zip(rounds, eager16)]
    server_1 = statistics.median(rd[1]["tokens_per_s"] for rd in rounds)
    summary = {
        "max_tokens": a.max_tokens,
        "rounds": a.rounds,
        "levels": rows,
        "ratio_16_vs_1_per_round": per_round,
        "ratio_16_vs_1": round(statistics.median(per_round), 2),
        "eager_tokens_per_s_16": statistics.median(e["tokens_per_s"] for e in eager16),
        "compiled_vs_eager_16": round(statistics.median(on_off), 2),
        "engine_compiled_tokens_per_s_1": engine_1,
        "server_1_vs_engine": round(server_1 / engine_1, 2),
        "engine_compiled_tokens_per_s_16": engine_16,
        "engine_16_vs_1": round(engine_16 / engine_1, 2),
    }
    if a.chat:
        summary["chat"] = chat_bench(a.chat_max_tokens)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("levels",)}))
    write_results("serve: streamed completions at 1/4/16 clients (compiled and eager), shakespeare-bpe shape", summary)


if __name__ == "__main__":
    main()
