"""The run planner (barkgpt/planner.py): budgets, rules, the pre-flight table and --dry-run,
flags that override the plan, the one-line errors, the trainer's deadline, and a planned run
that ends within its budget and trains."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from barkgpt.cli import build_parser, collect_overrides, main, wants_plan
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.planner import (
    CHAR_MAX_BYTES,
    StepClock,
    choose_tokenizer,
    dropout_for,
    parse_budget,
    plan_run,
    predicted_loss,
)

REPO = Path(__file__).resolve().parents[1]
TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog, and the dog barks back.\n" for i in range(700))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """About 56 KB of text."""
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def keep_threads():
    """The planner sets torch's thread count for the process it plans in; put it back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("2h", 7200), ("1h30m", 5400), ("45", 45), ("2.5m", 150)])
def test_parse_budget(text, seconds):
    assert parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["ten minutes", "", "5x", "0s"])
def test_parse_budget_refuses_what_is_not_a_duration(text):
    with pytest.raises(BarkError, match="--budget"):
        parse_budget(text)


def test_rules():
    assert choose_tokenizer(1 << 20) == ("char", None)
    assert choose_tokenizer(CHAR_MAX_BYTES) == ("bpe", 2048)
    assert choose_tokenizer(10 << 30) == ("bpe", 32768)
    assert [dropout_for(e) for e in (1, 5, 20)] == [0.0, 0.1, 0.2]
    # more tokens help, repeated ones less than fresh ones (Muennighoff et al.'s discount)
    assert predicted_loss(10**6, 4e7, 4e7) < predicted_loss(10**6, 4e7, 4e6) < predicted_loss(10**6, 4e6, 4e6)


def test_wants_plan_for_data_alone_but_not_with_a_preset_or_model_flags():
    parser = build_parser()

    def plans(*argv):
        args = parser.parse_args(["train", *argv])
        return wants_plan(args, {**collect_overrides(args, GPTConfig), **collect_overrides(args, TrainConfig)})

    assert plans("--data", "notes/")  # the newcomer's default: a 10-minute plan
    assert plans("--data", "notes/", "--learning-rate", "0.01")  # train flags override the plan
    assert not plans("--data", "notes/", "--n-layer", "2")  # model flags: the user sizes the model
    assert not plans("--data", "notes/", "--max-iters", "10")
    assert not plans("--preset", "shakespeare-char", "--data", "d")
    assert not plans("--data", "bark")  # a built-in dataset has its preset
    with pytest.raises(BarkError, match="--budget plans the whole run, which --preset fixes"):
        plans("--preset", "shakespeare-char", "--budget", "1m")


def test_dry_run_prints_the_preflight_table_and_the_overrides(corpus, tmp_path, capsys, keep_threads):
    out_dir = tmp_path / "run"
    argv = ["train", "--data", str(corpus), "--budget", "40s", "--dry-run", "--out-dir", str(out_dir)]
    assert main([*argv, "--learning-rate", "0.005", "--n-layer", "2", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"planning a 40s run on {corpus}")
    table = "\n".join(lines)
    for row in ("tokenizer", "model", "tokens/step", "total tokens", "epochs", "FLOPs", "Chinchilla", "memory", "forecast end"):
        assert row in table
    assert "tokenizer     char" in table  # 56 KB: characters
    assert "--learning-rate 0.005 overrides the plan's" in table
    assert "n_layer 2," in table and "--n-layer 2 is yours" in table
    assert lines[-1].startswith("dry run: planned in")
    assert (out_dir / "data" / "meta.json").is_file() and not (out_dir / "metrics.jsonl").exists()  # prepared, not trained


def test_budget_and_corpus_too_small_are_one_line_errors(corpus, tmp_path):
    with pytest.raises(BarkError, match=r"a 5.0s budget is too short to train anything; give --budget 1m"):
        plan_run(5, {"data": str(corpus), "out_dir": str(tmp_path / "a")})
    (tmp_path / "tiny.txt").write_text("woof " * 200)
    with pytest.raises(
        BarkError, match=r"holds only \d+ training tokens \(char\), too few for a useful model; give it more text"
    ):
        plan_run(60, {"data": str(tmp_path / "tiny.txt"), "out_dir": str(tmp_path / "b")})
    with pytest.raises(BarkError, match="pass --data"):
        plan_run(60, {"out_dir": str(tmp_path / "c")})


def test_budget_spent_before_training_says_what_to_do(corpus, tmp_path, keep_threads):
    # a clock that started 27 s ago leaves a 30 s budget nothing to measure and train in
    with pytest.raises(BarkError, match=r"the 30s budget leaves \d+s after preparing the data .*; give --budget 1m or more"):
        plan_run(30, {"data": str(corpus), "out_dir": str(tmp_path / "a"), "device": "cpu"}, started=time.time() - 27)


def test_step_clock_forecast_and_deadline():
    clock = StepClock(max_time=10.0)
    assert clock.eta(100, 1) is None and not clock.out_of_time()
    clock.step_done(3.0)  # the first step (compile) is kept apart
    clock.step_done(0.1)
    clock.eval_done(0.5)
    assert clock.eta(20, 2) == pytest.approx(20 * 0.1 + 2 * 0.5)
    assert clock.eta(1000, 1) <= 10.0  # capped by the deadline
    clock.t0 -= 9.5  # 9.5 s gone: one more step and the final evaluation do not fit
    assert clock.out_of_time()
    assert not StepClock(None).out_of_time()


@pytest.mark.integration
def test_a_planned_run_ends_within_its_budget_and_trains(corpus, tmp_path):
    budget = 30
    cmd = [
        sys.executable,
        "-m",
        "barkgpt",
        "train",
        "--data",
        str(corpus),
        "--budget",
        f"{budget}s",
        "--out-dir",
        str(tmp_path / "r"),
    ]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    wall = time.time() - t0
    assert out.returncode == 0, out.stderr
    assert "wall clock" in out.stdout and "forecast end" in out.stdout
    assert wall <= budget * 1.1 + 1  # the plan's clock runs from process start; +1 s for the interpreter's exit
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train_loss" in r]
    val_rows = [r for r in rows if "val_loss" in r]
    assert train_rows[-1]["step"] >= 50 and "eta_s" in train_rows[-1]
    assert val_rows[-1]["val_loss"] < train_rows[0]["train_loss"] - 0.5  # it learned (char vocab ~40: ln 40 = 3.7 at init)
    assert (tmp_path / "r" / "best").is_dir() and (tmp_path / "r" / "last").is_dir()
