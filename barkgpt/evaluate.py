"""Evaluation: loss, perplexity and bits per byte of a model on a text, and the Bark chat check.

Bits per byte compares models across tokenizers: the total negative log-likelihood of the text
in nats, divided by ln 2 and by the text's UTF-8 byte count (as in the Pile paper, Gao et al.
2020, and nanochat's ``bpb``). Loss and perplexity are per token, so they depend on the
tokenizer; bits per byte does not.

How the text is scored: each document is encoded, preceded by ``<EOS>`` (a document boundary,
as ``prepare`` writes it), and cut into consecutive windows of ``block_size`` tokens; every
token of the document is predicted exactly once, from the tokens before it in its window
(non-overlapping windows, as nanoGPT's eval; the context restarts at each window).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch

from barkgpt.checkpoint import load_checkpoint
from barkgpt.common import BarkError, bits_per_byte, resolve_device
from barkgpt.conversations import IGNORE_INDEX, bark_chat_conversations, follows_bark_rule, sample_bark_command
from barkgpt.data import read_documents
from barkgpt.generate import TextGenerator
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer


def document_windows(ids: list[int], eos_id: int, block_size: int) -> list[tuple[list[int], list[int]]]:
    """Cut one document's ids into ``(x, y)`` windows of at most ``block_size`` tokens.

    The sequence scored is ``[eos_id] + ids``; window k has inputs ``seq[kT:(k+1)T]`` and targets
    shifted by one, so every id of the document is a target exactly once.
    """
    seq = [eos_id, *ids]
    return [(seq[lo:lo + block_size], seq[lo + 1:lo + block_size + 1]) for lo in range(0, len(ids), block_size)]


@torch.no_grad()
def text_nll(model: GPT, tokenizer: Tokenizer, documents: list[str], batch_size: int = 16) -> dict:
    """Total negative log-likelihood of ``documents`` under ``model`` (see the module docstring).

    Windows are batched ``batch_size`` at a time; a short last window is padded on the right
    with targets ``IGNORE_INDEX``, which causal attention keeps out of the real positions.

    Returns:
        ``{"nll": nats summed over all tokens, "tokens": tokens scored, "bytes": UTF-8 bytes of the
        documents, "unknown": characters (char) or words (word) that map to <UNK>, "seconds":
        time in forward passes}``.

    Raises:
        BarkError: the documents hold no tokens, or ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise BarkError(f"batch_size must be at least 1, got {batch_size}")
    device = next(model.parameters()).device
    T = model.config.block_size
    windows, unknown = [], 0
    for doc, ids in zip(documents, tokenizer.encode_batch(documents), strict=True):
        windows.extend(document_windows(ids, tokenizer.eos_id, T))
        unknown += tokenizer.count_unknown(doc, ids)
    if not windows:
        raise BarkError("the text has no tokens to evaluate; pass a non-empty file")
    model.eval()
    nll, n_tokens, seconds = 0.0, 0, 0.0
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo:lo + batch_size]
        x = torch.full((len(chunk), T), tokenizer.pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), IGNORE_INDEX, dtype=torch.long)
        for b, (wx, wy) in enumerate(chunk):
            x[b, :len(wx)], y[b, :len(wy)] = torch.tensor(wx), torch.tensor(wy)
        t0 = time.perf_counter()
        _, loss = model(x.to(device), y.to(device))  # mean over this batch's targets
        count = int((y != IGNORE_INDEX).sum())
        nll += loss.item() * count
        seconds += time.perf_counter() - t0
        n_tokens += count
    return {"nll": nll, "tokens": n_tokens, "bytes": sum(len(d.encode("utf-8")) for d in documents),
            "unknown": unknown, "seconds": seconds}


def evaluate_text(model_path: str | Path, data: str | Path, split: str = "all", val_fraction: float = 0.1,
                  device: str = "auto", batch_size: int = 16) -> dict:
    """Evaluate a checkpoint on a text corpus: ``barkgpt eval``.

    Args:
        model_path: a run or checkpoint folder (``best/`` preferred).
        data: a ``.txt`` file, a folder of ``*.txt`` or a ``.jsonl`` with a ``text`` field.
        split: ``all``, or ``train``/``val`` cut exactly as ``barkgpt prepare`` cuts the same file.
        val_fraction: the val share ``prepare`` used (default 0.1).
        device: ``auto``, ``cpu``, ``cuda``...
        batch_size: windows per forward pass.

    Returns:
        ``{"model", "data", "split", "loss" (nats/token), "perplexity", "bits_per_byte", "tokens",
        "bytes", "unknown", "tokens_per_s", "seconds"}``. Unknown characters (a char tokenizer
        that never saw them) are scored as ``<UNK>`` and counted, not an error.

    Raises:
        BarkError: no checkpoint, unreadable data, or an empty split.
    """
    model, tokenizer, _ = load_checkpoint(model_path, resolve_device(device))
    r = text_nll(model, tokenizer, read_documents(data, split, val_fraction), batch_size)
    loss = r["nll"] / r["tokens"]
    return {"model": str(model_path), "data": str(data), "split": split, "loss": loss,
            "perplexity": math.exp(min(loss, 700)), "bits_per_byte": bits_per_byte(r["nll"], r["bytes"]),
            "tokens": r["tokens"], "bytes": r["bytes"], "unknown": r["unknown"],
            "tokens_per_s": r["tokens"] / max(r["seconds"], 1e-9), "seconds": r["seconds"]}


def bark_eval(gen: TextGenerator, n: int = 100, seed: int = 0, temperature: float = 1.0) -> dict:
    """The share of sampled replies that follow the Bark chat rule (``conversations.follows_bark_rule``).

    Each of the ``n`` cases is a conversation of 0 to 2 earlier exchanges (correct ones, from the
    training generator) and a command drawn as the training data draws them; the model's reply is
    sampled at ``temperature`` with the given seed and must follow the rule for the last command
    and end with ``<EOS>`` within 16 tokens.

    Returns:
        ``{"samples": n, "passed": int, "share": float, "failures": [{"command", "reply", "finish_reason"}, ...]}``.

    Raises:
        BarkError: ``n`` < 1.
    """
    if n < 1:
        raise BarkError(f"the number of samples must be at least 1, got {n}")
    rng = random.Random(seed)
    history_pool = bark_chat_conversations(n, seed + 1, max_turns=2)
    passed, failures = 0, []
    for i in range(n):
        history = history_pool[i][:2 * rng.randint(0, len(history_pool[i]) // 2)]
        command = sample_bark_command(rng)
        prompt = gen.chat_prompt([*history, {"role": "user", "content": command}])
        reply = gen.complete(prompt, truncate=True, max_new_tokens=16, temperature=temperature, seed=seed + i)[0]
        if reply.finish_reason == "stop" and follows_bark_rule(command, reply.text):
            passed += 1
        else:
            failures.append({"command": command, "reply": reply.text.strip(), "finish_reason": reply.finish_reason})
    return {"samples": n, "passed": passed, "share": passed / n, "failures": failures}

