"""GPU training throughput and MFU: the gpt2-124m preset (GPT-2 small shape) with bf16 autocast
and torch.compile, on the TinyStories sample, for a fixed number of optimizer steps.

Reports the median tokens/s of the log intervals after the compile warm-up and the model FLOPs
utilization (MFU: ``flops_per_token`` x tokens/s over the GPU's peak dense bf16 FLOP/s, PaLM
paper appendix B, nanoGPT's ``estimate_mfu``; peaks in ``barkgpt.common.PEAK_BF16_FLOPS``), and
appends them to bench/RESULTS.md. Needs a CUDA GPU; ``--smoke`` runs a 2-layer model of the same
code path on the CPU to check the script itself (its numbers mean nothing).

The tokenizer is a byte-level BPE trained on the sample, asked for GPT-2's 50,257 tokens; it
reaches fewer on 2 MiB of text, and the model's parameter count and FLOPs per token follow the
vocabulary it got (both are reported).

    python bench/bench_gpu.py [--steps 60] [--grad-accum 8] [--batch-size 16] [--if-gpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out"


def main() -> None:
    """Train the gpt2-124m preset for ``--steps`` optimizer steps, then print its steady tokens/s,
    MFU, parameter count and FLOPs per token as JSON and append them to bench/RESULTS.md (not for
    ``--smoke``)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (the first 20 hold the compile and are not counted)")
    p.add_argument("--grad-accum", type=int, default=8, help="micro-batches per optimizer step")
    p.add_argument("--batch-size", type=int, default=16, help="rows of block_size tokens per micro-batch")
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="a 2-layer model on the CPU: checks this script, measures nothing")
    p.add_argument("--if-gpu", action="store_true", help="say so and exit 0 when there is no CUDA GPU (make bench)")
    a = p.parse_args()

    import torch
    from bench_train import write_results

    from barkgpt.config import build_configs
    from barkgpt.data import prepare_dataset
    from barkgpt.model import GPT
    from barkgpt.train import train

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        if a.if_gpu:
            print("bench_gpu: skipped, no CUDA GPU on this machine")
            return
        sys.exit("no CUDA GPU here: run this on a GPU machine (or --smoke --device cpu to check the script)")
    text = REPO.parent / "shared" / "data" / "tinystories-train-sample.txt"
    if not text.is_file():
        sys.exit(f"needs {text} (the shared/ folder beside the repo)")
    data = OUT / "tinystories-gpt2"
    if not (data / "meta.json").is_file():
        prepare_dataset(text, data, tokenizer="bpe", vocab_size=50257)
    over = dict(
        data=str(data),
        out_dir=str(OUT / "gpu-run"),
        device=a.device,
        max_iters=a.steps,
        warmup_iters=10,
        eval_interval=10**9,
        eval_iters=1,
        log_interval=5,
        batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
    )
    if a.smoke:
        over.update(n_layer=2, n_head=2, n_embd=64, block_size=128, compile=False, dtype="float32")
    model_cfg, cfg = build_configs("gpt2-124m", overrides=over)
    r = train(model_cfg, cfg, quiet=False)
    rows = [json.loads(line) for line in open(OUT / "gpu-run" / "metrics.jsonl") if '"tokens_per_s"' in line]
    steady = [x for x in rows if x["step"] > 20] or rows
    tps = statistics.median(x["tokens_per_s"] for x in steady)
    meta = json.loads((data / "meta.json").read_text())
    with torch.device("meta"):
        m = GPT(dataclasses.replace(model_cfg, vocab_size=meta["vocab_size"]))
    mfus = [x["mfu"] for x in steady if "mfu" in x]
    summary = {
        "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu (smoke)",
        "params": m.num_params(),
        "vocab_size": meta["vocab_size"],
        "flops_per_token": m.flops_per_token(),
        "tokens_per_step": a.batch_size * a.grad_accum * model_cfg.block_size,
        "steps": a.steps,
        "dtype": cfg.dtype,
        "compile": cfg.compile,
        "steady_tokens_per_s": round(tps, 1),
        "mfu": round(statistics.median(mfus), 4) if mfus else None,
        "final_train_loss": round(r["train_loss"], 4),
    }
    print(json.dumps(summary))
    if not a.smoke:
        write_results("gpu: gpt2-124m preset, bf16 + compile", summary)


if __name__ == "__main__":
    main()
