"""The Bark toy at the edge (barkgpt.bark): its vocabularies, generated corpora and rule, the
dataset hook that ``--data bark`` / ``--data bark-chat`` reach it through, and bark-chat end to end."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from barkgpt import bark, data
from barkgpt.bark import (
    BARK_CHAT_VOCAB,
    BARK_VOCAB,
    bark_chat_conversations,
    bark_chat_rows,
    bark_chat_tokenizer,
    bark_documents,
    bark_tokenizer,
    follows_bark_rule,
    prepare_bark,
)
from barkgpt.config import TrainConfig
from barkgpt.data import load_split
from barkgpt.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def barkgpt(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "barkgpt", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


# ---- vocabularies ---------------------------------------------------------------------------


def test_bark_vocab_ids_are_fixed():
    tok = bark_tokenizer()
    assert tok.kind == "word"
    assert tok.vocab_size == 11
    assert [tok.id_to_token(i) for i in range(11)] == list(BARK_VOCAB)
    assert BARK_VOCAB == ("<PAD>", "<EOS>", "woof", "arf", "ruff", "grrr", "User:", "Assistant:", "speak", "<BOS>", "<UNK>")
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 9, 10)
    assert tok.encode("User: speak Assistant: woof arf <EOS>") == [6, 8, 7, 2, 3, 1]
    assert tok.encode("meow") == [10]
    assert tok.id_to_token(11) is None


def test_bark_chat_vocab_and_template():
    tok = bark_chat_tokenizer()
    assert tok.vocab_size == len(BARK_CHAT_VOCAB) == 31 and tok.id_to_token(4) == "User:"
    assert tok.apply_chat_template([{"role": "user", "content": "speak"}]) == "User: speak Assistant:"
    convo = [
        {"role": "system", "content": "be a dog"},
        {"role": "user", "content": "speak"},
        {"role": "assistant", "content": "woof arf"},
        {"role": "user", "content": "sit"},
    ]
    text = tok.apply_chat_template(convo)
    assert text == "User: speak Assistant: woof arf <EOS> User: sit Assistant:"  # system skipped
    assert tok.unk_id not in tok.encode(text)


def test_bark_tokenizers_save_and_load_the_same(tmp_path):
    for i, tok in enumerate((bark_tokenizer(), bark_chat_tokenizer())):
        tok.save(tmp_path / str(i))
        back = Tokenizer.load(tmp_path / str(i))
        assert (back.kind, back.vocab_size, back.chat_template) == (tok.kind, tok.vocab_size, tok.chat_template)
        assert back.encode("User: speak Assistant: woof ruff? <EOS>") == tok.encode("User: speak Assistant: woof ruff? <EOS>")


# ---- the `bark` corpus ----------------------------------------------------------------------


def test_bark_documents_format_and_determinism():
    docs = list(bark_documents(500, seed=7))
    pattern = re.compile(r"User: speak Assistant:( (woof|arf|ruff|grrr)){1,10} <EOS>")
    assert all(pattern.fullmatch(d) for d in docs)
    assert {len(d.split()) - 4 for d in docs} == set(range(1, 11))  # every length 1..10 occurs
    assert docs == list(bark_documents(500, seed=7))
    assert docs != list(bark_documents(500, seed=8))


def test_prepare_bark(tmp_path):
    meta = prepare_bark(tmp_path / "bark", n_docs=100, seed=3)
    tok = Tokenizer.load(tmp_path / "bark")
    assert tok.vocab_size == 11 and meta["tokenizer"] == "word" and meta["source"] == "bark"
    train, val = (load_split(tmp_path / "bark", s).tolist() for s in ("train", "val"))
    docs = list(bark_documents(100, seed=3))
    assert tok.decode(train) == " ".join(docs[:90])  # one EOS per document, none doubled
    assert tok.decode(val) == " ".join(docs[90:])
    assert tok.unk_id not in train + val
    assert prepare_bark(tmp_path / "again", n_docs=100, seed=3) == meta
    with pytest.raises(data.BarkError, match="too few"):
        prepare_bark(tmp_path / "one", n_docs=1)


def test_the_bark_corpus_keeps_its_fingerprint(tmp_path):
    """The corpus every `--data bark` run trains on: 20,000 documents from seed 1337, unchanged by
    the move out of data.py (the numbers data.prepare_bark gave before it)."""
    meta = prepare_bark(tmp_path)
    assert (meta["train_tokens"], meta["val_tokens"]) == (171176, 19123)
    assert meta["source_sha256"] == "2cc8e8d2d58268ab5409dfe6700349f8a0992a0eea475617f5e9c36304edef11"


# ---- the `bark-chat` set and its rule -------------------------------------------------------


def test_bark_rule_and_generated_conversations():
    assert follows_bark_rule("speak", "woof arf woof")
    assert follows_bark_rule("sit", "arf") and not follows_bark_rule("sit", "arf arf")
    assert follows_bark_rule("play", "ruff ruff ruff") and not follows_bark_rule("play", "ruff ruff")
    assert follows_bark_rule("growl", "grrr") and not follows_bark_rule("growl", "woof")
    assert follows_bark_rule("fetch", "ruff?") and follows_bark_rule("sit down", "ruff?")
    assert not follows_bark_rule("hello", "woof") and not follows_bark_rule("speak", "ruff?")
    convs = bark_chat_conversations(500, seed=3)
    assert convs == bark_chat_conversations(500, seed=3)
    assert any(len(c) > 2 for c in convs)  # multi-turn
    for messages in convs:
        for user, reply in zip(messages[::2], messages[1::2]):
            assert follows_bark_rule(user["content"], reply["content"])
    unknown = bark_chat_tokenizer().unk_id
    assert any(unknown in bark_chat_tokenizer().encode(m["content"]) for c in convs for m in c[::2])


def test_bark_chat_rows_masks_only_the_replies():
    rows = bark_chat_rows(50, seed=2)
    assert rows.meta["source"] == "bark-chat" and rows.meta["train_conversations"] == 45
    r = rows.rows("train", 64)
    tok = rows.tokenizer
    targets = {tok.id_to_token(int(i)) for i in r["y"][r["y"] >= 0]}
    assert targets <= {"woof", "arf", "ruff", "grrr", "ruff?", "<EOS>"} and "<EOS>" in targets


# ---- the hook -------------------------------------------------------------------------------


def test_importing_bark_registers_its_datasets():
    assert data.builtin_dataset("bark") is bark.build_bark
    assert data.builtin_dataset("bark-chat") is bark.build_bark_chat


def test_open_source_reaches_the_bark_corpora_through_the_hook(tmp_path):
    from barkgpt.conversations import ChatRows
    from barkgpt.data import TokenWindows
    from barkgpt.train import open_source

    src = open_source(TrainConfig(data="bark", out_dir=str(tmp_path / "run")))
    assert isinstance(src, TokenWindows) and src.meta["source"] == "bark" and src.tokenizer.vocab_size == 11
    assert (tmp_path / "run" / "data" / "meta.json").is_file()
    chat = open_source(TrainConfig(data="bark-chat", out_dir=str(tmp_path / "chat"), seed=5))
    assert isinstance(chat, ChatRows) and chat.splits == bark_chat_rows(seed=5).splits  # the run's seed
    assert not (tmp_path / "chat").exists()  # generated in memory, nothing written


def test_without_the_edge_module_bark_is_just_a_missing_path(tmp_path):
    """The core does not know the toy: in a process that never imports barkgpt.bark, `bark` is a
    path that does not exist, and the error says how to make a name built in."""
    code = (
        "import sys; from barkgpt.config import TrainConfig; from barkgpt.train import open_source\n"
        "try: open_source(TrainConfig(data='bark', out_dir=sys.argv[1]))\n"
        "except Exception as e: print(type(e).__name__, e)\n"
        "print('barkgpt.bark' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    error, loaded = out.stdout.strip().splitlines()
    assert error.startswith("BarkError --data bark does not exist") and "none registered" in error
    assert "import the module that registers it" in error and loaded == "False"


def test_the_cli_trains_on_a_builtin_dataset(tmp_path):
    """`barkgpt train --data bark` reaches the hook because the CLI imports the edge module."""
    out = barkgpt(
        "train",
        "--data",
        "bark",
        "--out-dir",
        str(tmp_path / "run"),
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--block-size",
        "16",
        "--max-iters",
        "2",
        "--warmup-iters",
        "1",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--batch-size",
        "4",
        "--compile",
        "false",
        "--device",
        "cpu",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert "done: step 2" in out.stdout
    assert (tmp_path / "run" / "data" / "meta.json").is_file()


def test_eval_bark_rejects_zero_samples(tmp_path):
    from barkgpt.checkpoint import save_checkpoint
    from barkgpt.config import GPTConfig
    from barkgpt.model import GPT

    tok = bark_chat_tokenizer()
    save_checkpoint(
        tmp_path / "ckpt",
        GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_kv_head=1, n_embd=16)),
        tok,
    )
    out = barkgpt("eval", "--model", str(tmp_path / "ckpt"), "--device", "cpu", "--bark", "--samples", "0", cwd=tmp_path)
    assert (out.returncode, out.stderr.strip()) == (2, "error: the number of samples must be at least 1, got 0")


# ---- bark-chat end to end -------------------------------------------------------------------


@pytest.fixture(scope="module")
def bark_chat_run(tmp_path_factory):
    """The bark-chat preset, cut to 250 steps on 2,000 generated conversations (~10 s)."""
    from barkgpt.config import build_configs
    from barkgpt.train import train

    out = tmp_path_factory.mktemp("bark-chat") / "run"
    model, cfg = build_configs(
        "bark-chat", None, {"out_dir": str(out), "max_iters": 250, "eval_interval": 250, "warmup_iters": 20}
    )
    train(model, cfg, quiet=True, source=bark_chat_rows(2000))
    return out


@pytest.mark.slow
def test_bark_chat_replies_follow_the_command_rule(bark_chat_run):
    from barkgpt.bark import bark_eval
    from barkgpt.generate import load_generator

    r = bark_eval(load_generator(bark_chat_run, device="cpu"), n=100, seed=0)
    assert r["share"] >= 0.95, r["failures"]


@pytest.mark.slow
def test_bark_chat_holds_a_multi_turn_conversation(bark_chat_run):
    commands = ["speak", "sit", "play", "growl", "hello there", "sit"]
    out = subprocess.run(
        [sys.executable, "-m", "barkgpt", "chat", "--model", str(bark_chat_run), "--temperature", "0", "--device", "cpu"],
        cwd=REPO,
        input="\n".join(commands) + "\n",
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    replies = out.stdout.splitlines()
    assert len(replies) == len(commands)
    assert all(follows_bark_rule(c, r) for c, r in zip(commands, replies)), replies
