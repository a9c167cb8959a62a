"""Training speed: our trainer against ../shared/bench/reference_gpt.py, side by side in one run.

Two comparisons, each against the same reference runs:

- **preset**: ours as the shakespeare-char preset builds the model (llama family: RoPE, RMSNorm,
  SwiGLU of width 2*n_embd, multi-query attention with one key/value head, no biases), at the
  reference's n_layer 4, n_head 4, n_embd 128, block_size 64, batch 12; trained with AdamW at the
  preset's learning rate (the preset itself uses Muon: see ``--budget``). Fewer FLOPs per token
  than the reference: the summary's ``flops`` names the difference.
- **gpt2**: ours on the reference's own architecture (``family: gpt2``: learned positions,
  LayerNorm with bias, GELU MLP of width 4*n_embd, biases, tied embeddings, n_kv_head = n_head,
  dropout 0) with AdamW at the reference's hyperparameters (lr 1e-3 -> 1e-4, 100 warmup steps,
  betas (0.9, 0.99), weight decay 0.1 on 2-D weights, clip 1.0). Same FLOPs per token up to the
  4 special tokens in our character vocabulary (4 * n_embd parameters of the tied embedding).
  What is left differs by the trainer: fused qkv and fused AdamW, torch.compile, the CPU attention
  kernel, GELU's tanh form (the reference uses the exact erf GELU).

``ratio`` divides our tokens/s over all training steps (a compile included) by the reference's;
``steady_ratio`` uses our median tokens/s after the first 25 steps; ``gpt2_ratio`` and
``gpt2_steady_ratio`` are the same for the gpt2 run. Each ratio is the median over rounds of the
ratio within a round; a round runs ours (preset), the reference, ours (gpt2), back to back, so
machine noise hits each of ours and the reference alike. All train char-level tiny Shakespeare,
fp32 on the CPU, for the same number of iterations. Prints JSON lines and appends a section to
bench/RESULTS.md.

FLOPs per token are the training FLOPs of the PaLM paper's appendix B (nanoGPT's
``estimate_mfu``): ``6 * N + 12 * n_layer * n_embd * block_size``, N the parameters without the
position embedding (the tied token embedding counts once, as the output head's matmul). Ours come
from ``GPT.flops_per_token()``; the reference's from the same formula over its instantiated model.

    python bench/bench_train.py [--iters 300] [--rounds 3] [--full] [--budget 180]

``--full`` also trains the preset's 2000 iterations once each and reports the val loss reached.
``--budget S`` gives each trainer the same wall-clock budget: its iteration count is set from its
own speed in the timed rounds so that its whole warmup + cosine schedule fits S seconds, and the
val loss each reaches is reported (lower is better) with its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
OUT = REPO / "bench" / "out"

OURS = """
import json, statistics, sys
from barkgpt.config import build_configs
from barkgpt.train import train
over = dict(data=sys.argv[1], out_dir=sys.argv[2], max_iters=int(sys.argv[3]), eval_interval=int(sys.argv[3]), log_interval=25)
over.update(json.loads(sys.argv[4]))
model, cfg = build_configs("shakespeare-char", overrides=over)
r = train(model, cfg, quiet=True)
rows = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")]
steady = statistics.median(x["tokens_per_s"] for x in rows if "tokens_per_s" in x and x["step"] > 25)
import resource
print(json.dumps({"tokens_per_s": round(r["tokens_per_s"], 1), "steady_tokens_per_s": round(steady, 1), "val_loss": round(r["val_loss"], 4),
                  "seconds": round(r["train_seconds"], 2), "compile": cfg.compile, "optimizer": cfg.optimizer, "family": model.family,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""

# The reference prints its JSON line; this wrapper adds the peak RSS of that same process.
REFERENCE = """
import json, resource, runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
print(json.dumps({"peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def run_json(cmd: list[str]) -> dict:
    """Run a command and merge the JSON objects on its last stdout lines."""
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if out.returncode != 0:
        sys.exit(f"benchmark command failed: {' '.join(cmd[:4])}...\n{out.stderr[-2000:]}")
    merged = {}
    for line in out.stdout.strip().splitlines()[-2:]:
        if line.startswith("{"):
            merged.update(json.loads(line))
    return merged


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=300, help="iterations per timed run")
    p.add_argument("--rounds", type=int, default=3, help="rounds of (ours preset, reference, ours gpt2), back to back")
    p.add_argument("--full", action="store_true", help="also run 2000 iterations each and compare val loss")
    p.add_argument("--no-compile", action="store_true", help="run ours with --compile false (the preset compiles)")
    p.add_argument(
        "--budget", type=float, default=0, help="also train each for this many seconds of wall clock and compare val loss"
    )
    a = p.parse_args()

    text = SHARED / "data" / "tinyshakespeare.txt"
    ref = SHARED / "bench" / "reference_gpt.py"
    if not text.is_file() or not ref.is_file():
        sys.exit(f"needs {text} and {ref} (the shared/ folder beside the repo)")
    data = OUT / "shakespeare-char"
    if not (data / "meta.json").is_file():
        from barkgpt.data import prepare_dataset

        prepare_dataset(text, data, tokenizer="char")

    from barkgpt.config import build_configs

    preset_model, preset_train = build_configs("shakespeare-char")
    # one shape for both sides, read from the preset and passed to the reference as flags
    shape = {
        "n_layer": preset_model.n_layer,
        "n_head": preset_model.n_head,
        "n_embd": preset_model.n_embd,
        "block_size": preset_model.block_size,
        "batch_size": preset_train.batch_size,
    }
    compile_over = {"compile": False} if a.no_compile else {}
    variants = {
        "preset": {"optimizer": "adamw", **compile_over},  # the preset's model and learning rate, AdamW
        "gpt2": {**gpt2_overrides(shape), **compile_over},
    }

    def ours(iters, over):
        return run_json([sys.executable, "-c", OURS, str(data), str(OUT / "run"), str(iters), json.dumps(over)])

    def reference(iters):
        flags = [f"--{REFERENCE_FLAGS.get(k, k.replace('_', '-'))}={v}" for k, v in {**shape, **REFERENCE_SCHEDULE}.items()]
        return run_json([sys.executable, "-c", REFERENCE, str(ref), "--data", str(text), "--max-iters", str(iters), *flags])

    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    flops = flop_accounting(ref, len(set(text.read_text(encoding="utf-8"))), vocab, variants)
    print(flops["note"], flush=True)

    rows = {"barkgpt": [], "reference": [], "barkgpt_gpt2": []}
    for r in range(a.rounds):  # the reference between our two runs: each of ours is back to back with it
        rows["barkgpt"].append(ours(a.iters, variants["preset"]))
        rows["reference"].append(reference(a.iters))
        rows["barkgpt_gpt2"].append(ours(a.iters, variants["gpt2"]))
        print(json.dumps({"round": r, **{k: v[-1] for k, v in rows.items()}}), flush=True)
    if flops["reference"]["params"] != rows["reference"][0]["params"]:
        sys.exit(
            f"the reference reports {rows['reference'][0]['params']} parameters but its model counts "
            f"{flops['reference']['params']} here; reference_gpt.py changed: update flop_accounting()"
        )
    summary = {
        "iters": a.iters,
        "rounds": a.rounds,
        "reference_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows["reference"]),
    }
    for prefix, key in (("", "barkgpt"), ("gpt2_", "barkgpt_gpt2")):
        pairs = list(zip(rows["reference"], rows[key]))  # each round's runs, back to back
        ratios = [round(o["tokens_per_s"] / r["tokens_per_s"], 3) for r, o in pairs]
        steady = [round(o["steady_tokens_per_s"] / r["tokens_per_s"], 3) for r, o in pairs]
        summary.update(
            {
                f"{key}_tokens_per_s": statistics.median(x["tokens_per_s"] for x in rows[key]),
                f"{prefix}ratio": statistics.median(ratios),
                f"{prefix}ratio_per_round": ratios,
                f"{key}_steady_tokens_per_s": statistics.median(x["steady_tokens_per_s"] for x in rows[key]),
                f"{prefix}steady_ratio": statistics.median(steady),
                f"{prefix}steady_ratio_per_round": steady,
            }
        )
    # model FLOPs per second, ours over the reference's: the steady ratio weighted by the FLOPs per token
    summary["steady_flops_ratio"] = round(summary["steady_ratio"] * flops["preset"]["vs_reference_flops"], 3)
    summary["gpt2_steady_flops_ratio"] = round(summary["gpt2_steady_ratio"] * flops["gpt2"]["vs_reference_flops"], 3)
    summary.update({"compile": not a.no_compile, "flops": flops})
    if a.full:
        summary["full_reference"] = reference(2000)
        summary["full_barkgpt"] = ours(2000, variants["preset"])
    if a.budget:  # ours as the preset trains (Muon), its speed timed first like the rounds above
        ref_spi = statistics.median(x["seconds"] / a.iters for x in rows["reference"])
        our_spi = ours(a.iters, compile_over)["seconds"] / a.iters  # compile included
        ref_iters, our_iters = int(a.budget / ref_spi), int(a.budget / our_spi)
        budget = {"seconds": a.budget, "reference": reference(ref_iters), "barkgpt": ours(our_iters, compile_over)}
        budget["reference"]["iters"], budget["barkgpt"]["iters"] = ref_iters, our_iters
        budget["val_loss_difference"] = round(budget["barkgpt"]["val_loss"] - budget["reference"]["val_loss"], 4)
        summary["budget"] = budget
    print(json.dumps(summary), flush=True)
    write_results("train: shakespeare-char shape and the reference's gpt2 architecture, ours vs reference_gpt.py", summary)


# reference_gpt.py's schedule, passed to it as flags and to ours as overrides
REFERENCE_SCHEDULE = {"learning_rate": 1e-3, "min_lr": 1e-4, "warmup_iters": 100}
REFERENCE_FLAGS = {"learning_rate": "lr"}  # its flag names that are not ours in kebab-case
# reference_gpt.py's constants it has no flags for (its AdamW and clipping)
REFERENCE_FIXED = {"optimizer": "adamw", "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0, "seed": 1337}


def gpt2_overrides(shape: dict) -> dict:
    """Config overrides of the shakespeare-char preset that give our trainer reference_gpt.py's
    model and optimizer: the gpt2 family at the reference's widths (``shape``: n_layer, n_head,
    n_embd, block_size, batch_size), every head its own keys and values, a 4 * n_embd MLP, biases,
    tied embeddings, no dropout, LayerNorm eps 1e-5 (PyTorch's default, which the reference keeps),
    and AdamW with the reference's hyperparameters."""
    return {
        **shape,
        "family": "gpt2",
        "n_kv_head": shape["n_head"],
        "intermediate_size": 4 * shape["n_embd"],
        "bias": True,
        "tie_embeddings": True,
        "dropout": 0.0,
        "norm_eps": 1e-5,
        **REFERENCE_SCHEDULE,
        **REFERENCE_FIXED,
    }


def flop_accounting(ref_path: Path, ref_vocab: int, our_vocab: int, variants: dict) -> dict:
    """Parameter counts and training FLOPs per token of the reference and of each of our variants.

    ``6 * N + 12 * n_layer * n_embd * block_size`` (PaLM, Chowdhery et al. 2022, appendix B; as
    ``GPT.flops_per_token()``), N the parameters without the position embedding. The reference's
    model is instantiated from ``ref_path`` at ``ref_vocab`` tokens (its distinct characters); ours
    (``variants``: name -> preset overrides) at ``our_vocab`` (the characters plus our 4 special
    tokens). Also checks that the ``gpt2`` variant at the reference's vocabulary has exactly the
    reference's parameter count, and exits with the difference if not.

    Returns:
        ``{"formula", "reference": {params, flops_per_token}, name: {family, params,
        flops_per_token, vs_reference_flops}, ..., "note"}`` (FLOPs per token, parameters).
    """
    import importlib.util

    from barkgpt.config import build_configs
    from barkgpt.model import GPT

    spec = importlib.util.spec_from_file_location("reference_gpt", ref_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines the model; its main() only runs as a script

    def ours(over: dict, vocab: int) -> GPT:
        return GPT(build_configs("shakespeare-char", overrides={**over, "vocab_size": vocab, "compile": False})[0])

    same = ours(variants["gpt2"], ref_vocab)  # our gpt2 model at the reference's vocabulary
    c = same.config
    ref_model = module.GPT(ref_vocab, c.block_size, c.n_layer, c.n_head, c.n_embd)
    ref_params = sum(p.numel() for p in ref_model.parameters())  # the tied head counted once
    ref_flops = 6 * (ref_params - ref_model.wpe.weight.numel()) + 12 * c.n_layer * c.n_embd * c.block_size
    same_arch = same.num_params()
    if same_arch != ref_params:
        sys.exit(
            f"our gpt2 model has {same_arch:,} parameters at the reference's {ref_vocab}-token vocabulary and the "
            f"reference {ref_params:,}: the architectures differ; fix gpt2_overrides() to match reference_gpt.py"
        )
    out = {
        "formula": "6 * (params - wpe) + 12 * n_layer * n_embd * block_size (PaLM appendix B; GPT.flops_per_token)",
        "reference": {"params": ref_params, "flops_per_token": ref_flops},
    }
    lines = [f"FLOPs/token: reference {ref_flops / 1e6:.3f}M ({ref_params:,} params, vocab {ref_vocab})"]
    for name, over in variants.items():
        m = ours(over, our_vocab)
        out[name] = {
            "family": m.config.family,
            "params": m.num_params(),
            "flops_per_token": m.flops_per_token(),
            "vs_reference_flops": round(m.flops_per_token() / ref_flops, 4),
        }
        lines.append(
            f"{name} ({m.config.family}): {out[name]['vs_reference_flops']}x the reference's FLOPs/token "
            f"({m.flops_per_token() / 1e6:.3f}M, {m.num_params():,} params)"
        )
    extra = out["gpt2"]["params"] - ref_params
    lines.append(
        f"gpt2 params equal the reference's at its {ref_vocab}-token vocabulary; here ours has {extra:+,}: "
        f"{our_vocab - ref_vocab} special tokens x n_embd {c.n_embd} in the tied embedding"
    )
    out["note"] = "; ".join(lines)
    return out


def write_results(title: str, summary: dict) -> None:
    """Append a dated section with the machine's description to bench/RESULTS.md."""
    import datetime
    import os
    import platform

    cpu = (
        next(
            (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
            platform.processor(),
        )
        if os.path.exists("/proc/cpuinfo")
        else platform.processor()
    )
    import torch

    with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(
            f"\n## {title}\n{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads\n\n```\n{json.dumps(summary, indent=1)}\n```\n"
        )


if __name__ == "__main__":
    main()
