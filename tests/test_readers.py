"""The input formats of ``prepare`` (barkgpt/readers.py): folders, jsonl, gzip/zstd, parquet and
a ``datasets`` folder, each giving the same tokens as the plain text it holds."""

from __future__ import annotations

import gzip
import hashlib
import json

import numpy as np
import pytest

from barkgpt.common import BarkError
from barkgpt.data import load_split, prepare_dataset, read_documents
from barkgpt.tokenizer import Tokenizer

DOCS = [f"document {i}: the dog says woof {'and woof ' * (i % 5)}\nthen sleeps." for i in range(40)]


def ids_of(out) -> list[int]:
    """Every token of both splits, in order."""
    return [int(t) for split in ("train", "val") for t in np.asarray(load_split(out, split))]


def expected_ids(out, docs) -> list[int]:
    """The ids prepare should write: each document, then EOS."""
    tok = Tokenizer.load(out)
    return [t for d in docs for t in tok.encode(d) + [tok.eos_id]]


def write_jsonl(path, docs, field="text") -> bytes:
    """The JSONL bytes of ``docs`` (also written to ``path`` unless it is None)."""
    raw = "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()
    if path is not None:
        path.write_bytes(raw)
    return raw


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path):
    root = tmp_path / "notes"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    files = {"a.md": "alpha notes\n", "b/deep/c.txt": "charlie text\n", "b/a.txt": "bravo text\n", "z.txt.gz": "zulu\n"}
    for name, text in files.items():
        path = root / name
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
    (root / ".hidden.txt").write_text("never read")
    (root / ".git" / "HEAD.txt").write_text("never read")
    (root / "image.png").write_bytes(b"\x89PNG")
    out = tmp_path / "out"
    prepare_dataset(root, out, tokenizer="char", val_fraction=0.2)
    order = ["a.md", "b/a.txt", "b/deep/c.txt", "z.txt.gz"]  # sorted by relative path
    assert ids_of(out) == expected_ids(out, [files[n] for n in order])
    assert read_documents(root) == [files[n] for n in order]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_compressed_text_and_jsonl_match_the_plain_files(tmp_path, suffix):
    if suffix == ".zst":
        zstd = pytest.importorskip("zstandard", reason="zstandard (the data extra) is not installed")
        compress = zstd.ZstdCompressor().compress
    else:
        compress = gzip.compress
    text = "\n".join(DOCS)
    (tmp_path / "plain.txt").write_text(text)
    (tmp_path / f"c.txt{suffix}").write_bytes(compress(text.encode()))
    raw = write_jsonl(tmp_path / "plain.jsonl", DOCS, "body")
    (tmp_path / f"c.jsonl{suffix}").write_bytes(compress(raw))
    for plain, packed, field in (("plain.txt", f"c.txt{suffix}", "text"), ("plain.jsonl", f"c.jsonl{suffix}", "body")):
        a = prepare_dataset(tmp_path / plain, tmp_path / "a", "char", text_field=field)
        b = prepare_dataset(tmp_path / packed, tmp_path / "b", "char", text_field=field)
        assert ids_of(tmp_path / "a") == ids_of(tmp_path / "b")
        assert (a["train_tokens"], a["source_sha256"]) == (
            b["train_tokens"],
            b["source_sha256"],
        )  # hash of the decompressed bytes
    assert read_documents(tmp_path / f"c.jsonl{suffix}", "val", text_field="body") == read_documents(
        tmp_path / "plain.jsonl", "val", text_field="body"
    )


def test_corrupt_gzip_and_bad_utf8_inside_gzip_are_one_line_errors(tmp_path):
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"woof " * 100)[:-12])  # truncated
    with pytest.raises(BarkError, match=r"bad.txt.gz is not a valid .gz file"):
        prepare_dataset(tmp_path / "bad.txt.gz", tmp_path / "out", "char")
    (tmp_path / "latin1.txt.gz").write_bytes(gzip.compress(b"woof " * 100 + b"caf\xe9\n" + b"woof " * 100))
    with pytest.raises(BarkError, match=r"not valid UTF-8 at byte offset 503 .*--errors replace"):
        prepare_dataset(tmp_path / "latin1.txt.gz", tmp_path / "out", "char")


def test_parquet_rows_are_documents_streamed_by_batch(tmp_path, monkeypatch):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) is not installed")
    import pyarrow.parquet as pq

    from barkgpt import readers

    monkeypatch.setattr(readers, "TABLE_BATCH_ROWS", 7)  # several batches and row groups
    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=10)
    out = tmp_path / "out"
    meta = prepare_dataset(tmp_path / "c.parquet", out, "char", text_field="content", val_fraction=0.2)
    assert ids_of(out) == expected_ids(out, DOCS)
    assert meta["source_sha256"] == hashlib.sha256("".join(d + "\n" for d in DOCS).encode()).hexdigest()
    val = read_documents(tmp_path / "c.parquet", "val", 0.2, text_field="content")
    assert val == DOCS[-len(val) :] and 0 < len(val) < len(DOCS) // 2
    with pytest.raises(BarkError, match=r"no column 'text' \(columns: id, content\); pass --text-field"):
        prepare_dataset(tmp_path / "c.parquet", out, "char")
    with pytest.raises(BarkError, match="column 'id' holds int64, not text"):
        prepare_dataset(tmp_path / "c.parquet", out, "char", text_field="id")


def test_parquet_binary_column_keeps_the_utf8_errors(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) is not installed")
    import pyarrow.parquet as pq

    rows = [b"woof woof", b"caf\xe9 au lait", b"bark bark"]
    pq.write_table(pa.table({"text": pa.array(rows, pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(BarkError, match=r"b.parquet row 2 is not valid UTF-8 at byte offset 3 .*--errors replace"):
        prepare_dataset(tmp_path / "b.parquet", tmp_path / "out", "char", val_fraction=0.4)
    assert read_documents(tmp_path / "b.parquet", errors="replace")[1] == "caf\ufffd au lait"


def save_to_disk_folder(pa, folder, docs, n_files=2):
    """A folder laid out as ``datasets.Dataset.save_to_disk`` writes it: Arrow IPC stream files
    ``data-0000K-of-0000N.arrow``, ``state.json`` listing them, and ``dataset_info.json``."""
    folder.mkdir(parents=True)
    names = [f"data-{k:05d}-of-{n_files:05d}.arrow" for k in range(n_files)]
    schema = pa.schema([("text", pa.string()), ("label", pa.int64())])
    for k, name in enumerate(names):
        part = docs[k * len(docs) // n_files : (k + 1) * len(docs) // n_files]
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            writer.write_table(pa.table({"text": part, "label": [0] * len(part)}, schema=schema), max_chunksize=5)
    state = {"_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string", "_type": "Value"}}}))


def test_datasets_save_to_disk_folder_and_dataset_dict(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) is not installed")
    save_to_disk_folder(pa, tmp_path / "ds", DOCS)
    out = tmp_path / "out"
    prepare_dataset(tmp_path / "ds", out, "char")
    assert ids_of(out) == expected_ids(out, DOCS)
    # DatasetDict.save_to_disk: dataset_dict.json and one folder per split; the train split is read
    save_to_disk_folder(pa, tmp_path / "dd" / "train", DOCS[:30])
    save_to_disk_folder(pa, tmp_path / "dd" / "test", DOCS[30:], n_files=1)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert read_documents(tmp_path / "dd") == DOCS[:30]
    (tmp_path / "ds" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(BarkError, match=r"state.json names .*missing ones \(data-00001-of-00002.arrow\)"):
        prepare_dataset(tmp_path / "ds", out, "char")


def test_datasets_folder_names_that_leave_the_folder_are_refused(tmp_path):
    """A hostile ``state.json`` or ``dataset_dict.json`` cannot point the reader outside the folder."""
    pa = pytest.importorskip("pyarrow", reason="pyarrow (the data extra) is not installed")
    save_to_disk_folder(pa, tmp_path / "outside", DOCS, n_files=1)
    (tmp_path / "ds").mkdir()
    state = {"_data_files": [{"filename": "../outside/data-00000-of-00001.arrow"}]}
    (tmp_path / "ds" / "state.json").write_text(json.dumps(state))
    with pytest.raises(BarkError, match=r"state.json names '\.\./outside/.*', not a plain file name"):
        read_documents(tmp_path / "ds")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["../outside"]}))
    with pytest.raises(BarkError, match=r"dataset_dict.json names '\.\./outside', not a plain file name"):
        read_documents(tmp_path / "dd")
