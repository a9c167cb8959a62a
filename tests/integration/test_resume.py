"""Exact resume of a real ``barkgpt train`` process after SIGINTs and a SIGKILL at any moment.

One run goes straight through; another is stopped five times, each time resumed with
``--resume``: SIGINTs at exact points of a step and of an evaluation (``BARKGPT_TEST_SIGNAL``,
the test-only hook in ``train.signal_hook_from_env``), a SIGKILL between writing ``best/`` and
``last/``, and a SIGINT at a random moment. Every ``metrics.jsonl`` row (losses, learning rates,
val losses and bits per byte), every sample and the final weights must be equal.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # ~30 s: eight training processes

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "BARKGPT_PROGRESS": ""}  # one thread: deterministic and cheap
TIMING = {"tokens_per_s", "elapsed_s", "mfu", "eta_s"}  # wall-clock fields differ between runs


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from barkgpt.data import prepare_dataset

    root = tmp_path_factory.mktemp("resume-data")
    (root / "text.txt").write_text(
        "".join(f"Citizen {i}: we are accounted poor citizens, the patricians good.\n" for i in range(300))
    )
    prepare_dataset(root / "text.txt", root / "char", tokenizer="char")
    return root / "char"


def train_cmd(data_dir, out_dir, resume=False):
    cmd = [
        sys.executable,
        "-m",
        "barkgpt",
        "train",
        "--data",
        str(data_dir),
        "--out-dir",
        str(out_dir),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "48",
        "--block-size",
        "32",
        "--dropout",
        "0.1",
        "--batch-size",
        "8",
        "--max-iters",
        "60",
        "--warmup-iters",
        "5",
        "--learning-rate",
        "0.003",
        "--eval-interval",
        "20",
        "--eval-iters",
        "2",
        "--log-interval",
        "1",
        "--device",
        "cpu",
    ]
    return cmd + (["--resume"] if resume else [])


def rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def max_step(run):
    path = run / "metrics.jsonl"
    try:
        return max((json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")), default=-1)
    except (OSError, ValueError):
        return -1


def weights(checkpoint):
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "model.safetensors"))


def test_resume_after_sigints_and_a_sigkill_at_any_moment_equals_the_straight_run(tmp_path, data_dir):
    straight = subprocess.Popen(
        train_cmd(data_dir, tmp_path / "straight"),
        cwd=REPO,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    run = tmp_path / "stopped"

    def stop_at(hook, saved_step, resume=True):
        """One process that the hook stops; it must save last/ at ``saved_step`` (SIGINT) or die (SIGKILL)."""
        out = subprocess.run(
            train_cmd(data_dir, run, resume),
            cwd=REPO,
            env={**ENV, "BARKGPT_TEST_SIGNAL": hook},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if hook.startswith("KILL"):
            assert out.returncode == -signal.SIGKILL, out.stderr
        else:
            assert out.returncode == 0 and f"interrupted: saved {run / 'last'} at step {saved_step}" in out.stdout, out.stderr

    stop_at("INT@forward@7", 7, resume=False)  # in a step, before its update: the step is redone
    stop_at("INT@update@12", 13)  # between the optimizer step and zero_grad: the update completes first
    stop_at("INT@eval@20", 20)  # in an evaluation: saved as eval_pending, redone on resume
    stop_at("KILL@best_saved@40", None)  # kill -9 after best/ is written, before last/ records it
    from barkgpt.checkpoint import load_trainer_state

    best, last = json.loads((run / "best" / "config.json").read_text()), load_trainer_state(run / "last")
    assert best["step"] == 40 and last["step"] == 20 and best["val_loss"] < last["best_val_loss"]
    rnd = random.Random(0)
    for _ in range(1):  # and at a moment nobody chose
        start = max_step(run)
        proc = subprocess.Popen(
            train_cmd(data_dir, run, resume=True), cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.time() + 60
        while max_step(run) <= start and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rnd.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    final = subprocess.run(train_cmd(data_dir, run, resume=True), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert straight.wait(timeout=120) == 0, straight.stderr.read()

    want, got = rows(tmp_path / "straight" / "metrics.jsonl"), rows(run / "metrics.jsonl")
    assert [r["step"] for r in want if "train_loss" in r] == list(range(1, 61))
    assert got == want  # every train loss, lr, val loss and bpb, in order, once
    assert rows(run / "samples.jsonl") == rows(tmp_path / "straight" / "samples.jsonl")
    for name in ("last", "best"):
        a, b = weights(tmp_path / "straight" / name), weights(run / name)
        assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a), name
    # best/ holds the model with the recorded best val loss, which is the lowest val loss logged
    best, last = json.loads((run / "best" / "config.json").read_text()), load_trainer_state(run / "last")
    assert (
        best["val_loss"] == last["best_val_loss"] == pytest.approx(min(r["val_loss"] for r in got if "val_loss" in r), abs=1e-5)
    )
