"""Training speed: our trainer against ../shared/bench/reference_gpt.py, side by side in one run.

Timed rounds run ours with AdamW, as the reference trains (the preset itself uses Muon: see
``--budget``). ``ratio`` divides our tokens/s over all training steps (a compile included) by the reference's;
``steady_ratio`` uses our median tokens/s after the first 25 steps. Each ratio is
the median over rounds of the ratio within a round (the two runs of a round are back to back). Both train the shakespeare-char shape (n_layer 4, n_head 4, n_embd 128, block_size 64, batch 12)
on tiny Shakespeare, char-level, fp32 on the CPU, for the same number of iterations. Runs
alternate (reference, ours, reference, ours, ...) so machine noise hits both alike; the median of
each is reported too. Prints JSON lines and appends a section to bench/RESULTS.md.

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
if sys.argv[4] == "0":
    over["compile"] = False
if sys.argv[5] != "preset":
    over["optimizer"] = sys.argv[5]
model, cfg = build_configs("shakespeare-char", overrides=over)
r = train(model, cfg, quiet=True)
rows = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")]
steady = statistics.median(x["tokens_per_s"] for x in rows if "tokens_per_s" in x and x["step"] > 25)
import resource
print(json.dumps({"tokens_per_s": round(r["tokens_per_s"], 1), "steady_tokens_per_s": round(steady, 1), "val_loss": round(r["val_loss"], 4),
                  "seconds": round(r["train_seconds"], 2), "compile": cfg.compile, "optimizer": cfg.optimizer,
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
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (reference, ours)")
    p.add_argument("--full", action="store_true", help="also run 2000 iterations each and compare val loss")
    p.add_argument("--no-compile", action="store_true", help="run ours with --compile false (the preset compiles)")
    p.add_argument("--budget", type=float, default=0, help="also train each for this many seconds of wall clock and compare val loss")
    a = p.parse_args()

    text = SHARED / "data" / "tinyshakespeare.txt"
    ref = SHARED / "bench" / "reference_gpt.py"
    if not text.is_file() or not ref.is_file():
        sys.exit(f"needs {text} and {ref} (the shared/ folder beside the repo)")
    data = OUT / "shakespeare-char"
    if not (data / "meta.json").is_file():
        from barkgpt.data import prepare_dataset

        prepare_dataset(text, data, tokenizer="char")

    def ours(iters, optimizer="adamw"):
        return run_json([sys.executable, "-c", OURS, str(data), str(OUT / "run"), str(iters), "0" if a.no_compile else "1", optimizer])

    def reference(iters):
        return run_json([sys.executable, "-c", REFERENCE, str(ref), "--data", str(text), "--max-iters", str(iters)])

    rows = {"reference": [], "barkgpt": []}
    for r in range(a.rounds):
        rows["reference"].append(reference(a.iters))
        rows["barkgpt"].append(ours(a.iters))
        print(json.dumps({"round": r, "reference": rows["reference"][-1], "barkgpt": rows["barkgpt"][-1]}), flush=True)
    ref_tps = statistics.median(x["tokens_per_s"] for x in rows["reference"])
    our_tps = statistics.median(x["tokens_per_s"] for x in rows["barkgpt"])
    our_steady = statistics.median(x["steady_tokens_per_s"] for x in rows["barkgpt"])
    pairs = list(zip(rows["reference"], rows["barkgpt"]))  # each round's two runs, back to back
    ratios = [round(o["tokens_per_s"] / r["tokens_per_s"], 3) for r, o in pairs]
    steady = [round(o["steady_tokens_per_s"] / r["tokens_per_s"], 3) for r, o in pairs]
    summary = {"iters": a.iters, "rounds": a.rounds, "reference_tokens_per_s": ref_tps,
               "barkgpt_tokens_per_s": our_tps, "ratio": statistics.median(ratios), "ratio_per_round": ratios,
               "barkgpt_steady_tokens_per_s": our_steady, "steady_ratio": statistics.median(steady),
               "steady_ratio_per_round": steady, "compile": not a.no_compile}
    if a.full:
        summary["full_reference"] = reference(2000)
        summary["full_barkgpt"] = ours(2000)
    if a.budget:  # ours as the preset trains (Muon), its speed timed first like the rounds above
        ref_spi = statistics.median(x["seconds"] / a.iters for x in rows["reference"])
        our_spi = ours(a.iters, "preset")["seconds"] / a.iters  # compile included
        ref_iters, our_iters = int(a.budget / ref_spi), int(a.budget / our_spi)
        budget = {"seconds": a.budget, "reference": reference(ref_iters), "barkgpt": ours(our_iters, "preset")}
        budget["reference"]["iters"], budget["barkgpt"]["iters"] = ref_iters, our_iters
        budget["val_loss_difference"] = round(budget["barkgpt"]["val_loss"] - budget["reference"]["val_loss"], 4)
        summary["budget"] = budget
    print(json.dumps(summary), flush=True)
    write_results("train: shakespeare-char shape, ours vs reference_gpt.py", summary)


def write_results(title: str, summary: dict) -> None:
    """Append a dated section with the machine's description to bench/RESULTS.md."""
    import datetime
    import os
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    import torch

    with open(REPO / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(f"\n## {title}\n{datetime.date.today()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
                f"{torch.get_num_threads()} threads\n\n```\n{json.dumps(summary, indent=1)}\n```\n")


if __name__ == "__main__":
    main()
