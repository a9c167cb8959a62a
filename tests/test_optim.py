"""Optimizers: our Muon against torch.optim.Muon, and which parameters each optimizer gets."""

import pytest
import torch

from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.model import GPT
from barkgpt.optim import Muon, build_optimizers, newton_schulz


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this PyTorch has no torch.optim.Muon to compare with")
@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_matches_torch_muon(shape, adjust):
    """With bfloat16 Newton-Schulz (torch's choice) three steps of ours equal torch.optim.Muon's."""
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(shape))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    ours = Muon([a], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust, ns_dtype=torch.bfloat16)
    theirs = torch.optim.Muon([b], lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    for _ in range(3):
        g = torch.randn(shape)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    assert torch.allclose(a, b, atol=1e-6)
    assert (a - start).abs().max() > 0.01  # and both really moved


def test_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    for shape in [(32, 64), (64, 32)]:
        g = torch.randn(shape)
        x = newton_schulz(g)
        s = torch.linalg.svdvals(x)
        assert x.shape == g.shape and s.min() > 0.5 and s.max() < 1.5  # singular values pushed toward 1
        assert torch.allclose(newton_schulz(g, dtype=torch.float64).float(), x, atol=1e-3)


def test_muon_ns_steps_reach_the_optimizer_and_change_the_update():
    from barkgpt.common import BarkError

    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32))
    _, muon = build_optimizers(model, TrainConfig(optimizer="muon", muon_ns_steps=3), "cpu")
    assert muon.param_groups[0]["ns_steps"] == 3
    g = torch.randn(32, 96, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(newton_schulz(g, 3), newton_schulz(g, 5), atol=1e-3)  # the knob is not a no-op
    with pytest.raises(BarkError, match="muon_ns_steps"):
        TrainConfig(optimizer="muon", muon_ns_steps=0)


def test_wsd_schedule_holds_then_decays_linearly():
    from barkgpt.common import BarkError, get_lr

    cfg = TrainConfig(learning_rate=1e-2, min_lr=0.0, warmup_iters=10, max_iters=110, lr_schedule="wsd", lr_cooldown_frac=0.4)
    assert get_lr(9, cfg) == pytest.approx(1e-2 * 10 / 11)  # the same warmup as cosine
    assert get_lr(10, cfg) == get_lr(70, cfg) == pytest.approx(1e-2)  # stable until 60% of the 100 steps after warmup
    assert get_lr(80, cfg) == pytest.approx(1e-2 * 0.75) and get_lr(90, cfg) == pytest.approx(1e-2 * 0.5)
    assert get_lr(110, cfg) == 0.0 and get_lr(109, cfg) == pytest.approx(1e-2 / 40)
    cosine = TrainConfig(learning_rate=1e-2, min_lr=0.0, warmup_iters=10, max_iters=110)
    assert get_lr(70, cosine) < get_lr(70, cfg)  # not the cosine
    for bad in ({"lr_schedule": "linear"}, {"lr_cooldown_frac": 0.0}):
        with pytest.raises(BarkError, match=next(iter(bad))):
            TrainConfig(**bad)


def test_parameter_split():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, n_expert=4, n_expert_per_token=2))
    adamw_only = build_optimizers(model, TrainConfig(optimizer="adamw"), "cpu")
    assert len(adamw_only) == 1 and sum(len(g["params"]) for g in adamw_only[0].param_groups) == len(list(model.parameters()))
    adamw, muon = build_optimizers(model, TrainConfig(optimizer="muon", learning_rate=1e-3, muon_learning_rate=2e-2), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for g in muon.param_groups for p in g["params"])
    assert muon_names and all(".h." in n and n.endswith(".weight") and "router" not in n for n in muon_names)
    assert "transformer.wte.weight" not in muon_names and "transformer.h.0.mlp.c_fc" not in muon_names  # 3-D experts
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(20.0)
    covered = muon_names + [names[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert sorted(covered) == sorted(names.values())  # every parameter exactly once


def tiny_run(tmp_path, tiny_text, name, **over):
    """Train a tiny char model on ``tiny_text`` in-process; returns (summary, metrics rows)."""
    import json

    from barkgpt.config import build_configs
    from barkgpt.data import prepare_dataset
    from barkgpt.train import train

    data = tmp_path / "data"
    if not data.exists():
        (tmp_path / "t.txt").write_text(tiny_text)
        prepare_dataset(tmp_path / "t.txt", data, tokenizer="char")
    model_over = {k: over.pop(k) for k in list(over) if k in GPTConfig.__dataclass_fields__}
    model_cfg, cfg = build_configs(
        None,
        None,
        {
            "data": str(data),
            "out_dir": str(tmp_path / name),
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "block_size": 32,
            "batch_size": 8,
            "max_iters": 40,
            "eval_interval": 40,
            "eval_iters": 2,
            "log_interval": 10,
            "warmup_iters": 4,
            "compile": False,
            "device": "cpu",
            **model_over,
            **over,
        },
    )
    result = train(model_cfg, cfg, quiet=True)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return result, rows


def test_muon_trains_and_resumes(tmp_path, tiny_text):
    from barkgpt.checkpoint import load_trainer_state

    result, rows = tiny_run(tmp_path, tiny_text, "muon", optimizer="muon", learning_rate=3e-3, muon_learning_rate=1e-2)
    losses = [r["train_loss"] for r in rows if "train_loss" in r]
    assert losses[-1] < losses[0] - 0.5  # it learns
    state = load_trainer_state(tmp_path / "muon" / "last")
    assert len(state["optimizer"]) == 2 and state["optimizer"][1]["state"]  # AdamW and Muon, both saved
    from barkgpt.common import BarkError

    with pytest.raises(BarkError, match="another --optimizer"):  # resuming a Muon run with AdamW
        _resume(tmp_path, tiny_text)


def _resume(tmp_path, tiny_text):
    from barkgpt.config import build_configs
    from barkgpt.train import train

    model_cfg, cfg = build_configs(
        None,
        None,
        {
            "data": str(tmp_path / "data"),
            "out_dir": str(tmp_path / "muon"),
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "block_size": 32,
            "max_iters": 50,
            "warmup_iters": 4,
            "compile": False,
            "device": "cpu",
        },
    )
    train(model_cfg, cfg, resume=True, quiet=True)


def test_moe_run_logs_and_plots_expert_share(tmp_path, tiny_text):
    result, rows = tiny_run(tmp_path, tiny_text, "moe", n_expert=4, n_expert_per_token=2, max_iters=20, eval_interval=20)
    shares = [r["expert_share"] for r in rows if "expert_share" in r]
    assert len(shares) == 2 and all(len(s) == 4 and abs(sum(s) - 1) < 1e-3 for s in shares)
    assert (tmp_path / "moe" / "experts.png").stat().st_size > 1000
    assert result["val_loss"] < 4.0
