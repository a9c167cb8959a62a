"""Evaluation: loss, perplexity and bits per byte of a model on a text.

Bits per byte compares models across tokenizers. Its one definition, shared with training's
``val_bpb``, is :func:`barkgpt.common.token_nll_and_bytes` (nanochat's ``evaluate_bpb``): the
negative log-likelihood in nats of the target tokens that stand for text, divided by ln 2 and
by the UTF-8 bytes those tokens decode to; tokens that stand for no bytes (``<EOS>``, role
tokens, ``<UNK>``) count neither. Loss and perplexity are per token, so they depend on the
tokenizer; bits per byte does not.

How the text is scored: each document is encoded, preceded by ``<EOS>`` (a document boundary,
as ``prepare`` writes it), and cut into consecutive windows of ``block_size`` tokens; every
token of the document is predicted exactly once, from the tokens before it in its window
(non-overlapping windows, as nanoGPT's eval; the context restarts at each window). A prepared
data folder is scored the same way, its token files cut into documents at each ``<EOS>``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from barkgpt.checkpoint import find_checkpoint, load_checkpoint
from barkgpt.common import BarkError, bits_per_byte, resolve_device, token_nll_and_bytes
from barkgpt.conversations import IGNORE_INDEX
from barkgpt.data import load_split, read_documents, read_meta
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

DEFAULT_VAL_FRACTION = 0.1  # prepare's default, for a text whose split no checkpoint records


def document_windows(ids: list[int], eos_id: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Cut one document's ids into ``(x, y)`` windows of at most ``block_size`` tokens.

    The sequence scored is ``[eos_id] + ids``; window k has inputs ``seq[kT:(k+1)T]`` and targets
    shifted by one, so every id of the document is a target exactly once.
    """
    seq = [eos_id, *ids]
    return [(seq[lo : lo + block_size], seq[lo + 1 : lo + block_size + 1]) for lo in range(0, len(ids), block_size)]


def split_at_eos(ids: np.ndarray, eos_id: int) -> list[list[int]]:
    """A prepared split's flat (N,) token ids -> its documents' ids (each ``<EOS>`` ends one; empty ones dropped)."""
    ends = np.flatnonzero(ids == eos_id)
    docs = np.split(np.asarray(ids, dtype=np.int64), ends + 1)
    return [d[d != eos_id].tolist() for d in docs if (d != eos_id).any()]


@torch.no_grad()
def ids_nll(model: GPT, tokenizer: Tokenizer, documents: list[list[int]], batch_size: int = 16) -> dict:
    """Total negative log-likelihood of documents given as token ids (see the module docstring).

    Windows are batched ``batch_size`` at a time; a short last window is padded on the right
    with targets ``IGNORE_INDEX``, which causal attention keeps out of the real positions.

    Returns:
        ``{"nll": nats summed over all tokens, "tokens": tokens scored, "nll_bytes": nats over the
        tokens that stand for bytes, "bytes": the UTF-8 bytes those tokens decode to, "seconds":
        time in forward passes}`` (:func:`barkgpt.common.token_nll_and_bytes`).

    Raises:
        BarkError: the documents hold no tokens, or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise BarkError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    T = model.config.block_size
    windows = [w for ids in documents for w in document_windows(ids, tokenizer.eos_id, T)]
    if not windows:
        raise BarkError("the text has no tokens to evaluate; pass a non-empty file")
    model.eval()
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.int64, device=device)
    out = {"nll": 0.0, "tokens": 0, "nll_bytes": 0.0, "bytes": 0, "seconds": 0.0}
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo : lo + batch_size]
        x = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (wx, wy) in enumerate(chunk):
            x[b, : len(wx)], y[b, : len(wy)] = torch.tensor(wx), torch.tensor(wy)
        t0 = time.perf_counter()
        logits, _ = model(x.to(device), y.to(device))  # (B, T, vocab_size)
        sums = token_nll_and_bytes(logits, y.to(device), token_bytes)
        out["seconds"] += time.perf_counter() - t0
        out["nll"] += sums["nll"]
        out["tokens"] += sums["targets"]
        out["nll_bytes"] += sums["nll_bytes"]
        out["bytes"] += sums["bytes"]
    return out


def text_nll(model: GPT, tokenizer: Tokenizer, documents: list[str], batch_size: int = 16) -> dict:
    """:func:`ids_nll` of text documents, plus ``"unknown"``: the characters (char) or words
    (word) that map to ``<UNK>`` (scored as ``<UNK>``, and standing for no bytes).

    Raises:
        BarkError: as :func:`ids_nll`.
    """
    ids = tokenizer.encode_batch(documents)
    unknown = sum(tokenizer.count_unknown(doc, i) for doc, i in zip(documents, ids, strict=True))
    return {**ids_nll(model, tokenizer, ids, batch_size), "unknown": unknown}


def recorded_val_fraction(ckpt: Path, config: dict, data: str | Path) -> float | None:
    """The ``val_fraction`` that ``prepare`` used on ``data`` for the model in ``ckpt``, if known.

    Looked up in the checkpoint's ``config.json`` ``data`` section (training records the
    prepared folder's ``meta.json`` there), then, for checkpoints from before that, in the run
    folder's ``data/meta.json`` and in the ``meta.json`` of the folder its ``config.yaml`` trained
    on. Each counts only if its ``source`` is ``data`` (resolved path): a split recorded for
    another corpus says nothing about this one.
    """
    source = str(Path(data).resolve())
    records = [config.get("data")]
    run = ckpt.parent
    folders = [run / "data"]
    import yaml

    try:
        folders.append(Path(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["train"]["data"]))
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        pass
    for folder in folders:
        try:
            records.append(json.loads((folder / "meta.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
    for r in records:
        if isinstance(r, dict) and r.get("source") == source and isinstance(r.get("val_fraction"), (int, float)):
            return float(r["val_fraction"])
    return None


def check_same_tokenizer(data_dir: Path, tokenizer: Tokenizer, ckpt: Path) -> None:
    """Raise BarkError unless every token id of the folder's tokenizer means the same as in the model's.

    The model's may have more tokens (fine-tuning adds chat role tokens after the others).
    """
    data_tok = Tokenizer.load(data_dir)
    n = data_tok.vocab_size
    if n > tokenizer.vocab_size or any(data_tok.id_to_bytes(i) != tokenizer.id_to_bytes(i) for i in range(n)):
        raise BarkError(
            f"{data_dir} was tokenized by another tokenizer than the model in {ckpt}; pass the text file "
            f"instead, or a folder prepared with --tokenizer-from {ckpt}"
        )


def evaluate_text(
    model_path: str | Path,
    data: str | Path,
    split: str = "all",
    val_fraction: float | None = None,
    device: str = "auto",
    batch_size: int = 16,
) -> dict:
    """Evaluate a checkpoint on a text corpus or a prepared data folder: ``barkgpt eval``.

    Args:
        model_path: a run or checkpoint folder (``best/`` preferred).
        data: a ``.txt`` file, a folder of ``*.txt``, a ``.jsonl`` with a ``text`` field, or a
            folder from ``barkgpt prepare`` (its ``train.bin``/``val.bin`` tokens are scored).
        split: ``all``, or ``train``/``val``: for text, cut exactly as ``barkgpt prepare`` cut the
            same file; for a prepared folder, its token file of that name.
        val_fraction: the val share to cut text at. None: the one ``prepare`` used, when the
            checkpoint records it for this file (:func:`recorded_val_fraction`), else 0.1 with a
            ``note``. Not allowed with a prepared folder, whose split is fixed.
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: windows per forward pass.

    Returns:
        ``{"model", "data", "split", "val_fraction" (the cut used; None for split all), "note"
        (None, or why the cut is a guess), "loss" (nats/token), "perplexity", "bits_per_byte",
        "tokens", "bytes" (those bits per byte counts), "unknown", "tokens_per_s", "seconds"}``.
        Unknown characters (a char tokenizer that never saw them) are scored as ``<UNK>`` and
        counted, not an error.

    Raises:
        BarkError: no checkpoint, unreadable data, a prepared folder of another tokenizer, an
            empty split, or ``val_fraction`` with a prepared folder.
    """
    ckpt = find_checkpoint(model_path)
    model, tokenizer, config = load_checkpoint(ckpt, resolve_device(device))
    note = None
    if (Path(data) / "meta.json").is_file():  # a prepared folder: score its tokens
        if val_fraction is not None:
            raise BarkError(
                f"--val-fraction does not apply to the prepared folder {data} (its split is fixed by prepare); drop it"
            )
        val_fraction = read_meta(data).get("val_fraction") if split != "all" else None
        check_same_tokenizer(Path(data), tokenizer, ckpt)
        ids = np.concatenate([np.asarray(load_split(data, s)) for s in (("train", "val") if split == "all" else (split,))])
        r = {**ids_nll(model, tokenizer, split_at_eos(ids, tokenizer.eos_id), batch_size), "unknown": 0}
    else:
        if split == "all":
            val_fraction = None
        elif val_fraction is None:
            val_fraction = recorded_val_fraction(ckpt, config, data)
            if val_fraction is None:
                val_fraction = DEFAULT_VAL_FRACTION
                note = (
                    f"note: {ckpt} records no split of {data}; cut val at --val-fraction {val_fraction} (prepare's "
                    f"default); pass the value prepare used"
                )
        r = text_nll(model, tokenizer, read_documents(data, split, val_fraction or DEFAULT_VAL_FRACTION), batch_size)
    loss = r["nll"] / r["tokens"]
    return {
        "model": str(model_path),
        "data": str(data),
        "split": split,
        "val_fraction": val_fraction,
        "note": note,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700)),
        "bits_per_byte": bits_per_byte(r["nll_bytes"], r["bytes"]),
        "tokens": r["tokens"],
        "bytes": r["bytes"],
        "unknown": r["unknown"],
        "tokens_per_s": r["tokens"] / max(r["seconds"], 1e-9),
        "seconds": r["seconds"],
    }
