"""Checkpoint folders: recovery from a kill between a save's two renames, and a config.json whose
shapes do not match the weights (one line, from the loader and from the CLI)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path):
    """A run folder with a tiny random model in last/."""
    from barkgpt.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    save_checkpoint(
        tmp_path / "run" / "last", model, Tokenizer.from_words(["<PAD>", "<EOS>", "<BOS>", "<UNK>", *"abcdefg"]), {"step": 3}
    )
    return tmp_path / "run", model


def test_a_checkpoint_left_at_last_old_is_found_by_every_loader(saved):
    """Readers (sample, serve, eval, the page) load last.old as it is and rename nothing: a
    trainer between its two renames would fail its second one if a reader renamed back."""
    from barkgpt.checkpoint import find_checkpoint, load_checkpoint, recover_checkpoint

    run, model = saved
    os.replace(run / "last", run / "last.old")  # a kill between atomic_dir's two renames
    assert find_checkpoint(run / "last") == run / "last.old"  # the folder itself, as sample/serve get it
    loaded, _, config = load_checkpoint(run)  # a run folder, as the page's /load passes it
    assert config["step"] == 3 and torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert not (run / "last").exists() and (run / "last.old").is_dir()  # nothing renamed
    assert recover_checkpoint(run / "best") is None
    assert recover_checkpoint(run / "last", repair=True) == run / "last"  # the trainer's --resume repairs
    assert not (run / "last.old").exists()


@pytest.mark.parametrize(
    "field, value, tensor",
    [
        ("vocab_size", 12, r"transformer\.wte\.weight is \(11, 16\) in the weights but \(12, 16\)"),
        ("n_embd", 32, r"\S+ is \("),
        ("n_kv_head", 2, r"transformer\.h\.0\.attn\.c_attn\.weight is \(32, 16\)"),
    ],
)
def test_a_config_that_does_not_match_the_weights_is_one_line_naming_the_tensor(saved, field, value, tensor):
    from barkgpt.checkpoint import load_model

    run, _ = saved
    path = run / "last" / "config.json"
    config = json.loads(path.read_text())
    config["model"][field] = value
    path.write_text(json.dumps(config))
    with pytest.raises(BarkError, match=f"does not match its config.json: {tensor}") as e:
        load_model(run / "last")
    assert "\n" not in str(e.value)


def test_sample_with_a_mismatched_config_prints_one_line(saved):
    run, _ = saved
    path = run / "last" / "config.json"
    config = json.loads(path.read_text())
    config["model"]["vocab_size"] = 40
    path.write_text(json.dumps(config))
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "sample", "--model", str(run), "--device", "cpu"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "transformer.wte.weight is (11, 16) in the weights but (40, 16)" in out.stderr


def test_the_page_lists_a_checkpoint_left_at_last_old(saved):
    pytest.importorskip("fastapi")
    from barkgpt.server.runfiles import checkpoint_infos

    run, _ = saved
    os.replace(run / "last", run / "last.old")
    infos = checkpoint_infos(run, run.parent.resolve())
    assert [(c["name"], c["step"]) for c in infos] == [("last", 3)]
    assert not (run / "last").exists()  # listed as it is, nothing renamed


def test_train_state_round_trips_through_last_and_restores_the_random_streams(tmp_path):
    """What --resume reads back is what the trainer saved: every field, and RNG states that make
    Python, NumPy and torch draw the same numbers again."""
    import random

    import numpy as np

    from barkgpt.checkpoint import TrainState, rng_state, save_checkpoint, set_rng_state

    torch.manual_seed(1)
    model = GPT(GPTConfig(vocab_size=11, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64))[1].backward()
    opt.step()
    sampler = np.random.default_rng(5)
    state = TrainState(
        step=7,
        best_val_loss=1.25,
        tokens_seen=448,
        elapsed_s=3.5,
        eval_pending=True,
        world_size=1,
        sampler=sampler.bit_generator.state,
        rng=rng_state(),
        optimizer=[opt.state_dict()],
    )
    want = (random.random(), np.random.rand(), torch.rand(1).item(), sampler.integers(1 << 30))
    tok = Tokenizer.from_words(["<PAD>", "<EOS>", "<BOS>", "<UNK>", *"abcdefg"])
    save_checkpoint(tmp_path / "last", model, tok, {"step": 7}, state)
    back = TrainState.load(tmp_path / "last")
    assert (back.step, back.best_val_loss, back.tokens_seen, back.elapsed_s, back.run_id, back.eval_pending) == (
        7,
        1.25,
        448,
        3.5,
        state.run_id,
        True,
    )
    assert torch.equal(back.optimizer[0]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    set_rng_state(back.rng)
    resumed = np.random.default_rng()
    resumed.bit_generator.state = back.sampler
    assert (random.random(), np.random.rand(), torch.rand(1).item(), resumed.integers(1 << 30)) == want


def test_train_state_reads_an_older_runs_dict_and_refuses_unknown_keys():
    from barkgpt.checkpoint import TrainState

    old = TrainState.from_dict(
        {
            "step": 3,
            "best_val_loss": 2.0,
            "tokens_seen": 96,
            "optimizer": {"state": {}},
            "sampler": None,
            "rng": None,
            "run_id": None,
        }
    )
    assert old.optimizer == [{"state": {}}] and old.world_size == 1 and not old.eval_pending and len(old.run_id) == 32
    with pytest.raises(BarkError, match="^trainer state has unknown keys scheduler: .* another --out-dir$") as e:
        TrainState.from_dict({"step": 3, "scheduler": {}})
    assert "\n" not in str(e.value)
    with pytest.raises(BarkError, match="holds no step"):
        TrainState.from_dict({"best_val_loss": 1.0})


def test_an_older_runs_numpy_state_the_key_alone_still_restores():
    import random

    import numpy as np

    from barkgpt.checkpoint import rng_state, set_rng_state

    state = rng_state()
    np.random.seed(3)
    key = np.random.get_state()[1].tolist()  # a fresh seed's position is the key's end (624)
    want = np.random.rand()
    set_rng_state({**state, "numpy": key})
    assert np.random.rand() == want and random.getstate() == state["python"]
