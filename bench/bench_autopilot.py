"""The run planner against a grid at the same wall clock (issue 17's acceptance).

For each corpus and budget: one planned run (``barkgpt train --data X --budget B``) and a grid of
model sizes x learning rates, each grid run given the same budget through the same deadline
(``--budget B`` with its shape and learning rate as flags: the plan then measures only that shape
and fits its steps to the time). Every run is a fresh process, timed from start to exit. Scored
on the same val text: the val split (the last 10% of the corpus bytes) with ``barkgpt eval
--split val``, in bits per byte, which does not depend on the tokenizer.

Reported per run: wall clock and its ratio to the budget (target: within 10%), val bits per
byte, and the ETA check: the forecast end at 10% of the steps (``elapsed_s + eta_s`` of that
``metrics.jsonl`` row) against the run's actual end (target: within 15%). Per corpus and budget:
the plan's bpb over the grid's best (target: within 3%).

Corpora: tiny Shakespeare and the TinyStories sample (../shared/data), and ``stdlib``: this
interpreter's own standard library ``.py`` files, concatenated in sorted order to 2 MB (Python
source: a third kind of text, on every machine).

    python bench/bench_autopilot.py [--budgets 2m,10m] [--corpora shakespeare,tinystories,stdlib]
        [--sizes 2x64,4x128,6x256] [--lrs 0.001,0.002,0.004] [--no-results]

The full acceptance (3 corpora x 2 budgets x 10 runs) takes about 4.5 hours; while the file
``bench/out/autopilot/pause`` exists no new run starts (the machine is free for something else
between runs, and every run still gets it alone). A short version:
``--budgets 1m --corpora shakespeare --sizes 2x64,4x128 --lrs 0.002,0.004``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
OUT = REPO / "bench" / "out" / "autopilot"
STDLIB_BYTES = 2 << 20


def corpus_path(name: str) -> Path:
    """The text file of corpus ``name`` (``stdlib`` is written on first use)."""
    if name == "shakespeare":
        return SHARED / "tinyshakespeare.txt"
    if name == "tinystories":
        return SHARED / "tinystories-train-sample.txt"
    if name != "stdlib":
        raise SystemExit(f"unknown corpus {name!r}; use shakespeare, tinystories or stdlib")
    path = OUT / "stdlib.txt"
    if not path.exists():
        OUT.mkdir(parents=True, exist_ok=True)
        parts, size = [], 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if "test" in f.parts or "site-packages" in f.parts:
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text.encode())
            if size >= STDLIB_BYTES:
                break
        path.write_text("\n".join(parts), encoding="utf-8")
    return path


def run(label: str, data: Path, budget: str, seconds: float, flags: list[str]) -> dict:
    """One run in a fresh process: its wall clock, val bits per byte and ETA check."""
    out_dir = OUT / label
    while (OUT / "pause").exists():  # `touch bench/out/autopilot/pause` frees the machine between runs
        time.sleep(1)
    cmd = [sys.executable, "-m", "barkgpt", "train", "--data", str(data), "--budget", budget, "--out-dir", str(out_dir), *flags]
    t0 = time.time()
    stamps, proc = watch(cmd, out_dir / "metrics.jsonl")
    wall = time.time() - t0
    row = {"run": label, "flags": flags, "wall_s": round(wall, 1), "wall_vs_budget": round(wall / seconds, 3)}
    if proc.returncode:
        return {**row, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    plan = [line for line in proc.stdout.splitlines() if line.startswith("  model") or line.startswith("  steps")]
    row["plan"] = [line.strip() for line in plan]
    ev = subprocess.run(
        [sys.executable, "-m", "barkgpt", "eval", "--model", str(out_dir), "--data", str(data), "--split", "val", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    if ev.returncode == 0:
        row["val_bpb"] = round(json.loads(ev.stdout.strip().splitlines()[-1])["bits_per_byte"], 4)
    row.update(eta_check(stamps, t0 + wall))
    return row


def watch(cmd: list[str], metrics: Path) -> tuple[list[tuple[float, dict]], subprocess.CompletedProcess]:
    """Run ``cmd``, stamping each ``metrics.jsonl`` row with the wall-clock time it appeared
    (polled every 0.2 s); returns the stamped rows and the finished process."""
    import tempfile

    stamps, seen = [], 0
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)
        while True:
            done = p.poll() is not None
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                now = time.time()
                for line in lines[seen:]:
                    if line.endswith("}"):
                        stamps.append((now, json.loads(line)))
                        seen += 1
            if done:
                break
            time.sleep(0.2)
        out.seek(0), err.seek(0)
        return stamps, subprocess.CompletedProcess(cmd, p.returncode, out.read(), err.read())


def eta_check(stamps: list[tuple[float, dict]], end: float) -> dict:
    """The progress ETA at 10% of the steps against the process's actual end: the forecast end
    (when that row appeared + its ``eta_s``) and the error relative to the time that was left."""
    train = [(t, r) for t, r in stamps if "eta_s" in r]
    if not train:
        return {}
    t, row = next((t, r) for t, r in train if r["step"] >= 0.1 * train[-1][1]["step"])
    left = end - t
    return {"eta_at_10pct_left_s": row["eta_s"], "actual_left_s": round(left, 1), "eta_error": round(row["eta_s"] / left - 1, 3)}


def grid_flags(size: str, lr: str) -> list[str]:
    """The flags of one grid point: ``LxE`` (n_layer x n_embd, head_dim 32 as the plan's ladder
    below 384 wide) and a learning rate."""
    n_layer, n_embd = (int(x) for x in size.split("x"))
    n_head = max(1, n_embd // 32)
    heads = ["--n-head", str(n_head), "--n-kv-head", str(max(1, n_head // 4))]  # the plan's ladder: one kv head per 4
    return ["--n-layer", str(n_layer), "--n-embd", str(n_embd), *heads, "--learning-rate", lr]


def main() -> None:
    """Run the plan and the grid for each corpus and budget; print and save the summary."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="2m,10m")
    p.add_argument("--corpora", default="shakespeare,tinystories,stdlib")
    p.add_argument("--sizes", default="2x64,4x128,6x256", help="grid model sizes, n_layer x n_embd")
    p.add_argument("--lrs", default="0.001,0.002,0.004", help="grid learning rates")
    p.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = p.parse_args()
    from barkgpt.planner import parse_budget

    summary = []
    for corpus in args.corpora.split(","):
        data = corpus_path(corpus)
        for budget in args.budgets.split(","):
            seconds = parse_budget(budget)
            runs = [run(f"{corpus}-{budget}-plan", data, budget, seconds, [])]
            print(json.dumps(runs[-1]), flush=True)
            for size in args.sizes.split(","):
                for lr in args.lrs.split(","):
                    runs.append(run(f"{corpus}-{budget}-{size}-lr{lr}", data, budget, seconds, grid_flags(size, lr)))
                    print(json.dumps(runs[-1]), flush=True)
            scored = [r for r in runs[1:] if "val_bpb" in r]
            best = min(scored, key=lambda r: r["val_bpb"]) if scored else None
            plan_bpb = runs[0].get("val_bpb")
            entry = {
                "corpus": corpus,
                "budget": budget,
                "plan_bpb": plan_bpb,
                "grid_best_bpb": best["val_bpb"] if best else None,
                "grid_best": best["run"] if best else None,
                "plan_vs_best": round(plan_bpb / best["val_bpb"] - 1, 4) if best and plan_bpb else None,
                "max_wall_vs_budget": max(r["wall_vs_budget"] for r in runs),
                "max_abs_eta_error": max((abs(r["eta_error"]) for r in runs if "eta_error" in r), default=None),
                "runs": runs,
            }
            summary.append(entry)
            print(json.dumps({k: v for k, v in entry.items() if k != "runs"}), flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    if not args.no_results:
        sys.path.insert(0, str(REPO / "bench"))
        from bench_train import write_results

        write_results(f"autopilot: plan vs grid ({args.budgets}; {args.corpora})", summary)


if __name__ == "__main__":
    main()
