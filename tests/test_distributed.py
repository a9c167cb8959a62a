"""Multi-process training: 2 CPU ranks under torchrun (gloo), started by ``barkgpt train --nproc 2``.

Two ranks with batch b must log the same losses as one process with batch 2b (each rank takes
its half of every global batch and DDP averages the gradients), resume exactly, refuse a resume
with another world size, and FSDP2 must match DDP and write checkpoints one process loads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available(), reason="this PyTorch has no torch.distributed"),
    pytest.mark.integration,
]

COMMON = [
    "--n-layer",
    "2",
    "--n-head",
    "2",
    "--n-embd",
    "32",
    "--block-size",
    "32",
    "--log-interval",
    "1",
    "--eval-iters",
    "2",
    "--warmup-iters",
    "1",
    "--lr-decay-iters",
    "5",
    "--compile",
    "false",
    "--device",
    "cpu",
    "--gradient-accumulation-steps",
    "2",
]  # accumulation: no_sync on all but the last micro-batch


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiny_text):
    from barkgpt.data import prepare_dataset

    path = tmp_path_factory.mktemp("ddp") / "data"
    text = path.parent / "t.txt"
    text.write_text(tiny_text)
    prepare_dataset(text, path, tokenizer="char")
    return path


def barkgpt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BARKGPT_PROGRESS": ""}
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], capture_output=True, text=True, env=env, timeout=300)


def train_losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in rows if "train_loss" in r]


@pytest.fixture(scope="module")
def two_rank_run(data):
    out = data.parent / "two"
    r = barkgpt(
        "train",
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-iters",
        "5",
        "--eval-interval",
        "5",
        "--nproc",
        "2",
        *COMMON,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: step 5") == 1  # rank 0 alone reports
    return out


def test_two_ranks_match_one_process(data, two_rank_run, tmp_path):
    from barkgpt.cli import main

    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out-dir",
                str(tmp_path / "one"),
                "--batch-size",
                "4",
                "--max-iters",
                "5",
                "--eval-interval",
                "5",
                *COMMON,
            ]
        )
        == 0
    )
    one, two = train_losses(tmp_path / "one"), train_losses(two_rank_run)
    assert len(one) == len(two) == 5
    assert max(abs(a - b) for a, b in zip(one, two)) < 1e-5, (one, two)


def test_two_ranks_resume_exactly(data, two_rank_run, tmp_path, capsys):
    from barkgpt.cli import main

    out = tmp_path / "resumed"
    common = ["--data", str(data), "--out-dir", str(out), "--batch-size", "2", "--eval-interval", "3", "--nproc", "2", *COMMON]
    assert barkgpt("train", *common, "--max-iters", "3").returncode == 0
    r = barkgpt("train", *common, "--max-iters", "5", "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert max(abs(a - b) for a, b in zip(train_losses(out), train_losses(two_rank_run))) < 1e-6
    # the same checkpoint on one process: a clear error, not a silently different batch stream
    single = ["--data", str(data), "--out-dir", str(out), "--batch-size", "2", "--eval-interval", "3", *COMMON]
    assert main(["train", *single, "--max-iters", "6", "--resume"]) == 2
    assert "written by 2 process(es)" in capsys.readouterr().err


def test_fsdp_matches_ddp_and_saves_a_plain_checkpoint(data, two_rank_run):
    from barkgpt.generate import load_generator

    out = data.parent / "fsdp"
    r = barkgpt(
        "train",
        "--data",
        str(data),
        "--out-dir",
        str(out),
        "--batch-size",
        "2",
        "--max-iters",
        "5",
        "--eval-interval",
        "5",
        "--nproc",
        "2",
        "--fsdp",
        "true",
        *COMMON,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "FSDP" in r.stdout
    assert max(abs(a - b) for a, b in zip(train_losses(out), train_losses(two_rank_run))) < 1e-5
    gen = load_generator(out, device="cpu")  # one process loads what two sharded ranks saved
    assert isinstance(gen.generate("The", max_new_tokens=5, temperature=0.0), str)


def test_too_many_processes_is_one_clear_line():
    r = barkgpt("train", "--preset", "bark", "--nproc", "4096")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: --nproc 4096 is more than this machine's") and "Traceback" not in r.stderr
