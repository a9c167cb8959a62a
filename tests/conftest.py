"""Shared fixtures: a tiny model config, a tiny trained tokenizer, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("BARKGPT_PROGRESS", "")  # keep progress bars out of test logs

# Register the Bark toy's generated datasets ("bark", "bark-chat") for tests that train on them
# in-process, as the CLI does before `train` (barkgpt.bark is an edge the core never imports).
import barkgpt.bark  # noqa: F401 - registers the bark and bark-chat datasets for in-process training


@pytest.fixture
def tiny_config():
    """A 2-layer llama-family config with grouped-query attention (n_kv_head=1)."""
    from barkgpt.config import GPTConfig

    return GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=1, n_embd=32)


@pytest.fixture(scope="session")
def tiny_text() -> str:
    """A few KB of varied text (ASCII, accents, CJK, emoji) for tokenizer training."""
    base = (
        "The quick brown fox jumps over the lazy dog. Café, naïve, résumé. 東京は大きい。 "
        "Emoji 🐶🐕 woof! Numbers 12345 and symbols #@$%^&*().\n"
    )
    return base * 40


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_text):
    """A byte-level BPE tokenizer of 300 tokens, trained in-process on ``tiny_text``."""
    from barkgpt.tokenizer import Tokenizer

    return Tokenizer.train("bpe", iter([tiny_text]), vocab_size=300)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` from the repo root; skips the test when it is missing."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real corpora not found at {SHARED_DATA} (the shared/ folder beside the repo)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bark_agent_run(tmp_path_factory) -> Path:
    """The ``bark-agent`` preset trained as ``barkgpt train --preset bark-agent`` trains it (about
    2.5 minutes on 2 idle cores), once per test session for every test that needs the real model;
    or the run folder named by ``BARKGPT_TEST_AGENT_RUN`` (one trained before, to skip it)."""
    if os.environ.get("BARKGPT_TEST_AGENT_RUN"):
        return Path(os.environ["BARKGPT_TEST_AGENT_RUN"])
    from barkgpt.config import build_configs
    from barkgpt.train import train

    out = tmp_path_factory.mktemp("bark-agent") / "run"
    train(*build_configs("bark-agent", None, {"out_dir": str(out)}), quiet=True)
    return out
