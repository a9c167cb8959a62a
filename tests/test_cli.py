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
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "in.txt").write_text("ROMEO: O, she doth teach the torches to burn bright!\n" * 300)
    run("prepare", "--input", str(root / "in.txt"), "--tokenizer", "char", "--out", str(root / "data"))
    run(
        "train",
        "--data",
        str(root / "data"),
        "--out-dir",
        str(root / "run"),
        "--n-layer",
        "2",
        "--n-head",
        "2",
        "--n-embd",
        "32",
        "--block-size",
        "32",
        "--max-iters",
        "30",
        "--warmup-iters",
        "3",
        "--eval-interval",
        "15",
        "--eval-iters",
        "2",
        "--batch-size",
        "8",
        "--compile",
        "false",
    )
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
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "chat", "--model", str(trained / "run"), "--max-new-tokens", "5"],
        input="hello\nagain\n",
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # replies may hold newlines: only check something came back


@pytest.mark.slow
def test_sampling_errors(trained):
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--temperature", "-1", ok=False), "temperature")
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--top-p", "1.5", ok=False), "top_p")
    assert_one_line_error(run("sample", "--model", str(trained / "run"), "--top-k", "-2", ok=False), "top_k")
    assert_one_line_error(
        run("sample", "--model", str(trained / "run"), "--prompt", "x" * 100, ok=False), "block_size", "--truncate"
    )
    run("sample", "--model", str(trained / "run"), "--prompt", "x" * 100, "--truncate", "--max-new-tokens", "3")


def test_config_errors(tmp_path):
    assert_one_line_error(run("train", "--n-embd", "30", "--n-head", "4", "--print-config", ok=False), "n_embd", "n_head")
    assert_one_line_error(run("train", "--n-head", "4", "--n-kv-head", "3", "--print-config", ok=False), "n_kv_head")
    assert_one_line_error(run("train", "--preset", "barkk", ok=False), "bark")
    assert_one_line_error(run("train", "--max-iters", "lots", ok=False), "--max-iters")
    assert_one_line_error(
        run("train", "--data", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "r"), ok=False), "does not exist"
    )
    assert_one_line_error(run("sample", "--model", str(tmp_path), ok=False), "no checkpoint")


def test_prepare_errors(tmp_path):
    assert_one_line_error(
        run("prepare", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), ok=False), "missing.txt"
    )
    (tmp_path / "empty.txt").write_text("")
    assert_one_line_error(run("prepare", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"), ok=False), "empty")
    (tmp_path / "bad.txt").write_bytes(b"hello \xff\xfe world\n" * 10)
    assert_one_line_error(
        run("prepare", "--input", str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o"), ok=False), "--errors replace"
    )
    (tmp_path / "ok.txt").write_text("some text here\n" * 50)
    assert_one_line_error(
        run("prepare", "--input", str(tmp_path / "ok.txt"), "--out", str(tmp_path / "o"), "--vocab-size", "100", ok=False),
        "vocab",
    )


@pytest.mark.slow
def test_corrupt_weights_are_a_clear_error(trained, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "run" / "last", ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_one_line_error(run("sample", "--model", str(ckpt), ok=False), "corrupt")


# ---- the parser and the texts that describe it (issue 14: docs that drifted from the code) --------


def subcommands(parser=None) -> dict:
    """Verb -> its subparser, in the order ``barkgpt --help`` lists them."""
    import argparse

    from barkgpt.cli import build_parser

    action = next(a for a in (parser or build_parser())._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_the_module_docstring_lists_every_verb_in_order():
    import re

    import barkgpt.cli

    first_paragraph = barkgpt.cli.__doc__.split("\n\n")[0]
    named = [w for w in re.findall(r"``([a-z]+)``", first_paragraph) if w != "barkgpt"]
    assert named == list(subcommands()), f"cli.py's docstring lists {named}; the parser has {list(subcommands())}"


def test_preset_help_names_every_preset():
    from barkgpt.config import preset_names

    preset = next(a for a in subcommands()["train"]._actions if a.dest == "preset")
    missing = [n for n in preset_names() if n not in preset.help.replace(",", " ").split()]
    assert len(preset_names()) >= 7 and not missing, f"--preset help {preset.help!r} leaves out {missing}"


def test_help_of_every_verb_does_not_import_torch():
    code = (
        "import sys\nfrom barkgpt.cli import main\nfor verb in ([], *[[v] for v in sys.argv[1:]]):\n"
        "    try:\n        main([*verb, '--help'])\n    except SystemExit:\n        pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code, *subcommands()], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stderr.strip() == "False", out.stderr
    assert out.stdout.count("usage: barkgpt") == 1 + len(subcommands())


def until_prose(argv: list[str]) -> list[str]:
    """A command's tokens up to where prose resumes: two words in a row, neither one a flag."""
    for i in range(2, len(argv)):
        if not argv[i].startswith("-") and not argv[i - 1].startswith("-"):
            return argv[:i]
    return argv


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``barkgpt VERB ...`` command the package and README show: backticked in code and YAML,
    and whole lines in the presets' comments and README's code blocks. ``(where, argv)`` pairs."""
    import re
    import shlex

    files = [*(REPO / "barkgpt").rglob("*.py"), *(REPO / "barkgpt" / "configs").glob("*.yaml"), REPO / "README.md"]
    found = []
    for path in files:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            texts = re.findall(r"`barkgpt ([a-z][^`]*)`", line)
            whole = re.match(r"^(?:#\s+)?barkgpt ([a-z].*)$", line)
            if whole and path.suffix in (".yaml", ".md"):
                texts += [part.strip().removeprefix("barkgpt ") for part in whole.group(1).split("&&")]
            for text in texts:
                text = text.replace("\\|", "|").rstrip("\\ ")  # a Markdown table's \|, a shell line continuation
                try:
                    argv = shlex.split(text, comments=True)
                except ValueError:  # prose with an apostrophe
                    argv = text.split()
                found.append((f"{path.relative_to(REPO)}:{n}", until_prose(argv)))
    return found


def test_every_documented_command_names_a_real_verb_flag_and_format():
    verbs = subcommands()
    commands = documented_commands()
    assert len(commands) > 50  # the scan really finds them
    bad = []
    for where, (verb, *rest) in commands:
        if verb not in verbs:
            bad.append(f"{where}: no verb {verb!r}")
            continue
        options = {s for a in verbs[verb]._actions for s in a.option_strings}
        formats = [c for a in verbs[verb]._actions if not a.option_strings for c in (a.choices or ())]
        bad += [
            f"{where}: `barkgpt {verb}` has no {t.split('=')[0]}"
            for t in rest
            if t.startswith("--") and t.split("=")[0] not in options
        ]
        if rest and not rest[0].startswith("-") and rest[0] != "..." and not set(rest[0].split("|")) <= set(formats):
            bad.append(f"{where}: `barkgpt {verb}` takes no argument {rest[0]!r}")
    assert not bad, "\n".join(bad)
