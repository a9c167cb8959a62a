"""Evaluation: bits per byte against an independent computation, unknown characters, the val
split as prepare cuts it, val bits per byte in training metrics, and Bark chat end to end."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from barkgpt.config import GPTConfig, TrainConfig
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
TEXT = "Café au lait, naïve 東京 🐶 woof! The quick brown fox. " * 3  # multi-byte characters: bytes != chars


def save_random_model(path, tokenizer, block_size=16):
    from barkgpt.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=block_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32))
    save_checkpoint(path, model, tokenizer)
    return model.eval()


def test_bits_per_byte_equals_an_independent_computation(tmp_path, tiny_tokenizer):
    from barkgpt.evaluate import evaluate_text

    model = save_random_model(tmp_path / "ckpt", tiny_tokenizer)
    (tmp_path / "doc.txt").write_text(TEXT, encoding="utf-8")
    got = evaluate_text(tmp_path / "ckpt", tmp_path / "doc.txt", device="cpu", batch_size=3)
    # Independent: one forward per token, each token scored from the tokens before it in its
    # block of 16 (the sequence being <EOS> + the text), summing log-probabilities in float64.
    seq = [tiny_tokenizer.eos_id, *tiny_tokenizer.encode(TEXT)]
    nll = 0.0
    with torch.no_grad():
        for t in range(1, len(seq)):
            start = (t - 1) // 16 * 16
            logits, _ = model(torch.tensor([seq[start:t]]))
            nll -= torch.log_softmax(logits[0, -1].double(), dim=-1)[seq[t]].item()
    n_bytes = len(TEXT.encode("utf-8"))
    assert n_bytes > len(TEXT)
    assert got["tokens"] == len(seq) - 1 and got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-5)
    assert got["loss"] == pytest.approx(nll / (len(seq) - 1), rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


def test_eval_reports_unknown_characters_instead_of_failing(tmp_path):
    char = Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog\n"])
    save_random_model(tmp_path / "ckpt", char)
    (tmp_path / "new.txt").write_text("the dog § ate ¶ 🐶 café\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "barkgpt", "eval", "--model", str(tmp_path / "ckpt"), "--data",
                          str(tmp_path / "new.txt"), "--json", "--device", "cpu"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["unknown"] == 4  # § ¶ 🐶 é
    assert r["tokens"] == len("the dog § ate ¶ 🐶 café\n") and math.isfinite(r["bits_per_byte"])


def test_eval_val_split_is_the_one_prepare_writes(tmp_path):
    from barkgpt.data import load_split, prepare_dataset, read_documents

    src = tmp_path / "t.txt"
    src.write_text("".join(f"line {i}: some text ünïcode\n" for i in range(300)), encoding="utf-8")
    prepare_dataset(src, tmp_path / "data", tokenizer="char", val_fraction=0.2)
    tok = Tokenizer.load(tmp_path / "data")
    val_text = tok.decode(load_split(tmp_path / "data", "val")).removesuffix("<EOS>")
    assert read_documents(src, "val", 0.2) == [val_text]
    assert "".join(read_documents(src, "train", 0.2)) + val_text == src.read_text(encoding="utf-8")


def test_training_logs_val_bits_per_byte(tmp_path):
    from barkgpt.data import TokenWindows, prepare_dataset
    from barkgpt.train import train

    (tmp_path / "t.txt").write_text("To be, or not to be, that is the question.\n" * 100)
    prepare_dataset(tmp_path / "t.txt", tmp_path / "data", tokenizer="char")
    model = GPTConfig(block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    train(model, TrainConfig(data=str(tmp_path / "data"), out_dir=str(tmp_path / "run"), batch_size=4, max_iters=4,
                             warmup_iters=1, eval_interval=4, eval_iters=2), quiet=True)
    row = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    # the same windows, their target text decoded (the split's closing <EOS> stands for no bytes)
    windows = TokenWindows(tmp_path / "data")
    targets = [y for _, y in windows.eval_batches("val", 2, 4, 16)]
    n_bytes = sum(len(windows.tokenizer.decode(row_, skip_special_tokens=True).encode()) for y in targets for row_ in y)
    n_targets = sum(y.size for y in targets)
    assert n_bytes < n_targets  # the <EOS> is among the targets
    assert row["val_bpb"] == pytest.approx(row["val_loss"] * n_targets / n_bytes / math.log(2), rel=1e-4)


@pytest.fixture(scope="module")
def bark_chat_run(tmp_path_factory):
    """The bark-chat preset, cut to 250 steps on 2,000 generated conversations (~10 s)."""
    from barkgpt.config import build_configs
    from barkgpt.conversations import bark_chat_rows
    from barkgpt.train import train

    out = tmp_path_factory.mktemp("bark-chat") / "run"
    model, cfg = build_configs("bark-chat", None, {"out_dir": str(out), "max_iters": 250, "eval_interval": 250, "warmup_iters": 20})
    train(model, cfg, quiet=True, source=bark_chat_rows(2000))
    return out


@pytest.mark.slow
def test_bark_chat_replies_follow_the_command_rule(bark_chat_run):
    from barkgpt.evaluate import bark_eval
    from barkgpt.generate import load_generator

    r = bark_eval(load_generator(bark_chat_run, device="cpu"), n=100, seed=0)
    assert r["share"] >= 0.95, r["failures"]


@pytest.mark.slow
def test_bark_chat_holds_a_multi_turn_conversation(bark_chat_run):
    from barkgpt.conversations import follows_bark_rule

    commands = ["speak", "sit", "play", "growl", "hello there", "sit"]
    out = subprocess.run([sys.executable, "-m", "barkgpt", "chat", "--model", str(bark_chat_run), "--temperature", "0",
                          "--device", "cpu"], cwd=REPO, input="\n".join(commands) + "\n", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == len(commands)
    assert all(follows_bark_rule(c, r) for c, r in zip(commands, replies)), replies


@pytest.mark.parametrize("args, message", [
    ([], "error: barkgpt eval needs --data FILE (a text to score) or --bark (the Bark chat rule check)"),
    (["--data", "missing.txt"], "error: input missing.txt does not exist; pass a .txt file, a folder of .txt files or a .jsonl file"),
    (["--bark", "--samples", "0"], "error: the number of samples must be at least 1, got 0"),
])
def test_eval_cli_errors_are_one_line(tmp_path, args, message):
    save_random_model(tmp_path / "ckpt", Tokenizer.bark_chat())
    out = subprocess.run([sys.executable, "-m", "barkgpt", "eval", "--model", str(tmp_path / "ckpt"), "--device", "cpu", *args],
                         cwd=tmp_path, capture_output=True, text=True)
    assert (out.returncode, out.stderr.strip()) == (2, message)
