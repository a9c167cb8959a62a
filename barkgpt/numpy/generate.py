"""Generation in NumPy: a KV cache, the sampling settings of :class:`~barkgpt.config.SamplingParams`,
and a :class:`~barkgpt.generate.TextGenerator` over them.

:class:`Engine` mirrors :class:`barkgpt.engine.Engine`'s ``generate``: the prompt is prefilled once
into a cache shared by the ``num_samples`` rows, each step decodes one token per row, and a row at
``block_size`` slides its window (the last ``block_size // 2`` tokens are prefilled again). The
logits processors run in the torch engine's order (repetition, presence and frequency penalties,
temperature, top-k, top-p, min-p); greedy decoding is the argmax, so it picks the torch backend's
tokens on the same weights. Sampled tokens come from NumPy generators (row ``j`` seeded with
``seed + j``), so they differ from torch's draws for the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from barkgpt.common import BarkError, check_prompt
from barkgpt.config import SamplingParams
from barkgpt.generate import TextGenerator
from barkgpt.numpy.model import GPT, load_weights
from barkgpt.tokenizer import Tokenizer


class KVCache:
    """Keys and values of every layer, ``k``/``v`` (n_layer, B, n_kv_head, max_len, hs), for rows
    that share one position ``pos`` (the samples of one prompt)."""

    def __init__(self, model: GPT, batch_size: int, max_len: int):
        c = model.config
        shape = (c.n_layer, batch_size, c.n_kv_head, max_len, c.head_dim)
        self.k, self.v = np.zeros(shape, dtype=model.dtype), np.zeros(shape, dtype=model.dtype)
        self.pos = 0

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write ``k``, ``v`` (B, n_kv_head, T, hs) at ``pos`` and return all cached ones (B, n_kv_head, pos + T, hs)."""
        T = k.shape[2]
        self.k[layer, :, :, self.pos : self.pos + T] = k
        self.v[layer, :, :, self.pos : self.pos + T] = v
        return self.k[layer, :, :, : self.pos + T], self.v[layer, :, :, : self.pos + T]

    def advance(self, T: int) -> None:
        """Count the ``T`` tokens every layer has just written."""
        self.pos += T

    def expand(self, n: int) -> KVCache:
        """This one-row cache copied to ``n`` rows."""
        out = object.__new__(KVCache)
        out.k, out.v, out.pos = np.repeat(self.k, n, axis=1), np.repeat(self.v, n, axis=1), self.pos
        return out


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis; -inf entries get probability 0."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def process_logits(logits: np.ndarray, p: SamplingParams, history: list[list[int]], generated: list[list[int]]) -> np.ndarray:
    """Apply ``p``'s logits processors to (B, V) float32 logits, in :mod:`barkgpt.engine`'s order:
    CTRL's repetition penalty (Keskar et al. 2019) over each row's prompt and generated ids,
    OpenAI's presence and frequency penalties over the generated ones, temperature (not for
    greedy rows), top-k, top-p (Holtzman et al. 2019) and min-p (Nguyen et al. 2024). Filtered
    tokens are -inf. Returns (B, V)."""
    x = logits.astype(np.float32, copy=True)
    V = x.shape[-1]
    for b in range(x.shape[0]):  # penalties: each row has its own history (rare settings)
        if p.repetition_penalty != 1.0 and history[b]:
            ids = np.asarray(history[b])
            seen = x[b, ids]
            x[b, ids] = np.where(seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and generated[b]:
            counts = np.bincount(generated[b], minlength=V).astype(np.float32)
            x[b] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    if p.temperature > 0 and p.temperature != 1.0:
        x /= np.float32(p.temperature)
    if 0 < p.top_k < V:
        order = np.argsort(-x, axis=-1, kind="stable")
        np.put_along_axis(x, order[:, p.top_k :], -np.inf, axis=-1)
    if p.top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")
        probs = softmax(np.take_along_axis(x, order, axis=-1))
        remove = (np.cumsum(probs, axis=-1) - probs) >= p.top_p  # the mass before it already reaches top_p
        remove[:, 0] = False
        np.put_along_axis(x, order, np.where(remove, -np.inf, np.take_along_axis(x, order, axis=-1)), axis=-1)
    if p.min_p > 0:
        probs = softmax(x)
        x[probs < p.min_p * probs.max(axis=-1, keepdims=True)] = -np.inf
    return x


def sample_rows(x: np.ndarray, p: SamplingParams, rngs: list[np.random.Generator]) -> list[int]:
    """The next token of each row of processed logits ``x`` (B, V): the argmax when greedy, else
    inverse transform sampling (Devroye 1986) with one uniform number from each row's generator."""
    if p.greedy:
        return x.argmax(axis=-1).tolist()
    probs = softmax(x)
    cdf = np.cumsum(probs, axis=-1)
    u = np.array([r.random() for r in rngs])[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= u).sum(axis=-1), x.shape[-1] - 1).tolist()


class Engine:
    """Prefill, decode and sampling over token ids for one NumPy :class:`~barkgpt.numpy.model.GPT`."""

    def __init__(self, model: GPT):
        self.model = model

    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        stop_ids: Sequence[int] = (),
        processors=(),
        **sampling,
    ) -> Iterator[list[int | None]]:
        """Stream generated tokens for ``num_samples`` rows of one prompt, one list per step
        (a row's new id, or None once it stopped): :meth:`barkgpt.engine.Engine.generate`'s contract.

        Args:
            prompt: token ids, 1 <= len <= block_size.
            params: the sampling settings, or their fields as keywords.
            stop_ids: ids that end a row (yielded once).
            processors: the torch engine's row hooks (constraints, ``logit_bias``): refused here.

        Raises:
            BarkError: an empty or over-long prompt, a bad sampling setting, or row hooks.
        """
        if processors:
            raise BarkError("constraints and logit_bias run on the torch engine; drop them or use --backend torch")
        p = params if params is not None else SamplingParams(**sampling)
        block_size = self.model.config.block_size
        check_prompt(prompt, block_size)
        n, stop = p.num_samples, set(stop_ids)
        rngs = [np.random.default_rng(None if p.seed is None else (p.seed + j) % 2**64) for j in range(n)]
        cache = KVCache(self.model, 1, block_size)
        logits = self.model.forward(np.asarray([prompt]), kv_cache=cache)[0][:, -1, :]  # prefill once...
        cache, logits = cache.expand(n), np.repeat(logits, n, axis=0)  # ...and share it with every row
        generated: list[list[int]] = [[] for _ in range(n)]
        done = [False] * n
        for _ in range(p.max_new_tokens):
            # the prompt + generated history only feeds the repetition penalty: skip the copy without one
            history = [list(prompt) + g for g in generated] if p.repetition_penalty != 1.0 else generated
            tokens = sample_rows(process_logits(logits, p, history, generated), p, rngs)
            yield [None if done[b] else t for b, t in enumerate(tokens)]
            done = [d or t in stop for d, t in zip(done, tokens)]
            if all(done):
                return
            for g, t in zip(generated, tokens):
                g.append(t)
            if cache.pos >= block_size:  # slide the window: re-prefill the recent half
                cache = KVCache(self.model, n, block_size)
                recent = np.asarray([(list(prompt) + g)[-(block_size // 2) :] for g in generated])  # (n, block_size // 2)
                logits = self.model.forward(recent, kv_cache=cache)[0][:, -1, :]
            else:
                logits = self.model.forward(np.asarray(tokens).reshape(n, 1), kv_cache=cache)[0][:, -1, :]


class NumpyTextGenerator(TextGenerator):
    """:class:`barkgpt.generate.TextGenerator` (``tokenizer``, ``block_size``, ``generate``,
    ``stream``, ``complete``, ``chat_prompt``) over the NumPy :class:`Engine`.

    Args:
        model: the NumPy :class:`~barkgpt.numpy.model.GPT`.
        tokenizer: its tokenizer.
        config: the checkpoint's ``config.json`` dict, optional.
    """

    def __init__(self, model: GPT, tokenizer: Tokenizer, config: dict | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config or {}
        self.engine = Engine(model)


def load_generator(path: str | Path, device: str = "cpu", compile: bool = False) -> NumpyTextGenerator:
    """Load a run or checkpoint folder (either backend's) into a :class:`NumpyTextGenerator`;
    ``device`` and ``compile`` are accepted for :func:`barkgpt.generate.load_generator`'s
    signature and must be their CPU defaults.

    Raises:
        BarkError: no checkpoint or a corrupt one, or a device other than cpu/auto.
    """
    from barkgpt.checkpoint import find_checkpoint, read_checkpoint_config

    if device not in ("cpu", "auto"):
        raise BarkError(f"the numpy backend runs on the CPU; drop --device {device} or use --backend torch")
    ckpt = find_checkpoint(path)
    return NumpyTextGenerator(load_weights(ckpt), Tokenizer.load(ckpt), read_checkpoint_config(ckpt))
