"""Decode speed at batch 1, side by side: our KV-cache engine (compiled decode step, as ``barkgpt
sample --compile``, with :data:`~barkgpt.engine.MULTI_STEP` greedy tokens per compiled call and
with one per call, ``kv_cache_compiled_1_step``; and eager) against naive full recompute, against Hugging Face ``generate`` on
our exported weights (when transformers is installed), eager with its default dynamic cache
(``hf_generate``) and with a static cache and a compiled forward
(``hf_generate_static_compiled``), and against llama.cpp on our f32 GGUF (when llama-cpp-python
is installed).

The static + compiled path follows HF's "LLM inference optimization" guide (llm_optims.md:
``cache_implementation="static"`` and ``model.forward = torch.compile(model.forward,
mode="reduce-overhead", fullgraph=True)``), with one change for the CPU: ``reduce-overhead``
means CUDA graphs, which a CPU does not have, so the forward is compiled as our decode step is,
by :func:`barkgpt.common.compile_fn` (inductor's default mode, with its ``cpp_wrapper`` on CPU),
``fullgraph=True``. Both compiled paths thus get the same compiler settings; HF's own automatic
compile in ``generate`` is off on CPU (``_valid_auto_compile_criteria``), so the forward is
compiled by hand.

Uses the shakespeare-bpe model shape (n_layer 4, n_head 4, n_embd 128, block_size 128, vocab
2048; the output head untied from the embedding) with random weights (speed does not depend
on the values; untied, greedy decoding does not just repeat the prompt's token), greedy decoding of
``block_size - 1`` tokens from a one-token prompt, alternating the paths over several rounds.
The warm-up round (where the compiles happen: ``compile_seconds`` ours,
``hf_static_compile_seconds`` HF's) is not timed; ``ours_vs_*`` ratios use the compiled engine.
``greedy_tokens_equal_to_ours`` counts, for each other path, how many leading tokens of the
last round equal the compiled engine's (all ``tokens`` of them when the paths agree); ours (both
step counts), eager and naive must agree exactly, the exported paths are reported (a different kernel can flip
a near-tie of random weights' logits in fp32).

    python bench/bench_decode.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def decode_model():
    """The decode benches' model: the shakespeare-bpe shape (vocab 2048), random weights (seed 0),
    the output head untied: a random tied model's greedy tokens repeat the prompt's, which would
    make every token check trivially true."""
    import torch

    from barkgpt.config import build_configs
    from barkgpt.model import GPT

    model_cfg, _ = build_configs("shakespeare-bpe", overrides={"vocab_size": 2048, "tie_embeddings": False})
    torch.manual_seed(0)
    return GPT(model_cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()

    import torch
    from bench_train import write_results

    from barkgpt.engine import MULTI_STEP, Engine

    model = decode_model()
    n = model.config.block_size - 1

    def engine_path(engine):
        def cached():
            t = time.perf_counter()
            toks = [s[0] for s in engine.generate([0], max_new_tokens=n, temperature=0)]
            return len(toks) / (time.perf_counter() - t), toks

        return cached

    def naive():
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([[0]]), n)
        return n / (time.perf_counter() - t), out[0, 1:].tolist()

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:  # the exports, read by HF and llama.cpp while timing
        paths = {
            "kv_cache_compiled": engine_path(Engine(model, compile=True)),
            "kv_cache_compiled_1_step": engine_path(Engine(model, compile=True, multi_step=1)),
            "kv_cache_eager": engine_path(Engine(model)),
            "naive": naive,
            **exported_paths(model, n, Path(tmp)),
        }
        t = time.perf_counter()
        paths["kv_cache_compiled"]()  # warm up: compiles
        compile_s = time.perf_counter() - t
        warm = {}
        for name, fn in paths.items():
            if name != "kv_cache_compiled":
                t = time.perf_counter()
                fn()
                warm[name] = time.perf_counter() - t
        rows = {name: [] for name in paths}
        for _ in range(a.rounds):
            toks = {}
            for name, fn in paths.items():
                tps, toks[name] = fn()
                rows[name].append(tps)
            assert toks["kv_cache_compiled"] == toks["kv_cache_compiled_1_step"] == toks["kv_cache_eager"] == toks["naive"], (
                "cached and naive greedy decoding disagree"
            )
    summary = {
        "tokens": n,
        "torch_threads": torch.get_num_threads(),
        "multi_step": MULTI_STEP,
        "compile_seconds": round(compile_s, 1),
        "compile_seconds_1_step": round(warm["kv_cache_compiled_1_step"], 1),
        **(
            {"hf_static_compile_seconds": round(warm["hf_generate_static_compiled"], 1)}
            if "hf_generate_static_compiled" in warm
            else {}
        ),
        **{f"{name}_tokens_per_s": round(statistics.median(r), 1) for name, r in rows.items()},
        "greedy_tokens_equal_to_ours": {
            name: leading_equal(toks["kv_cache_compiled"], t) for name, t in toks.items() if name != "kv_cache_compiled"
        },
    }
    ours = summary["kv_cache_compiled_tokens_per_s"]
    for name in paths:
        if name != "kv_cache_compiled":
            summary[f"ours_vs_{name}"] = round(ours / summary[f"{name}_tokens_per_s"], 2)
    print(json.dumps(summary))
    write_results("decode: batch 1, greedy, shakespeare-bpe shape", summary)


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many leading tokens of ``a`` and ``b`` are equal (``len(a)`` when they agree)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def exported_paths(model, n: int, tmp: Path) -> dict:
    """Decode functions for HF ``generate`` and llama.cpp on exports of ``model`` (each returns
    ``(tokens/s, tokens)``); a path whose package is missing is left out. The exports are written
    under ``tmp``, which must stay until the functions are done with."""
    import importlib.util

    import torch
    from bench_train import SHARED

    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.common import compile_fn
    from barkgpt.tokenizer import Tokenizer

    paths = {}
    shared = SHARED / "data" / "tinyshakespeare.txt"
    text = shared.read_text() if shared.is_file() else "the quick brown fox jumps over the lazy dog " * 2000
    tokenizer = Tokenizer.train("bpe", [text], model.config.vocab_size)
    save_checkpoint(tmp / "ckpt", model, tokenizer)
    threads = torch.get_num_threads()
    if importlib.util.find_spec("transformers"):
        import transformers

        from barkgpt.export.hf import export_hf

        hf_dir = export_hf(tmp / "ckpt", tmp / "hf")
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        # a second copy for the static cache, so that compiling its forward leaves `hf` eager
        hf_static = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        hf_static.generation_config.cache_implementation = "static"  # max_cache_len: prompt + max_new_tokens
        hf_static.forward = compile_fn(hf_static.forward, "cpu", fullgraph=True)

        def hf_path(m):
            def run():
                t = time.perf_counter()
                out = m.generate(  # the mask given: inferred from pad_token_id, it would hide the prompt's token 0
                    torch.tensor([[0]]),
                    attention_mask=torch.ones(1, 1, dtype=torch.long),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )
                return n / (time.perf_counter() - t), out[0, 1:].tolist()

            return run

        paths["hf_generate"] = hf_path(hf)
        paths["hf_generate_static_compiled"] = hf_path(hf_static)
    if importlib.util.find_spec("llama_cpp") and importlib.util.find_spec("gguf"):
        from llama_cpp import Llama

        from barkgpt.export.gguf import export_gguf

        llm = Llama(
            model_path=str(export_gguf(tmp / "ckpt", tmp / "m.gguf", outtype="f32")),
            n_ctx=model.config.block_size,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
        )

        def llama_cpp():  # llama.cpp's own greedy sampler: ~10% faster than reading its logits out (logits_all)
            t = time.perf_counter()
            toks = []
            greedy = dict(temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True)
            for tok in llm.generate([0], **greedy):
                toks.append(tok)
                if len(toks) == n:
                    break
            return n / (time.perf_counter() - t), toks

        paths["llama_cpp"] = llama_cpp
    return paths


if __name__ == "__main__":
    main()
