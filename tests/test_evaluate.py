"""Evaluation: bits per byte against an independent computation and the same as training's, unknown
characters, the val split as prepare cut it for the model, prepared folders, and the CLI's errors."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "barkgpt",
            "eval",
            "--model",
            str(tmp_path / "ckpt"),
            "--data",
            str(tmp_path / "new.txt"),
            "--json",
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
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


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    """A 4-step run on a char corpus prepared with val_fraction 0.3 (not prepare's default 0.1)."""
    from barkgpt.data import prepare_dataset
    from barkgpt.train import train

    root = tmp_path_factory.mktemp("char-run")
    (root / "t.txt").write_text("".join(f"To be, or not to be, that is question {i}.\n" for i in range(100)))
    prepare_dataset(root / "t.txt", root / "data", tokenizer="char", val_fraction=0.3)
    model = GPTConfig(block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)
    train(
        model,
        TrainConfig(
            data=str(root / "data"),
            out_dir=str(root / "run"),
            batch_size=4,
            max_iters=4,
            warmup_iters=1,
            eval_interval=4,
            eval_iters=2,
        ),
        quiet=True,
    )
    return root


def test_training_val_bpb_leaves_eos_out(char_run):
    from barkgpt.checkpoint import load_model
    from barkgpt.data import TokenWindows

    row = [json.loads(line) for line in (char_run / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    model, _ = load_model(char_run / "run" / "last")
    windows = TokenWindows(char_run / "data")
    token_bytes = windows.tokenizer.token_bytes()
    nll, n_bytes, n_eos = 0.0, 0, 0
    with torch.no_grad():  # independently: float64 log-probabilities of the eval windows' targets
        for x, y in windows.eval_batches("val", 2, 4, 16):
            logp = torch.log_softmax(model(torch.from_numpy(x), torch.from_numpy(y))[0].double(), dim=-1)
            for b, t in np.ndindex(y.shape):
                if token_bytes[y[b, t]]:
                    nll -= logp[b, t, y[b, t]].item()
                    n_bytes += token_bytes[y[b, t]]
                else:
                    n_eos += 1
    assert n_eos > 0  # the split's closing <EOS> is among the targets: it counts neither loss nor bytes
    assert row["val_bpb"] == pytest.approx(nll / n_bytes / math.log(2), abs=2e-5)


def test_training_and_eval_give_the_same_bpb_for_the_same_model_and_text(tmp_path, tiny_tokenizer):
    """One definition: training's val_bpb (estimate_loss) and barkgpt eval (of the text, and of the
    prepared folder) agree when they score the same tokens with the same context."""
    import contextlib

    from barkgpt.data import TokenWindows, prepare_dataset
    from barkgpt.evaluate import evaluate_text
    from barkgpt.train import estimate_loss

    (tmp_path / "doc.txt").write_text(TEXT, encoding="utf-8")
    ids = tiny_tokenizer.encode(TEXT)
    tiny_tokenizer.save(tmp_path / "tok")
    (tmp_path / "corpus.txt").write_text(TEXT * 10, encoding="utf-8")
    prepare_dataset(tmp_path / "corpus.txt", tmp_path / "data", tokenizer_from=tmp_path / "tok")
    eos = tiny_tokenizer.eos_id
    # val.bin = <EOS> + the text + <EOS>, exactly one window of block_size + 1 tokens: training's
    # window predicts each text token from the same context as eval's, plus the closing <EOS>
    np.array([eos, *ids, eos], dtype=np.uint16).tofile(tmp_path / "data" / "val.bin")
    model = save_random_model(tmp_path / "ckpt", tiny_tokenizer, block_size=len(ids) + 1)
    cfg = TrainConfig(eval_iters=1, batch_size=2, warmup_iters=0)
    train_bpb = estimate_loss(
        model,
        TokenWindows(tmp_path / "data"),
        cfg,
        len(ids) + 1,
        "cpu",
        contextlib.nullcontext(),
        np.array(tiny_tokenizer.token_bytes()),
    )["val_bpb"]
    text = evaluate_text(tmp_path / "ckpt", tmp_path / "doc.txt", device="cpu")
    folder = evaluate_text(tmp_path / "ckpt", tmp_path / "data", split="val", device="cpu")
    assert text["bytes"] == folder["bytes"] == len(TEXT.encode("utf-8"))
    assert train_bpb == pytest.approx(text["bits_per_byte"], rel=1e-5)
    assert folder["bits_per_byte"] == pytest.approx(text["bits_per_byte"], rel=1e-5)


def eval_cli(*args, cwd=REPO):
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "eval", "--device", "cpu", "--json", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), out.stderr


def test_eval_val_split_is_the_one_prepare_used_for_the_model(char_run, tmp_path):
    from barkgpt.data import read_meta
    from barkgpt.evaluate import evaluate_text

    meta = read_meta(char_run / "data")
    got, err = eval_cli("--model", char_run / "run", "--data", char_run / "t.txt", "--split", "val")
    assert got["val_fraction"] == 0.3 and not err
    assert got["tokens"] == meta["val_tokens"] - 1  # every val character but the closing <EOS>
    folder = evaluate_text(char_run / "run", char_run / "data", split="val", device="cpu")  # the prepared tokens
    assert (folder["tokens"], folder["loss"]) == (got["tokens"], pytest.approx(got["loss"], rel=1e-6))
    # a checkpoint from before config.json recorded the split: found through the run's config.yaml
    config_path = char_run / "run" / "best" / "config.json"
    config = json.loads(config_path.read_text())
    shutil.copytree(char_run / "run", tmp_path / "old")
    del config["data"]["val_fraction"]
    (tmp_path / "old" / "best" / "config.json").write_text(json.dumps(config))
    assert evaluate_text(tmp_path / "old", char_run / "t.txt", split="val", device="cpu")["val_fraction"] == 0.3
    # another file: no recorded split, so prepare's default with a note; an explicit value wins
    shutil.copy(char_run / "t.txt", tmp_path / "other.txt")
    guess = evaluate_text(char_run / "run", tmp_path / "other.txt", split="val", device="cpu")
    assert guess["val_fraction"] == 0.1 and "records no split" in guess["note"] and guess["tokens"] < got["tokens"]
    given = evaluate_text(char_run / "run", tmp_path / "other.txt", split="val", val_fraction=0.3, device="cpu")
    assert given["tokens"] == got["tokens"] and given["note"] is None


def test_eval_refuses_a_prepared_folder_of_another_tokenizer(char_run, tmp_path, tiny_tokenizer):
    from barkgpt.common import BarkError
    from barkgpt.evaluate import evaluate_text

    save_random_model(tmp_path / "ckpt", tiny_tokenizer)
    with pytest.raises(BarkError, match="tokenized by another tokenizer"):
        evaluate_text(tmp_path / "ckpt", char_run / "data", device="cpu")
    with pytest.raises(BarkError, match="--val-fraction does not apply"):
        evaluate_text(char_run / "run", char_run / "data", split="val", val_fraction=0.3, device="cpu")


@pytest.mark.parametrize(
    "args, message",
    [
        (
            [],
            "error: barkgpt eval needs --data FILE (a text to score), --bark (the Bark chat rule check) "
            "or --bark-agent (tool calls)",
        ),
        (
            ["--data", "missing.txt"],
            "error: input missing.txt does not exist; pass a .txt/.md/.jsonl/.parquet file (or .gz/.zst), "
            "a folder of .txt/.md files, or a datasets folder (save_to_disk)",
        ),
    ],
)
def test_eval_cli_errors_are_one_line(tmp_path, args, message):
    save_random_model(tmp_path / "ckpt", Tokenizer.train("char", [TEXT]))
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "eval", "--model", str(tmp_path / "ckpt"), "--device", "cpu", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert (out.returncode, out.stderr.strip()) == (2, message)
