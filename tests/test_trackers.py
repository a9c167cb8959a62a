"""Experiment trackers (barkgpt/trackers.py) writing their files offline beside metrics.jsonl,
and the trainer's wall-clock deadline (TrainConfig.max_time) that a planned run relies on."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.trackers import Trackers


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    from barkgpt.data import prepare_dataset

    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 200)
    prepare_dataset(root / "text.txt", root / "char", tokenizer="char")
    return root / "char"


def test_tensorboard_gets_the_metrics_rows_and_max_time_stops_the_run_with_a_final_eval(tmp_path, char_data):
    pytest.importorskip("tensorboard", reason="tensorboard (the track extra) is not installed")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from barkgpt.train import train

    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())  # torch's one-time optimizer setup (~4 s here) outside the deadline
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy 2-core machine one thread steps steadily (the planner measures this)
    model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)
    cfg = TrainConfig(
        data=str(char_data),
        out_dir=str(tmp_path / "run"),
        batch_size=4,
        max_iters=10**6,  # only the deadline ends this run
        eval_interval=10**5,
        eval_iters=2,
        log_interval=1,
        max_time=4.0,
        log_to=["tensorboard"],
    )
    try:
        result = train(model, cfg, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert 1 <= result["step"] < 10**5 and result["elapsed_s"] <= 4.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == result["step"] and "val_loss" in rows[-1]  # the final evaluation, at the stop
    assert (tmp_path / "run" / "last").is_dir() and (tmp_path / "run" / "best").is_dir()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/train_loss", "train/lr", "train/tokens_per_s", "val/val_loss", "val/val_bpb"} <= set(tags)
    train_steps = [r["step"] for r in rows if "train_loss" in r]
    assert [e.step for e in events.Scalars("train/train_loss")] == train_steps


def test_wandb_offline_writes_its_run_without_a_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb (the track extra) is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default
    monkeypatch.setenv("WANDB_SILENT", "true")
    trackers = Trackers(["wandb"], tmp_path / "run", {"model": {"n_layer": 2}, "train": {"learning_rate": 0.001}})
    trackers.log({"step": 10, "train_loss": 2.5, "lr": 0.001})
    trackers.log({"step": 10, "val_loss": 2.4, "val_bpb": 1.9})
    trackers.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (log,) = runs[0].glob("run-*.wandb")
    assert log.stat().st_size > 0


def test_unknown_or_missing_tracker_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(BarkError, match="--log-to 'mlflow' is not a tracker"):
        TrainConfig(log_to=["mlflow"])
    with pytest.raises(BarkError, match="not a tracker"):
        Trackers(["mlflow"], tmp_path, {})
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if the extra were not installed
    with pytest.raises(BarkError, match=r"--log-to wandb needs the wandb package; pip install 'barkgpt\[track\]'"):
        Trackers(["wandb"], tmp_path, {})
    assert os.environ.get("WANDB_MODE") in (None, "offline")  # nothing here switched wandb online
    assert not Path(tmp_path / "wandb").exists()
