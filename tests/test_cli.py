"""The command line end to end: prepare -> train -> sample, and one-line errors."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*args, ok=True):
    out = subprocess.run([sys.executable, "-m", "barkgpt", *args], capture_output=True, text=True, cwd=REPO, timeout=300)
    if ok:
        assert out.returncode == 0, out.stderr
    return out


def assert_one_line_error(out, *words):
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "in.txt").write_text("ROMEO: O, she doth teach the torches to burn bright!\n" * 300)
    run("prepare", "--input", str(root / "in.txt"), "--tokenizer", "char", "--out", str(root / "data"))
    run("train", "--data", str(root / "data"), "--out-dir", str(root / "run"), "--n-layer", "2", "--n-head", "2",
        "--n-embd", "32", "--block-size", "32", "--max-iters", "30", "--warmup-iters", "3", "--eval-interval", "15",
        "--eval-iters", "2", "--batch-size", "8", "--compile", "false")
    return root


@pytest.mark.slow
def test_end_to_end(trained):
    out = run("sample", "--model", str(trained / "run"), "--prompt", "ROMEO:", "--max-new-tokens", "20", "--seed", "1")
    assert out.stdout.startswith("ROMEO:") and len(out.stdout) > 10
    out = run("sample", "--model", str(trained / "run"), "--num-samples", "3", "--max-new-tokens", "5", "--temperature", "0")
    assert out.stdout.count("--- sample") == 3
    out = run("train", "--preset", "bark", "--n-layer", "3", "--print-config")
    assert "n_layer: 3" in out.stdout and "data: bark" in out.stdout


@pytest.mark.slow
def test_chat_reads_stdin(trained):
    out = subprocess.run([sys.executable, "-m", "barkgpt", "chat", "--model", str(trained / "run"), "--max-new-tokens", "5"],
                         input="hello\nagain\n", capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # replies may hold newlines: only check something came back


@pytest.mark.slow
def test_sampling_errors(trained):
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--temperature", "-1", ok=False), "temperature")
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--top-p", "1.5", ok=False), "top_p")
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--top-k", "-2", ok=False), "top_k")
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--prompt", "x" * 100, ok=False), "block_size", "--truncate")
    run("sample", "--model", str(trained / "run"), "--prompt", "x" * 100, "--truncate", "--max-new-tokens", "3")


def test_config_errors(tmp_path):
    assert_one_line_error(run("train", "--n-embd", "30", "--n-head", "4", "--print-config", ok=False), "n_embd", "n_head")
    assert_one_line_error(run("train", "--n-head", "4", "--n-kv-head", "3", "--print-config", ok=False), "n_kv_head")
    assert_one_line_error(run("train", "--preset", "barkk", ok=False), "bark")
    assert_one_line_error(run("train", "--max-iters", "lots", ok=False), "--max-iters")
    assert_one_line_error(run("train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r"), ok=False), "does not exist")
    assert_one_line_error(run("sample", "--model", str(tmp_path), ok=False), "no checkpoint")


def test_prepare_errors(tmp_path):
    assert_one_line_error(run("prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), ok=False), "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run("prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), ok=False), "empty")
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world\n" * 10)
    assert_one_line_error(run("prepare", "--input", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o"), ok=False), "--errors replace")
    (tmp_path / "ok.txt").write_text("some text here\n" * 50)
    assert_one_line_error(run("prepare", "--input", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "100", ok=False), "vocab")


@pytest.mark.slow
def test_corrupt_weights_are_a_clear_error(trained, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "run" / "last", ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("sample", "--model", str(ckpt), ok=False), "corrupt")
