"""Tests for barkgpt.data: preparing .txt / folder / .jsonl input, errors, determinism, the
real tiny Shakespeare, generated documents, the built-in dataset hook and get_batch."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from barkgpt import data
from barkgpt.common import BarkError
from barkgpt.data import builtin_dataset, get_batch, load_split, prepare_dataset, prepare_documents, read_meta, register_dataset
from barkgpt.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

TEXT = "".join(f"Line {i}: the quick brown fox, number {i * 7}.\n" for i in range(200))  # ~9 KB


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT)
    return path


def tokens(out, split):
    return load_split(out, split).tolist()


def test_prepare_text_writes_bins_meta_and_tokenizer(text_file, tmp_path):
    out = tmp_path / "out"
    meta = prepare_dataset(text_file, out, tokenizer="char")
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.bin",
        "val.bin",
    ]
    assert read_meta(out) == meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"] == "char" and meta["dtype"] == "uint16" and meta["val_fraction"] == 0.1
    assert meta["source_sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()
    assert "unknown_count" not in meta
    tok = Tokenizer.load(out)
    assert meta["vocab_size"] == tok.vocab_size == 4 + len(set(TEXT))
    train, val = tokens(out, "train"), tokens(out, "val")
    assert (len(train), len(val)) == (meta["train_tokens"], meta["val_tokens"])
    assert load_split(out, "train").dtype == np.uint16
    # Each split ends with EOS; together they are the whole text, split at a line boundary
    # within the last 10%.
    assert train[-1] == val[-1] == tok.eos_id
    head, tail = tok.decode(train[:-1]), tok.decode(val[:-1])
    assert head + tail == TEXT
    assert head.endswith("\n") and 0.9 * len(TEXT) <= len(head) < 0.9 * len(TEXT) + 60


def test_prepare_is_deterministic(text_file, tmp_path):
    for kind in ("bpe", "char"):
        a, b = tmp_path / f"a{kind}", tmp_path / f"b{kind}"
        prepare_dataset(text_file, a, tokenizer=kind, vocab_size=300 if kind == "bpe" else None)
        prepare_dataset(text_file, b, tokenizer=kind, vocab_size=300 if kind == "bpe" else None)
        for name in ("train.bin", "val.bin", "meta.json", "tokenizer.json", "tokenizer_config.json"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_prepare_bpe_defaults_and_round_trip(text_file, tmp_path):
    meta = prepare_dataset(text_file, tmp_path / "out")  # bpe, vocab 2048 requested
    tok = Tokenizer.load(tmp_path / "out")
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] <= 2048
    train, val = tokens(tmp_path / "out", "train"), tokens(tmp_path / "out", "val")
    assert tok.decode(train[:-1]) + tok.decode(val[:-1]) == TEXT


def test_chunked_encoding_equals_whole_encoding(tmp_path, monkeypatch):
    # Tiny chunks force many cuts; indentation, blank-line runs, CRLF and a long unspaced line
    # are where a careless cut would change byte-level BPE's pre-tokens.
    text = ("def f(x):\n    return x  \n\n\n\nclass A:\r\n\r\n  pass \t\n" + "é" * 150 + "\n" + "word " * 30 + "\n") * 12
    (tmp_path / "in.txt").write_text(text)
    monkeypatch.setattr(data, "CHUNK_BYTES", 37)
    monkeypatch.setattr(data, "BATCH_BYTES", 100)
    prepare_dataset(tmp_path / "in.txt", tmp_path / "out", "bpe", 300, val_fraction=0.5)
    tok = Tokenizer.load(tmp_path / "out")
    train = tokens(tmp_path / "out", "train")
    head = tok.decode(train[:-1])
    assert train == tok.encode(head) + [tok.eos_id]
    assert tokens(tmp_path / "out", "val") == tok.encode(text[len(head) :]) + [tok.eos_id]


@pytest.fixture
def shakespeare():
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"tiny Shakespeare not found at {path} (the shared data folder is missing)")
    return path


def test_tiny_shakespeare_char(shakespeare, tmp_path):
    meta = prepare_dataset(shakespeare, tmp_path / "out", tokenizer="char")
    assert meta["vocab_size"] == 65 + 4
    assert meta["train_tokens"] + meta["val_tokens"] == 1115394 + 2  # every char, one EOS per split
    assert meta["source_sha256"] == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert "unknown_count" not in meta
    assert 0.09 < meta["val_tokens"] / meta["train_tokens"] < 0.12


def test_folder_input_one_document_per_file(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    docs = {"b.txt": "bravo bravo\nbravo", "a.txt": "alpha alpha alpha\n", "c.txt": "charlie " * 20, "empty.txt": ""}
    for name, text in docs.items():
        (folder / name).write_text(text)
    (folder / "notes.pdf").write_text("ignored: neither .txt nor .md")
    meta = prepare_dataset(folder, tmp_path / "out", tokenizer="word", val_fraction=0.3)
    tok = Tokenizer.load(tmp_path / "out")
    order = ["a.txt", "b.txt", "c.txt"]  # sorted; empty.txt adds nothing
    concat = "".join(docs[n] for n in order)
    assert meta["source_sha256"] == hashlib.sha256(concat.encode()).hexdigest()
    ids = tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")
    expected = []
    for n in order:
        expected += tok.encode(docs[n]) + [tok.eos_id]
    assert ids == expected  # the cut falls between two files here, so no extra EOS


def test_jsonl_input(tmp_path):
    lines = [json.dumps({"id": i, "body": f"document {i} says woof"}) for i in range(30)]
    (tmp_path / "in.jsonl").write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n")
    meta = prepare_dataset(tmp_path / "in.jsonl", tmp_path / "out", "word", text_field="body")
    tok = Tokenizer.load(tmp_path / "out")
    ids = tokens(tmp_path / "out", "train") + tokens(tmp_path / "out", "val")
    assert ids == [t for i in range(30) for t in tok.encode(f"document {i} says woof") + [tok.eos_id]]
    raw = (tmp_path / "in.jsonl").read_bytes()
    cut = raw.index(b"\n", int(len(raw) * 0.9) - 1) + 1  # validation starts at a line start
    assert meta["val_tokens"] == 5 * raw[cut:].count(b"\n")  # 4 words + EOS per document


def test_jsonl_missing_field_names_line_and_flag(tmp_path):
    (tmp_path / "in.jsonl").write_text('{"text": "a"}\n\n{"txt": "b"}\n{"text": "c"}\n')
    with pytest.raises(BarkError, match=r"line 3 has no 'text' field.*--text-field"):
        prepare_dataset(tmp_path / "in.jsonl", tmp_path / "out", "char", val_fraction=0.5)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n{"text": "c"}\n')
    with pytest.raises(BarkError, match="line 3 is not valid JSON"):
        prepare_dataset(tmp_path / "bad.jsonl", tmp_path / "out", "char", val_fraction=0.5)


def test_non_utf8_input_names_offset_and_replace(tmp_path):
    raw = TEXT.encode()[:1000] + b"caf\xe9 au lait\n" + TEXT.encode()[:1000]
    (tmp_path / "latin1.txt").write_bytes(raw)
    with pytest.raises(BarkError, match=r"latin1.txt is not valid UTF-8 at byte offset 1003 .*--errors replace"):
        prepare_dataset(tmp_path / "latin1.txt", tmp_path / "out", "char")
    meta = prepare_dataset(tmp_path / "latin1.txt", tmp_path / "out", "char", errors="replace")
    tok = Tokenizer.load(tmp_path / "out")
    assert "caf\ufffd au lait" in tok.decode(tokens(tmp_path / "out", "train"))
    assert meta["source_sha256"] == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("case", ["missing", "empty", "empty_folder", "no_text_jsonl"])
def test_empty_or_missing_input_raises(case, tmp_path):
    path = {
        "missing": tmp_path / "nope.txt",
        "empty": tmp_path / "empty.txt",
        "empty_folder": tmp_path / "folder",
        "no_text_jsonl": tmp_path / "blank.jsonl",
    }[case]
    if case == "empty":
        path.write_text("")
    elif case == "empty_folder":
        path.mkdir()
        (path / "readme.rst").write_text("neither .txt nor .md")
    elif case == "no_text_jsonl":
        path.write_text('{"text": ""}\n\n{"text": ""}\n')
    message = {
        "missing": "does not exist",
        "empty": "is empty",
        "empty_folder": "no .txt or .md files",
        "no_text_jsonl": "no text",
    }[case]
    with pytest.raises(BarkError, match=message):
        prepare_dataset(path, tmp_path / "out", "char")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_bad_arguments_raise(text_file, tmp_path):
    for vf in (0, 0.6, -0.1):
        with pytest.raises(BarkError, match="val_fraction"):
            prepare_dataset(text_file, tmp_path / "out", "char", val_fraction=vf)
    with pytest.raises(BarkError, match="minimum is 260"):
        prepare_dataset(text_file, tmp_path / "out", "bpe", vocab_size=100)
    with pytest.raises(BarkError, match="--errors"):
        prepare_dataset(text_file, tmp_path / "out", "char", errors="ignore")


def test_split_too_small_raises(tmp_path):
    # Text always gives a split at least one character and an EOS; jsonl can give it nothing.
    (tmp_path / "in.jsonl").write_text(json.dumps({"text": "woof " * 50}) + '\n{"text": ""}\n')
    with pytest.raises(BarkError, match=r"the val split .* has only 0 token.*--val-fraction"):
        prepare_dataset(tmp_path / "in.jsonl", tmp_path / "out", "char", val_fraction=0.1)
    assert not any((tmp_path / "out").glob("*.bin"))  # nothing half-written is left behind


def test_uint32_for_large_vocab(tmp_path):
    (tmp_path / "words.txt").write_text(" ".join(f"w{i}" for i in range(66000)) + "\n" + "w1 w2\n" * 500)
    meta = prepare_dataset(tmp_path / "words.txt", tmp_path / "out", "word")
    assert meta["vocab_size"] > 65535 and meta["dtype"] == "uint32"
    assert load_split(tmp_path / "out", "train").dtype == np.uint32
    assert max(tokens(tmp_path / "out", "train")) > 65535


def test_tokenizer_from_reuses_tokenizer_and_counts_unknowns(text_file, tmp_path):
    prepare_dataset(text_file, tmp_path / "first", "char")
    (tmp_path / "other.txt").write_text("Line 1: the brown fox §§ quit\n" * 20)
    meta = prepare_dataset(tmp_path / "other.txt", tmp_path / "second", tokenizer_from=tmp_path / "first")
    assert meta["tokenizer"] == "char"  # the kind comes from the reused tokenizer
    assert meta["unknown_count"] == 40  # "§" is not in the first corpus
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    with pytest.raises(BarkError, match="drop --vocab-size"):
        prepare_dataset(tmp_path / "other.txt", tmp_path / "third", vocab_size=500, tokenizer_from=tmp_path / "first")
    with pytest.raises(BarkError, match="no tokenizer.json"):
        prepare_dataset(tmp_path / "other.txt", tmp_path / "third", tokenizer_from=tmp_path / "nowhere")


def test_prepare_documents_splits_and_hashes_generated_documents(tmp_path):
    docs = [f"User: hello Assistant: {' '.join(['a'] * (1 + i % 3))} <EOS>" for i in range(20)]
    tok = Tokenizer.from_words(("<PAD>", "<EOS>", "<BOS>", "<UNK>", "User:", "Assistant:", "hello", "a"))
    meta = prepare_documents(docs, tmp_path / "gen", tok, "gen", val_fraction=0.1, add_eos=False)
    assert read_meta(tmp_path / "gen") == meta and meta["source"] == "gen" and meta["tokenizer"] == "word"
    assert meta["source_sha256"] == hashlib.sha256("".join(d + "\n" for d in docs).encode()).hexdigest()
    back = Tokenizer.load(tmp_path / "gen")
    assert back.decode(tokens(tmp_path / "gen", "train")) == " ".join(docs[:18])  # no EOS added twice
    assert back.decode(tokens(tmp_path / "gen", "val")) == " ".join(docs[18:])
    plain = prepare_documents(["a a", "a"], tmp_path / "eos", tok, "gen", val_fraction=0.5)  # add_eos by default
    assert tokens(tmp_path / "eos", "train") == [7, 7, 1] and plain["val_tokens"] == 2
    with pytest.raises(BarkError, match="too few to split"):
        prepare_documents(["a"], tmp_path / "one", tok, "gen")
    with pytest.raises(BarkError, match="val_fraction 0.7"):
        prepare_documents(docs, tmp_path / "bad", tok, "gen", val_fraction=0.7)


@pytest.fixture
def registry(monkeypatch):
    """The built-in dataset table, restored after the test (the tests register throwaway names)."""
    monkeypatch.setattr(data, "BUILTIN_DATASETS", dict(data.BUILTIN_DATASETS))
    return data.BUILTIN_DATASETS


def make_folder(out, seed):
    return out


def test_register_dataset_makes_a_name_a_builtin(registry):
    assert builtin_dataset("toy-set") is None and builtin_dataset(None) is None
    register_dataset("toy-set", make_folder)
    assert builtin_dataset("toy-set") is make_folder and registry["toy-set"] is make_folder
    register_dataset("toy-set", make_folder)  # a module imported twice registers the same function again


@pytest.mark.parametrize("name", ["../up", "runs/x", "/abs", ".hidden", "Toy", "", "a b", "x" * 65, None])
def test_register_dataset_refuses_names_that_could_be_paths(registry, name):
    with pytest.raises(BarkError, match="not a plain name"):
        register_dataset(name, make_folder)
    assert name not in registry


def test_register_dataset_refuses_a_second_builder_for_a_name(registry):
    register_dataset("toy-set", make_folder)
    with pytest.raises(BarkError, match="already registered by"):
        register_dataset("toy-set", lambda out, seed: out)
    assert registry["toy-set"] is make_folder


def test_get_batch_shapes_and_shift(tmp_path):
    data_ = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data_, batch_size=8, block_size=16, rng=np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    assert (y[:, :-1] == x[:, 1:]).all() and (y == x + 1).all()  # consecutive windows of arange
    x2, _ = get_batch(data_, batch_size=8, block_size=16, rng=np.random.default_rng(0))
    assert (x == x2).all()
    # A DDP rank's rows: the ranks' halves are the whole batch, and the generator advances alike.
    rngs = [np.random.default_rng(0) for _ in range(2)]
    halves = [get_batch(data_, 8, 16, r, keep=slice(4 * i, 4 * i + 4))[0] for i, r in enumerate(rngs)]
    assert (np.concatenate(halves) == x).all() and rngs[0].integers(1 << 30) == rngs[1].integers(1 << 30)
    # The smallest split that works has block_size + 1 tokens.
    x, y = get_batch(np.arange(17, dtype=np.uint16), 4, 16, np.random.default_rng(1))
    assert (x[:, 0] == 0).all() and (y[:, -1] == 16).all()
    with pytest.raises(BarkError, match="block-size"):
        get_batch(np.arange(16, dtype=np.uint16), 4, 16, np.random.default_rng(1))


def test_get_batch_over_prepared_memmap(text_file, tmp_path):
    prepare_dataset(text_file, tmp_path / "out", "char")
    train = load_split(tmp_path / "out", "train")
    x, y = get_batch(train, 4, 32, np.random.default_rng(0))
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    assert x.max() < read_meta(tmp_path / "out")["vocab_size"]


def test_load_split_and_read_meta_errors(tmp_path):
    with pytest.raises(BarkError, match="no meta.json"):
        read_meta(tmp_path)
    with pytest.raises(BarkError, match="no meta.json"):
        load_split(tmp_path, "train")
    (tmp_path / "meta.json").write_text('{"dtype": "uint16"}')
    with pytest.raises(BarkError, match="no val.bin"):
        load_split(tmp_path, "val")
    with pytest.raises(BarkError, match="unknown split"):
        load_split(tmp_path, "test")
    (tmp_path / "train.bin").write_bytes(b"\x00\x00\x01")
    with pytest.raises(BarkError, match="truncated"):
        load_split(tmp_path, "train")
