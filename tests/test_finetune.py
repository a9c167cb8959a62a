"""Fine-tuning: assistant-only loss, packed rows equal conversations run alone, embedding resize,
and a real run (tinystories base, chat-sample conversations) whose assistant val loss falls."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.conversations import encode_conversation, pack_conversations
from barkgpt.model import GPT

REPO = Path(__file__).resolve().parents[1]
TALK = [
    {"role": "user", "content": "Hi there, dog"},
    {"role": "assistant", "content": "Woof!"},
    {"role": "user", "content": "Sit."},
    {"role": "assistant", "content": "Arf arf."},
]
OTHER = [
    {"role": "system", "content": "Be a dog."},
    {"role": "user", "content": "Play?"},
    {"role": "assistant", "content": "Ruff ruff ruff!"},
]


@pytest.fixture(scope="module")
def chat_tok(tiny_tokenizer):
    return tiny_tokenizer.with_chat_tokens()[0]


def tiny_model(vocab_size, family="llama", block_size=64):
    torch.manual_seed(0)
    kw = {"n_kv_head": 1} if family == "llama" else {}
    return GPT(GPTConfig(family=family, vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=2, n_embd=32, **kw))


def test_user_turn_tokens_get_zero_gradient(chat_tok):
    from barkgpt.train import model_loss

    rows = pack_conversations(chat_tok, [TALK], block_size=64)
    x, y, seg = (torch.from_numpy(rows[k]) for k in ("x", "y", "segments"))
    model = tiny_model(chat_tok.vocab_size)
    logits = {}

    def keep(module, inputs, out):
        if out.requires_grad:
            out.retain_grad()
            logits["out"] = out

    model.lm_head.register_forward_hook(keep)
    model_loss(model, (x, y, seg)).backward()
    grad = logits["out"].grad[0].abs().sum(-1)  # (T,) gradient reaching each position's logits
    ids, is_assistant = encode_conversation(chat_tok, TALK)
    target_pos = np.flatnonzero(is_assistant[1:])  # position t predicts token t + 1
    other_pos = np.setdiff1d(np.arange(64), target_pos)
    assert (grad[target_pos] > 0).all()
    assert (grad[other_pos] == 0).all()  # user, system, role tokens and padding: no gradient at all
    # and the loss is the mean cross-entropy over the assistant tokens only
    with torch.no_grad():
        lp = torch.log_softmax(model(x, y)[0][0], dim=-1)
    want = -np.mean([lp[t, ids[t + 1]].item() for t in target_pos])
    with torch.no_grad():
        assert model_loss(model, (x, y)).item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_packed_row_computes_what_each_conversation_computes_alone(chat_tok, family):
    from barkgpt.train import SegmentMask

    model = tiny_model(chat_tok.vocab_size, family, block_size=128).eval()
    rows = pack_conversations(chat_tok, [TALK, OTHER], block_size=128)
    assert len(rows["x"]) == 1 and rows["segments"][0].max() == 2  # both in one row, then padding
    x, y, seg = (torch.from_numpy(rows[k]) for k in ("x", "y", "segments"))
    with torch.no_grad():
        packed = model(x, y, SegmentMask(seg))[0][0]  # (T, vocab)
        for s in (0, 1):
            pos = (seg[0] == s).nonzero().flatten()
            alone = model(x[:, pos], y[:, pos])[0][0]  # the conversation from position 0, on its own
            torch.testing.assert_close(packed[pos], alone, rtol=1e-4, atol=1e-5)
        unmasked = model(x, y)[0][0]
        pos = (seg[0] == 1).nonzero().flatten()
        assert not torch.allclose(unmasked[pos], packed[pos], atol=1e-3)  # without the mask it would differ


def test_resize_vocab_keeps_old_logits_and_starts_new_rows_at_the_mean():
    from barkgpt.train import resize_vocab

    model = tiny_model(40).eval()
    bigger = resize_vocab(model, 43).eval()
    idx = torch.randint(0, 40, (2, 10))
    with torch.no_grad():
        old, new = model(idx, idx)[0], bigger(idx, idx)[0]
    torch.testing.assert_close(new[..., :40], old)
    wte = bigger.transformer.wte.weight
    torch.testing.assert_close(wte[40:], model.transformer.wte.weight.mean(0).expand(3, -1))
    assert bigger.lm_head.weight.data_ptr() == wte.data_ptr()  # still tied


@pytest.fixture(scope="module")
def base_run(shared_data, tmp_path_factory):
    """A tiny model trained for a few steps on the real TinyStories sample, and 120 real chats."""
    from barkgpt.data import prepare_dataset
    from barkgpt.train import train

    root = tmp_path_factory.mktemp("ft")
    text = (shared_data / "tinystories-train-sample.txt").read_text(encoding="utf-8")[:200_000]
    (root / "stories.txt").write_text(text, encoding="utf-8")
    prepare_dataset(root / "stories.txt", root / "data", tokenizer="bpe", vocab_size=400)
    model = GPTConfig(block_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=48)
    train(
        model,
        TrainConfig(
            data=str(root / "data"),
            out_dir=str(root / "base"),
            batch_size=16,
            max_iters=60,
            warmup_iters=5,
            eval_interval=60,
            eval_iters=2,
            learning_rate=3e-3,
            min_lr=3e-4,
        ),
        quiet=True,
    )
    lines = (shared_data / "chat-sample.jsonl").read_text(encoding="utf-8").splitlines()[:120]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def ft_config(out_dir, **kw):
    base = dict(
        out_dir=str(out_dir),
        batch_size=8,
        max_iters=40,
        warmup_iters=4,
        eval_interval=20,
        eval_iters=4,
        log_interval=5,
        learning_rate=2e-3,
        min_lr=2e-4,
    )
    base.update(kw)
    return TrainConfig(**base)


def val_losses(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.mark.slow
def test_finetune_on_real_chats_lowers_assistant_val_loss(base_run):
    from barkgpt.generate import load_generator
    from barkgpt.train import finetune

    run = base_run / "chat"
    finetune(base_run / "base", base_run / "chat.jsonl", ft_config(run), quiet=True)
    val = val_losses(run)
    assert set(val) == {0, 20, 40}  # step 0 is the base model, before fine-tuning
    assert val[40] < val[20] < val[0] - 0.2  # measured: 4.73, 4.45, 4.37
    for f in ("loss.png", "config.yaml", "last/trainer_state.pt", "best/tokenizer_config.json"):
        assert (run / f).is_file(), f
    gen = load_generator(run, device="cpu")
    assert gen.model.config.vocab_size == gen.tokenizer.vocab_size == 403  # 400 + the three role tokens
    assert gen.chat_prompt([{"role": "user", "content": "Hi"}]) == "<|user|>Hi<EOS><|assistant|>"
    data = json.loads((run / "best" / "config.json").read_text())["data"]
    assert data["source"].endswith("chat.jsonl") and data["tokenizer"] == "bpe"


@pytest.mark.slow
def test_finetune_resume_reproduces_the_uninterrupted_run(base_run):
    from barkgpt.train import finetune

    def train_losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r}

    finetune(
        base_run / "base",
        base_run / "chat.jsonl",
        ft_config(base_run / "straight", max_iters=20, lr_decay_iters=20, eval_iters=1),
        quiet=True,
    )
    finetune(
        base_run / "base",
        base_run / "chat.jsonl",
        ft_config(base_run / "split", max_iters=10, lr_decay_iters=20, eval_iters=1),
        quiet=True,
    )
    finetune(
        base_run / "base",
        base_run / "chat.jsonl",
        ft_config(base_run / "split", max_iters=20, lr_decay_iters=20, eval_iters=1),
        resume=True,
        quiet=True,
    )
    assert train_losses(base_run / "straight") == train_losses(base_run / "split")


def test_finetune_cli_bad_data_is_one_line(base_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"prompt": "x"}\n')
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "barkgpt",
            "finetune",
            "--model",
            str(base_run / "base"),
            "--data",
            str(bad),
            "--out-dir",
            str(tmp_path / "run"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"error: {bad} line 2 has neither a 'messages' list (OpenAI format) nor a 'conversations' "
        f"list (ShareGPT format); convert it to one of them"
    )
