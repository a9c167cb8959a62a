"""The CPU speedrun presets (bench/bench_speedrun.py): they load, build, and evaluate on the
shakespeare-char preset's val windows, so their figures compare with its own."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from barkgpt.config import build_configs, preset_names

SPEEDRUN_PRESETS = ("shakespeare-char-speedrun", "shakespeare-char-10m")
BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_speedrun.py"


def eval_windows(preset: str) -> tuple[int, int]:
    """(block_size, number of evenly spaced eval windows) of a preset: ``TokenWindows.eval_batches``
    spaces ``eval_iters * batch_size`` windows of ``block_size`` tokens over the split."""
    model, train = build_configs(preset=preset)
    return model.block_size, train.eval_iters * train.batch_size


@pytest.mark.parametrize("name", SPEEDRUN_PRESETS)
def test_speedrun_presets_use_shakespeare_chars_val_windows(name):
    assert name in preset_names()
    assert eval_windows(name) == eval_windows("shakespeare-char") == (64, 600)
    model, train = build_configs(preset=name)
    assert train.tokenizer == "char" and train.optimizer == "muon"
    assert train.max_iters > train.warmup_iters


def test_the_bench_checks_the_same_windows():
    spec = importlib.util.spec_from_file_location("bench_speedrun", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert (bench.EVAL_BLOCK_SIZE, bench.EVAL_WINDOWS) == eval_windows("shakespeare-char")


def test_ten_minute_preset_ends_within_ten_minutes():
    """Its ``max_time`` counts from the trainer's start; the imports before it (~2 s) leave the
    last eval inside the 600 s the bench counts from process start."""
    _, train = build_configs(preset="shakespeare-char-10m")
    assert train.fit_to_time and train.max_time is not None and train.max_time <= 590


@pytest.mark.parametrize("name", SPEEDRUN_PRESETS)
def test_speedrun_models_build_and_start_at_uniform_loss(name):
    """A real forward of each preset's model at the character vocabulary (65 characters + 4
    special tokens): the loss at init is near ln(vocab_size)."""
    from barkgpt.model import GPT

    model_cfg, train = build_configs(preset=name, overrides={"vocab_size": 69})
    torch.manual_seed(0)
    model = GPT(model_cfg)
    idx, targets = torch.randint(0, 69, (2, 2, model_cfg.block_size))  # targets apart from idx: tied embeddings
    logits, loss = model(idx, targets)
    assert logits.shape == (2, model_cfg.block_size, 69)
    assert abs(loss.item() - math.log(69)) < 0.5
