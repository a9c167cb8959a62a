"""Training: exact resume, atomic checkpoints under SIGKILL, recovery from kills (last.old, leftovers,
torn metrics lines), SIGINT held through the update, NaN guard, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    from barkgpt.data import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    src = root / "text.txt"
    src.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    prepare_dataset(src, root / "char", tokenizer="char")
    return root / "char"


def tiny(out_dir, data, **kw):
    model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    base = dict(
        data=str(data),
        out_dir=str(out_dir),
        batch_size=4,
        max_iters=20,
        warmup_iters=2,
        eval_interval=10,
        eval_iters=2,
        log_interval=1,
        learning_rate=3e-3,
        min_lr=3e-4,
    )
    base.update(kw)
    return model, TrainConfig(**base)


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}


def test_loss_falls_and_files_are_written(tmp_path, char_data):
    from barkgpt.train import train

    result = train(*tiny(tmp_path / "run", char_data, max_iters=40), quiet=True)
    run = tmp_path / "run"
    for f in (
        "config.yaml",
        "metrics.jsonl",
        "loss.png",
        "samples.jsonl",
        "last/model.safetensors",
        "last/trainer_state.pt",
        "last/tokenizer.json",
        "best/config.json",
    ):
        assert (run / f).is_file(), f
    curve = losses(run)
    assert curve[40] < curve[1] - 0.5
    assert result["val_loss"] is not None


def test_resume_reproduces_the_uninterrupted_run(tmp_path, char_data):
    from barkgpt.train import train

    train(*tiny(tmp_path / "straight", char_data, max_iters=20, lr_decay_iters=20), quiet=True)
    train(*tiny(tmp_path / "split", char_data, max_iters=10, lr_decay_iters=20), quiet=True)
    train(*tiny(tmp_path / "split", char_data, max_iters=20, lr_decay_iters=20), resume=True, quiet=True)
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")


def test_resume_errors(tmp_path, char_data):
    from barkgpt.train import train

    with pytest.raises(BarkError, match="no checkpoint"):
        train(*tiny(tmp_path / "none", char_data), resume=True, quiet=True)
    train(*tiny(tmp_path / "run", char_data, max_iters=10), quiet=True)
    model, cfg = tiny(tmp_path / "run", char_data, max_iters=20)
    model.n_layer = 3
    with pytest.raises(BarkError, match="n_layer"):
        train(model, cfg, resume=True, quiet=True)


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, char_data):
    from barkgpt.checkpoint import load_model
    from barkgpt.train import train

    train(*tiny(tmp_path / "run", char_data, max_iters=10), quiet=True)
    with pytest.raises(BarkError, match="loss became"):
        train(
            *tiny(tmp_path / "run", char_data, max_iters=40, learning_rate=1e6, min_lr=1e5, grad_clip=0.0),
            resume=True,
            quiet=True,
        )
    load_model(tmp_path / "run" / "last")  # still loadable


def test_block_size_larger_than_val_split(tmp_path, char_data):
    from barkgpt.train import train

    model, cfg = tiny(tmp_path / "run", char_data)
    model.block_size = 5000
    with pytest.raises(BarkError, match="block_size"):
        train(model, cfg, quiet=True)


KILL_SCRIPT = """
import sys, torch
from barkgpt.checkpoint import save_checkpoint
from barkgpt.config import GPTConfig
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer
tok = Tokenizer.from_words(["<PAD>", "<EOS>", "<BOS>", "<UNK>", *"abcdefg"])
model = GPT(GPTConfig(vocab_size=11, block_size=32, n_layer=4, n_head=4, n_embd=256))
print("ready", flush=True)
i = 0
while True:
    with torch.no_grad():
        model.lm_head.weight.fill_(float(i))
    save_checkpoint(sys.argv[1], model, tok, {"step": i}, {"step": i, "blob": torch.zeros(300_000)})
    i += 1
"""


def test_sigkill_during_checkpoint_write_leaves_a_loadable_checkpoint(tmp_path):
    from barkgpt.checkpoint import load_model

    target = tmp_path / "last"
    for delay in (0.05, 0.13, 0.27, 0.41):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(target)], stdout=subprocess.PIPE, cwd=REPO)
        assert proc.stdout.readline().strip() == b"ready"
        while not (target / "config.json").exists():
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        model, config = load_model(target)
        assert model.lm_head.weight[0, 0].item() == config["step"]  # weights and config from the same save


def test_ctrl_c_saves_last_and_exits_cleanly(tmp_path, char_data):
    cmd = [
        sys.executable,
        "-m",
        "barkgpt",
        "train",
        "--data",
        str(char_data),
        "--out-dir",
        str(tmp_path / "run"),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "16",
        "--max-iters",
        "100000",
        "--warmup-iters",
        "2",
        "--eval-interval",
        "100000",
        "--log-interval",
        "1",
        "--batch-size",
        "4",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 5):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "interrupted" in out and "--resume" in out
    from barkgpt.checkpoint import load_trainer_state

    assert load_trainer_state(tmp_path / "run" / "last")["step"] >= 5


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, char_data):
    """A 10-step run (one evaluation) to copy and then damage as a kill would."""
    from barkgpt.train import train

    run = tmp_path_factory.mktemp("short") / "run"
    train(*tiny(run, char_data, max_iters=10), quiet=True)
    return run


def copy_run(short_run, tmp_path):
    import shutil

    return Path(shutil.copytree(short_run, tmp_path / "run"))


def test_resume_recovers_last_from_a_kill_between_its_two_renames(tmp_path, char_data, short_run):
    from barkgpt.train import train

    run = copy_run(short_run, tmp_path)
    os.replace(run / "last", run / "last.old")  # atomic_dir's state between its two renames
    result = train(*tiny(run, char_data, max_iters=12), resume=True, quiet=True)
    assert result["step"] == 12 and (run / "last").is_dir() and not (run / "last.old").exists()
    assert sorted(losses(run)) == list(range(1, 13))  # the run went on, nothing was wiped


def test_resume_without_a_checkpoint_never_advises_wiping_the_run(tmp_path, char_data, short_run):
    import shutil

    from barkgpt.train import train

    run = copy_run(short_run, tmp_path)
    shutil.rmtree(run / "last")
    with pytest.raises(BarkError) as e:
        train(*tiny(run, char_data), resume=True, quiet=True)
    message = str(e.value)
    assert "new --out-dir" in message and "metrics.jsonl" in message and "without --resume" not in message
    with pytest.raises(BarkError, match="drop --resume to start a new run"):  # nothing there to lose
        train(*tiny(tmp_path / "empty", char_data), resume=True, quiet=True)


def test_start_removes_what_killed_saves_left_behind(tmp_path, char_data, short_run):
    from barkgpt.train import train

    run = copy_run(short_run, tmp_path)
    leftovers = [run / ".last.k3j2.tmp", run / ".best.x9.tmp", run / "last.old", run / "best.old"]
    for d in leftovers:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    (run / ".metrics.jsonl.abc.tmp").write_text("{")
    (run / ".loss.png.q1.tmp").write_bytes(b"x")
    keep = [run / "notes.tmp", run / ".my.tmp", run / "last.older"]
    for f in keep:
        f.write_text("mine")
    train(*tiny(run, char_data, max_iters=11), resume=True, quiet=True)
    assert not [p for p in [*leftovers, run / ".metrics.jsonl.abc.tmp", run / ".loss.png.q1.tmp"] if p.exists()]
    assert all(f.read_text() == "mine" for f in keep)


def test_a_torn_last_metrics_line_is_dropped_a_torn_middle_line_is_named(tmp_path, char_data, short_run, capsys):
    from barkgpt.train import train

    run = copy_run(short_run, tmp_path)
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"step": 11, "train_lo')  # a kill in the middle of a write
    train(*tiny(run, char_data, max_iters=12), resume=True, quiet=True)
    n = good.count("\n") + 1
    assert f"metrics.jsonl line {n} is torn" in capsys.readouterr().err
    assert sorted(losses(run)) == list(range(1, 13))
    metrics.write_text(good.replace("\n", "\n{oops\n", 1))
    with pytest.raises(BarkError, match=r"metrics.jsonl line 2 is not a JSON row"):
        train(*tiny(run, char_data, max_iters=13), resume=True, quiet=True)


def test_sigint_is_held_through_the_update_and_raised_after_it():
    from barkgpt.train import DeferredSigint

    done = []
    with DeferredSigint() as sigint:
        with pytest.raises(KeyboardInterrupt):
            with sigint.critical():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
                done.append("update")  # still runs: the SIGINT waits for the end of the block
        with pytest.raises(KeyboardInterrupt):  # outside the block it interrupts at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)
    assert done == ["update"]


def test_evaluations_count_from_the_latest_one_when_the_interval_changes():
    """``fit_to_time`` can change ``eval_interval`` right after an evaluation: the next one is a
    whole new interval later, not at the next multiple of the new interval a few steps on; a run
    that never changes it evaluates on the same grid as before (state without an evaluation yet,
    or from an older checkpoint, is on the grid)."""
    from types import SimpleNamespace

    from barkgpt.checkpoint import TrainState
    from barkgpt.train import Trainer

    def trainer(step, last, interval, max_iters=3000):
        st = TrainState(step=step, last_eval_step=last)
        return SimpleNamespace(state=st, cfg=SimpleNamespace(eval_interval=interval, max_iters=max_iters))

    due = lambda *a: Trainer.eval_due(trainer(*a))  # noqa: E731
    left = lambda *a: Trainer.evals_left(trainer(*a))  # noqa: E731
    assert [s for s in range(1, 1300) if due(s, None, 576)] == [576, 1152]  # no evaluation yet: the grid
    assert not due(586, 576, 586) and due(1162, 576, 586)  # re-fitted to 586 after the eval at 576
    assert due(3000, 2900, 586)  # the last step always
    assert left(600, 576, 586) == math.ceil((3000 - 576) / 586) == left(1000, 576, 586)
    assert left(700, None, 100) == math.ceil(3000 / 100) - 700 // 100  # the grid's count, as before
