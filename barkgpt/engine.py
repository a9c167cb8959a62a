"""One engine for every decode: KV caches, a prefix cache, logits processors, and the Engine
(prefill, one decode step for a batch of rows at their own positions, sampling).

The engine knows nothing about tokenization (as nanochat's ``engine.py``); ``generate.py``
wraps it with a tokenizer, stop strings and streaming text, and the server's scheduler only
queues requests and streams their tokens (vLLM's split). Sampling settings are one
:class:`~barkgpt.config.SamplingParams`, applied as a list of logits processors
(:data:`LOGITS_PROCESSORS`). ``GPT.generate`` (full recompute) is the reference this engine is
tested against.
"""

from __future__ import annotations

import bisect
import collections
import sys
import types
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from barkgpt.common import BarkError, check_prompt, compile_fn
from barkgpt.config import SamplingParams
from barkgpt.model import GPT


def row_positions(start: torch.Tensor, T: int) -> torch.Tensor:
    """(B, T) positions of the next ``T`` tokens of rows that hold ``start`` (B,) tokens each."""
    return start.view(-1, 1) + torch.arange(T, device=start.device)


def row_causal_mask(pos: torch.Tensor, L: int) -> torch.Tensor:
    """(B, 1, T, L) bool from (B, T) query positions: True where query t of row b may attend key
    slot j, i.e. j <= its position."""
    keys = torch.arange(L, device=pos.device)
    return keys.view(1, 1, 1, L) <= pos.view(pos.size(0), 1, -1, 1)


def scatter_rows(k_all: torch.Tensor, v_all: torch.Tensor, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write new keys/values (B, n_kv_head, T, hs) into one layer's cache tensors
    (B, n_kv_head, max_len, hs) at each row's own (B, T) positions, in place."""
    idx = pos.view(pos.size(0), 1, -1, 1).expand_as(k)
    k_all.scatter_(2, idx, k)
    v_all.scatter_(2, idx, v)


class KVCache:
    """Keys and values of every layer for a batch of rows, each row at its own position.

    Tensors ``k`` and ``v`` are (n_layer, B, n_kv_head, max_len, head_dim); ``lengths[b]`` is
    how many positions row ``b`` holds. ``GPT.forward`` asks for ``positions(T)`` and
    ``attn_mask(T)``, every attention layer calls ``update``, and the model calls ``advance(T)``
    after the last layer.
    """

    def __init__(
        self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, device="cpu", dtype=torch.float32
    ):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch_size  # python ints: no device sync to read them
        self.device = device
        self._pos = None  # (B, T) positions of the tokens in flight

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> KVCache:
        """A cache sized for ``model`` (``max_len`` defaults to ``block_size``)."""
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch_size, c.n_kv_head, max_len or c.block_size, c.head_dim, p.device, p.dtype)

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return len(self.lengths)

    def expand(self, batch_size: int) -> KVCache:
        """A new cache whose ``batch_size`` rows all copy this one-row cache."""
        assert self.batch_size == 1
        out = KVCache.__new__(KVCache)
        out.k = self.k.repeat(1, batch_size, 1, 1, 1)
        out.v = self.v.repeat(1, batch_size, 1, 1, 1)
        out.max_len, out.device, out._pos = self.max_len, self.device, None
        out.lengths = self.lengths * batch_size
        return out

    def narrow(self, n: int) -> KVCache:
        """A cache over the first ``n`` rows that shares this one's storage: writes go through,
        but ``lengths`` is a copy (read it back after a forward pass)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k[:, :n], self.v[:, :n]  # views: (n_layer, n, n_kv_head, max_len, hs)
        out.max_len, out.device, out._pos = self.max_len, self.device, None
        out.lengths = self.lengths[:n]
        return out

    def copy_row(self, dst: int, src: KVCache, src_row: int = 0) -> None:
        """Copy row ``src_row`` of ``src`` (its keys, values and length) into row ``dst``.

        The continuous-batching scheduler uses it to put a request prefilled alone into the shared
        decode cache, and to move the last row into the slot a finished request left.
        """
        n = src.lengths[src_row]
        self.k[:, dst, :, :n] = src.k[:, src_row, :, :n]
        self.v[:, dst, :, :n] = src.v[:, src_row, :, :n]
        self.lengths[dst] = n

    def reset(self) -> None:
        """Forget every row's contents."""
        self.lengths = [0] * self.batch_size

    def get_pos(self) -> int:
        """The longest row's length in tokens."""
        return max(self.lengths)

    def _uniform(self) -> bool:
        return all(n == self.lengths[0] for n in self.lengths)

    def positions(self, T: int) -> int | torch.Tensor:
        """Where the next ``T`` tokens of each row go: an ``int`` start position shared by all
        rows (the common case, which lets the model slice its tables), else a (B, T) tensor.

        Raises:
            BarkError: a row would exceed ``max_len``.
        """
        if self.get_pos() + T > self.max_len:
            raise BarkError(f"the KV cache holds {self.max_len} positions; {self.get_pos()} + {T} do not fit")
        if self._uniform():
            self._pos = None
            return self.lengths[0]
        self._pos = row_positions(torch.tensor(self.lengths, device=self.device), T)  # (B, T)
        return self._pos

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """Boolean (B, 1, T, L) mask, True where query t of row b may attend key j (j <= pos).

        None when plain causal attention is exact: all rows at 0 or a single new token at a
        shared position.
        """
        if self._uniform() and (self.lengths[0] == 0 or T == 1):
            return None
        pos = (
            self._pos
            if self._pos is not None
            else self.lengths[0] + torch.arange(T, device=self.device).expand(self.batch_size, T)
        )
        return row_causal_mask(pos, self.get_pos() + T)  # (B, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, n_kv_head, T, hs) and return all cached ones (B, n_kv_head, L, hs)."""
        T = k.size(2)
        L = self.get_pos() + T
        if self._pos is None:  # rows share a position: one slice write
            p = self.lengths[0]
            self.k[layer, :, :, p : p + T] = k
            self.v[layer, :, :, p : p + T] = v
        else:  # each row writes at its own offset
            scatter_rows(self.k[layer], self.v[layer], self._pos, k, v)
        return self.k[layer, :, :, :L], self.v[layer, :, :, :L]

    def advance(self, T: int) -> None:
        """Count ``T`` more tokens in every row."""
        self.lengths = [n + T for n in self.lengths]


class StaticKVCache:
    """A read-only KV cache with every shape fixed, for a compiled decode step (as HF's
    ``StaticCache``).

    Positions live in a (B,) int64 tensor instead of Python ints, and attention always spans all
    ``max_len`` slots under a (B, 1, T, max_len) mask, so one compiled graph serves every
    position: nothing the graph reads changes shape between steps. The cache tensors are not
    written: each layer attends over them with its new key/value put in by ``torch.where``, and
    the new entries are collected for the caller to write back (:meth:`new_entries`), because
    a compiled graph that mutates its inputs copies them whole on every call (a full cache per
    step at batch 16).

    Several decode steps may run on one such cache (one compiled call decoding several tokens):
    step j puts its tokens at ``pos + j``, and attends over the cache plus the entries of steps
    0 to j, which are still only in this object.

    With ``decode_kernel`` (float32 on a CPU with AVX2: :meth:`GPT.decode_kernel
    <barkgpt.model.GPT.decode_kernel>`) the model calls :meth:`record` instead of :meth:`update`
    and attends through the C++ kernel, which reads each row's filled slots in place, then the
    new entries: nothing the size of the cache is copied, and the cost follows the rows' lengths.

    Args:
        k, v: (n_layer, B, n_kv_head, max_len, head_dim), e.g. a prefilled :class:`KVCache`'s.
        pos: (B,) int64, how many positions each row holds (not changed: steps count in ``offset``).
        decode_kernel: the model attends through :func:`barkgpt.cpu_attention.decode_attention`.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, decode_kernel: bool = False):
        self.k, self.v, self.pos = k, v, pos
        self.decode_kernel = decode_kernel
        self.max_len = k.size(3)
        self.offset = 0  # decode steps run on this object so far
        self._p = None  # (B, T) positions of the tokens in flight
        n_layer = k.size(0)
        self._k: list[torch.Tensor] = [k[i] for i in range(n_layer)]  # per layer, with the new entries put in (SDPA)
        self._v: list[torch.Tensor] = [v[i] for i in range(n_layer)]
        self._new_k: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]  # per layer, per step: (B, 1, n_kv_head, hs)
        self._new_v: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the next ``T`` tokens of each row."""
        self._p = row_positions(self.pos + self.offset, T)
        return self._p

    def attn_mask(self, T: int) -> torch.Tensor | None:
        """(B, 1, T, max_len) bool, True where query t of row b may attend slot j (j <= its position);
        None with ``decode_kernel`` (the kernel needs none)."""
        return None if self.decode_kernel else row_causal_mask(self._p, self.max_len)

    def record(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With ``decode_kernel``: keep layer ``layer``'s new keys/values (B, 1, n_kv_head, hs), as
        the model's attention reads the cache in place (see :class:`~barkgpt.model.CausalSelfAttention`);
        returns this layer's entries of every step so far, (B, steps, n_kv_head, hs), the new last."""
        assert k.size(1) == 1, "StaticKVCache serves decode steps of one token per row"
        self._new_k[layer].append(k)
        self._new_v[layer].append(v)
        if len(self._new_k[layer]) == 1:
            return k, v
        return torch.cat(self._new_k[layer], dim=1), torch.cat(self._new_v[layer], dim=1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All slots (B, n_kv_head, max_len, hs) with the new keys/values (B, n_kv_head, 1, hs) at
        each row's position (and those of earlier steps at theirs); records the new ones."""
        assert k.size(2) == 1, "StaticKVCache serves decode steps of one token per row"
        self._new_k[layer].append(k.transpose(1, 2))
        self._new_v[layer].append(v.transpose(1, 2))
        hit = torch.arange(self.max_len, device=k.device).view(1, 1, -1, 1) == self._p.view(-1, 1, 1, 1)  # (B, 1, max_len, 1)
        self._k[layer] = torch.where(hit, k, self._k[layer])
        self._v[layer] = torch.where(hit, v, self._v[layer])
        return self._k[layer], self._v[layer]

    def advance(self, T: int) -> None:
        """Count ``T`` more tokens in every row."""
        self.offset += T

    def new_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values the steps so far made, (n_layer, B, n_kv_head, steps, hs) each."""
        k = torch.stack([torch.cat(e, dim=1) if len(e) > 1 else e[0] for e in self._new_k]).transpose(2, 3)
        v = torch.stack([torch.cat(e, dim=1) if len(e) > 1 else e[0] for e in self._new_v]).transpose(2, 3)
        return k, v


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019, as HF's ``RepetitionPenaltyLogitsProcessor``):
    logits of tokens in ``history`` are divided by ``penalty`` when positive, multiplied when negative.

    Args:
        logits: (B, V) float.
        history: (B, L) int64 ids seen so far (prompt and generated).
        penalty: > 0; 1 leaves logits unchanged.

    Returns:
        (B, V) penalised logits (a new tensor).
    """
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(1, history, seen)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, generated: torch.Tensor, presence: float, frequency: float
) -> torch.Tensor:
    """OpenAI's presence and frequency penalties (its API reference, "Parameter details"), over
    the tokens generated so far, as vLLM applies them: ``logits[j] -= frequency * count[j] +
    presence * (count[j] > 0)``.

    Args:
        logits: (B, V) float.
        generated: (B, L) int64 ids generated so far (not the prompt).
        presence: in [-2, 2]; 0 is off.
        frequency: in [-2, 2]; 0 is off.

    Returns:
        (B, V) penalised logits (a new tensor).
    """
    if generated.numel() == 0 or (presence == 0 and frequency == 0):
        return logits
    counts = torch.zeros_like(logits).scatter_add_(1, generated, torch.ones_like(generated, dtype=logits.dtype))  # (B, V)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def sample_from_probs(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse transform sampling (Devroye 1986, ch. 2): row b takes the first token whose cumulative probability exceeds
    ``u[b]`` times the row's total. With ``u`` uniform in [0, 1) that is a draw from ``probs``
    (as ``torch.multinomial``), and each row's draw depends on its own ``u`` alone, so a request's
    tokens do not depend on the other rows of a batch.

    Args:
        probs: (B, V) non-negative float.
        u: (B,) uniform numbers in [0, 1).

    Returns:
        (B,) int64 token ids; a token of probability 0 is never chosen.
    """
    cdf = probs.cumsum(dim=-1)  # (B, V), non-decreasing
    target = u.view(-1, 1).to(cdf.dtype) * cdf[:, -1:]  # (B, 1), below the row's total
    return torch.searchsorted(cdf, target, right=True).view(-1).clamp_max(probs.size(-1) - 1)


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen tokens and of the ``k`` most likely ones, as OpenAI's
    ``logprobs``: taken from the model's own distribution, ``log_softmax(logits)``, before
    temperature, filters and penalties (vLLM's default ``raw_logprobs``), so they describe the
    model rather than the sampler.

    Args:
        logits: (B, V) float, the raw model logits at the sampled position.
        chosen: (B,) int64, the sampled token ids.
        k: how many top tokens to return, >= 0 (a vocabulary smaller than k gives all V).

    Returns:
        ``(chosen_logprob, top_logprob, top_ids)``: (B,) float32, (B, min(k, V)) float32 sorted
        from most likely down, (B, min(k, V)) int64. Every value is <= 0.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, V), in fp32 whatever the model's dtype
    top_logprob, top_ids = logp.topk(min(k, logp.size(-1)), dim=-1)  # (B, k)
    return logp.gather(1, chosen.view(-1, 1)).squeeze(1), top_logprob, top_ids


# ---- rows and logits processors ------------------------------------------------------------------


UNIFORM_BLOCK = 64  # uniform numbers a row draws from its generator at once (Row.uniform)


class Row:
    """One sequence being generated: its prompt, the tokens generated so far, its settings, its
    own seeded ``torch.Generator`` and its logits hooks.

    A row draws its random numbers from its own generator, one per sampled token, so its tokens
    do not depend on the other rows of a batch (up to float rounding of batched matmuls).

    Args:
        prompt: token ids.
        params: how it samples (:class:`~barkgpt.config.SamplingParams`).
        seed: seeds the generator (None: ``params.seed``; both None: nondeterministic). Any int in
            [-2**63, 2**64); others wrap modulo 2**64.
        processors: per-row logits hooks, each ``fn(row, logits) -> logits`` on this row's (V,)
            float logits; they run after the penalties and before temperature, which is where
            constrained decoding masks the tokens a grammar forbids (``-inf``).
        device: where the generator draws.
    """

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        seed: int | None = None,
        processors: Sequence[Callable] = (),
        device="cpu",
    ):
        self.prompt, self.params = list(prompt), params
        self.generated: list[int] = []
        self.processors = list(processors)
        self.rng = torch.Generator(device=device)
        seed = params.seed if seed is None else seed
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed % 2**64)  # manual_seed reads a negative seed the same way
        self._uniforms: list[float] = []  # drawn ahead from rng, next one last

    def uniform(self) -> float:
        """The row's next uniform number in [0, 1) (float32), one per sampled token: drawn from
        its generator :data:`UNIFORM_BLOCK` at a time, one call per block instead of one per
        token. On CPU the numbers are those of one ``torch.rand(1, generator=rng)`` per token
        (test_engine.py checks it)."""
        if not self._uniforms:
            self._uniforms = torch.rand(UNIFORM_BLOCK, generator=self.rng, device=self.rng.device).tolist()[::-1]
        return self._uniforms.pop()

    @property
    def ids(self) -> list[int]:
        """Prompt and generated token ids."""
        return self.prompt + self.generated


def _column(values: list, dtype, device) -> torch.Tensor:
    """(B, 1) tensor of one value per row."""
    return torch.tensor(values, dtype=dtype, device=device).view(-1, 1)


def _unsort(remove_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """A (B, V) mask in sorted order back to vocabulary order."""
    return torch.zeros_like(remove_sorted).scatter_(1, order, remove_sorted)


def penalize_repetition(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: :func:`apply_repetition_penalty` over each row's prompt and generated
    tokens, for the rows whose ``repetition_penalty`` is not 1. (B, V) -> (B, V)."""
    todo = [b for b, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if not todo:
        return logits
    logits = logits.clone()
    for b in todo:  # rare, and each row has its own history: row by row
        history = torch.tensor([rows[b].ids], dtype=torch.long, device=logits.device)  # (1, L)
        logits[b : b + 1] = apply_repetition_penalty(logits[b : b + 1], history, rows[b].params.repetition_penalty)
    return logits


def penalize_presence_frequency(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: :func:`apply_presence_frequency_penalty` over each row's generated
    tokens, for the rows that set either penalty. (B, V) -> (B, V)."""
    todo = [b for b, r in enumerate(rows) if r.params.presence_penalty or r.params.frequency_penalty]
    if not todo:
        return logits
    logits = logits.clone()
    for b in todo:
        p = rows[b].params
        generated = torch.tensor([rows[b].generated], dtype=torch.long, device=logits.device)  # (1, L)
        logits[b : b + 1] = apply_presence_frequency_penalty(
            logits[b : b + 1], generated, p.presence_penalty, p.frequency_penalty
        )
    return logits


def apply_row_hooks(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: each row's own ``processors`` (see :class:`Row`), in order. (B, V) -> (B, V)."""
    todo = [b for b, r in enumerate(rows) if r.processors]
    if not todo:
        return logits
    logits = logits.clone()
    for b in todo:
        for fn in rows[b].processors:
            logits[b] = fn(rows[b], logits[b])
    return logits


def scale_temperature(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: divide each sampled row by its temperature (greedy rows keep theirs:
    the argmax does not move). (B, V) -> (B, V)."""
    temps = [r.params.temperature if r.params.temperature > 0 else 1.0 for r in rows]
    if all(t == 1.0 for t in temps):
        return logits
    return logits / _column(temps, logits.dtype, logits.device)


def filter_top_k(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: keep each row's ``top_k`` most likely tokens (exactly k, ties broken by
    the sort), the others -inf; 0 keeps all. (B, V) -> (B, V)."""
    V = logits.size(-1)
    ks = [r.params.top_k if 0 < r.params.top_k < V else V for r in rows]
    if all(k == V for k in ks):
        return logits
    _, order = logits.sort(dim=-1, descending=True)  # (B, V)
    rank = torch.arange(V, device=logits.device).view(1, V)
    return logits.masked_fill(_unsort(rank >= _column(ks, torch.long, logits.device), order), float("-inf"))


def filter_top_p(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: nucleus filtering (Holtzman et al. 2019): keep the smallest set of most
    likely tokens whose probability reaches ``top_p``, always the most likely one. (B, V) -> (B, V)."""
    ps = [r.params.top_p for r in rows]
    if all(p >= 1.0 for p in ps):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    probs = F.softmax(sorted_logits, dim=-1)
    remove = (probs.cumsum(dim=-1) - probs) >= _column(ps, probs.dtype, logits.device)  # mass before it reaches top_p
    remove[:, 0] = False
    return logits.masked_fill(_unsort(remove, order), float("-inf"))


def filter_min_p(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Logits processor: min-p filtering (Nguyen et al. 2024): drop tokens whose probability is
    below ``min_p`` times the most likely token's. (B, V) -> (B, V)."""
    ms = [r.params.min_p for r in rows]
    if all(m <= 0.0 for m in ms):
        return logits
    probs = F.softmax(logits, dim=-1)  # (B, V)
    remove = probs < _column(ms, probs.dtype, logits.device) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(remove, float("-inf"))


# In HF's and vLLM's order: penalties on the raw logits, then the hooks, then temperature, then
# the filters (each filter after temperature, so top-p and min-p see the sampled distribution).
# A processor that can move a greedy row's argmax must also be named in plain_greedy, which lets
# such rows choose their tokens inside a compiled graph without these.
LOGITS_PROCESSORS: tuple[Callable, ...] = (
    penalize_repetition,
    penalize_presence_frequency,
    apply_row_hooks,
    scale_temperature,
    filter_top_k,
    filter_top_p,
    filter_min_p,
)


def process_logits(logits: torch.Tensor, rows: Sequence[Row], processors: Sequence[Callable] = LOGITS_PROCESSORS) -> torch.Tensor:
    """Run ``processors`` (each ``fn(logits, rows) -> logits``) over (B, V) logits, one row per
    entry of ``rows``; returns (B, V) float32 logits, filtered tokens at -inf."""
    x = logits.float()
    for fn in processors:
        x = fn(x, rows)
    return x


def sample_rows(logits: torch.Tensor, rows: Sequence[Row], processors: Sequence[Callable] = LOGITS_PROCESSORS) -> list[int]:
    """The next token of each row: :func:`process_logits`, then the argmax for greedy rows and, for
    the others, one batched :func:`sample_from_probs` with one uniform number from each row's
    own generator.

    Args:
        logits: (B, V) raw model logits, row b for ``rows[b]``.
        rows: the B rows.
        processors: the logits processors (default :data:`LOGITS_PROCESSORS`).

    Returns:
        B token ids (Python ints).
    """
    x = process_logits(logits, rows, processors)
    hot = [b for b, r in enumerate(rows) if not r.params.greedy]
    if not hot:
        return x.argmax(dim=-1).tolist()
    probs = F.softmax(x[hot] if len(hot) < len(rows) else x, dim=-1)  # (len(hot), V)
    u = torch.tensor([rows[b].uniform() for b in hot], dtype=torch.float32, device=x.device)  # (len(hot),)
    drawn = sample_from_probs(probs, u).tolist()
    if len(hot) == len(rows):  # no greedy row: no argmax to take (a (B, V) pass)
        return drawn
    tokens = x.argmax(dim=-1).tolist()
    for b, t in zip(hot, drawn):
        tokens[b] = t
    return tokens


def sample_next_token(
    logits: torch.Tensor,
    rng: torch.Generator | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> torch.Tensor:
    """Pick the next token of each row from its logits, every row with the same settings and one
    shared ``rng``. A pure function of its arguments (as nanochat's ``sample_next_token``).

    Args:
        logits: (B, V) float.
        rng: the ``torch.Generator`` to sample with (None: torch's global one).
        temperature: 0 means argmax (greedy).
        top_k, top_p, min_p: see :class:`~barkgpt.config.SamplingParams`.

    Returns:
        (B,) int64 token ids.

    Raises:
        BarkError: a setting out of its range.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    rows = [_SharedRow(params)] * logits.size(0)
    probs = F.softmax(process_logits(logits, rows), dim=-1)
    return sample_from_probs(probs, torch.rand(logits.size(0), generator=rng, device=logits.device))


class _SharedRow:
    """What the processors read of a row, for rows that share settings and have no history."""

    def __init__(self, params: SamplingParams):
        self.params, self.prompt, self.generated, self.processors = params, [], [], []

    ids = property(lambda self: [])


def row_logprobs(
    logits: torch.Tensor, rows: Sequence[Row], tokens: Sequence[int]
) -> dict[int, tuple[float, list[tuple[int, float]]]]:
    """``{b: (logprob, [(id, logprob), ...])}`` for the rows whose ``params.logprobs`` is set
    (each with its own top k), from one :func:`token_logprobs` over just those rows.

    Args:
        logits: (B, V) raw model logits.
        rows: the B rows; tokens: the B chosen ids.
    """
    want = [b for b, r in enumerate(rows) if r.params.logprobs is not None]
    if not want:
        return {}
    ks = [rows[b].params.logprobs for b in want]
    chosen = torch.tensor([tokens[b] for b in want], device=logits.device)
    lp, top_lp, top_ids = (t.tolist() for t in token_logprobs(logits[want], chosen, max(ks)))
    return {b: (lp[i], list(zip(top_ids[i][:k], top_lp[i][:k]))) for i, (b, k) in enumerate(zip(want, ks))}


# ---- prefix cache ----------------------------------------------------------------------------


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences of one type, both tuples or both
    lists (a binary search over slice
    comparisons, which run in C: O(n log n) element compares, no Python loop per token)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n - 1  # a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixCache:
    """KV entries of earlier sequences, for prompts that start with their tokens: vLLM's automatic
    prefix caching and llama.cpp's ``cache_prompt``, at token granularity.

    An entry is the ids of a finished prompt-and-reply (or a prompt) and their keys and values,
    (n_layer, n_kv_head, L, head_dim) each. A new prompt takes the entry that shares its longest
    prefix and prefills only the rest. Entries hold at most ``max_bytes`` together; the least
    recently used leave first, and an entry whose ids begin a newer one is dropped for it.
    Keys at a position depend only on the tokens up to it (causal attention, absolute or RoPE
    positions from 0), so a reused prefix gives the same logits as prefilling it again, up to
    float rounding.

    ``queries`` counts prompt tokens looked up, ``hits`` the tokens reused (vLLM's
    ``prefix_cache_queries`` / ``prefix_cache_hits``), so ``hits / queries`` is the hit rate.

    The ids are also kept in lexicographic order, in which the entry sharing the longest prefix
    with a prompt is one of the prompt's two neighbours, and (no entry being a prefix of another)
    an entry that is a prefix of new ids is the one just before them: :meth:`lookup` and
    :meth:`put` compare with two entries, not all of them (a server holds thousands of short
    entries: scanning them all cost ~3 ms a request at a thousand).

    Args:
        max_bytes: bytes of keys and values held at most.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = self.tokens = 0  # held now (tokens: in all entries); plain ints, safe to read from any thread
        self.queries = self.hits = 0
        self._entries: collections.OrderedDict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()
        self._sorted: list[tuple[int, ...]] = []  # the same keys in lexicographic order

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """``(n, k, v)``: the longest cached prefix of ``ids``, at most ``len(ids) - 1`` tokens (the
        last prompt token is always run, for its logits), and the entry's tensors (their first
        ``n`` positions are the prefix's); ``(0, None, None)`` on a miss. Counts the query."""
        ids = tuple(ids)  # keys are tuples: a tuple never equals a list
        best, n = None, 0
        i = bisect.bisect_left(self._sorted, ids)
        for key in self._sorted[max(i - 1, 0) : i + 1]:  # the longest common prefix is a neighbour's
            m = common_prefix(key, ids)
            if m > n:
                best, n = key, m
        n = min(n, len(ids) - 1)
        self.queries += len(ids)
        if best is None or n < 1:
            return 0, None, None
        self.hits += n
        self._entries.move_to_end(best)  # most recently used
        k, v = self._entries[best]
        return n, k, v

    def put(self, ids: Sequence[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Remember ``ids`` with keys/values (n_layer, n_kv_head, >= len(ids), head_dim): copied,
        so the caller's cache can be reused. A no-op when an entry already starts with ``ids``
        or one entry alone would exceed ``max_bytes``."""
        key = tuple(ids)
        L = len(key)
        size = 2 * k[:, :, :L].numel() * k.element_size()
        if L == 0 or size > self.max_bytes:
            return
        i = bisect.bisect_left(self._sorted, key)
        if i < len(self._sorted) and self._sorted[i][:L] == key:  # an entry holds this one already
            self._entries.move_to_end(self._sorted[i])
            return
        if i > 0 and key[: len(self._sorted[i - 1])] == self._sorted[i - 1]:  # this one holds that entry
            self._drop(self._sorted[i - 1])  # (no other can: it would hold that one)
            i -= 1
        self._sorted.insert(i, key)
        self._entries[key] = (k[:, :, :L].clone(), v[:, :, :L].clone())
        self.bytes += size
        self.tokens += L
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))  # least recently used

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._sorted[bisect.bisect_left(self._sorted, key)]
        k, v = self._entries.pop(key)
        self.bytes -= k.numel() * k.element_size() + v.numel() * v.element_size()
        self.tokens -= len(key)


# ---- the engine ------------------------------------------------------------------------------


def write_new_entries(cache: KVCache, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
    """Store the keys/values (n_layer, n, n_kv_head, T, hs) of T decode steps of the first n rows
    of ``cache``, each from its own position ``cache.lengths[b]`` (its length is not advanced here).

    One row is a slice assignment (~6 us per tensor against ~25 us for ``scatter_``); several are
    one ``index_put_`` over a (B, max_len, ...) view per tensor (~56 us for k and v at 16 rows
    against ~100 us for ``scatter_`` with an expanded index; bench/RESULTS.md, 2026-12-01 16:10)."""
    n, T = new_k.size(1), new_k.size(3)
    if n == 1:
        p = cache.lengths[0]
        cache.k[:, 0, :, p : p + T] = new_k[:, 0]
        cache.v[:, 0, :, p : p + T] = new_v[:, 0]
        return
    rows = torch.arange(n, device=new_k.device).view(n, 1)
    pos = torch.tensor(cache.lengths[:n], device=new_k.device).view(n, 1) + torch.arange(T, device=new_k.device)  # (n, T)
    for dst, src in ((cache.k, new_k), (cache.v, new_v)):
        dst.permute(1, 3, 0, 2, 4)[rows, pos] = src.permute(1, 3, 0, 2, 4)  # (n, T, n_layer, n_kv_head, hs)


def batch_bucket(n: int, max_rows: int) -> int:
    """The compiled batch size that serves ``n`` rows of a ``max_rows``-row cache: the next power of
    two, at most ``max_rows``. Row counts from 2 up share one graph whose batch dimension is
    dynamic (``torch._dynamo.mark_dynamic``); one row gets its own static graph (dynamo
    specializes size-1 dimensions), as a 1-row cache such as ``generate``'s does: padding a lone
    stream to 2 rows of the dynamic graph made each of its steps about 1.7x slower on CPU
    (1.06 against 0.63 ms on the shakespeare-bpe shape, ``bench/bench_serve.py``'s model). The
    powers of two keep the shapes it sees few."""
    return min(1 << (n - 1).bit_length(), max_rows)


MIN_LENGTH_BUCKET = 16  # the fewest cache slots a compiled decode step attends over


def length_bucket(longest: int, max_len: int) -> int:
    """The cache slots a compiled decode step attends over when its longest row holds ``longest``
    positions: the next power of two above it (at least :data:`MIN_LENGTH_BUCKET`), at most
    ``max_len``. Short rows then do not pay for attention over the whole context."""
    return min(max(1 << longest.bit_length(), MIN_LENGTH_BUCKET), max_len)


MULTI_STEP = 4  # greedy tokens per compiled call in Engine.generate (bench/bench_decode.py)


def plain_greedy(row: Row) -> bool:
    """True when ``row`` takes the argmax of the raw logits: greedy, with no penalty and no hook
    (the processors leave its argmax where it is), so its next tokens can be chosen inside a
    compiled graph (:meth:`Engine.decode_greedy`)."""
    q = row.params
    return q.greedy and q.repetition_penalty == 1.0 and not q.presence_penalty and not q.frequency_penalty and not row.processors


class Engine:
    """Prefill, decode and sampling over token ids for one model: every decode in BarkGPT runs here.

    :meth:`generate` (the CLI, ``barkgpt.load``, training samples) and the server's
    :class:`~barkgpt.server.scheduler.Scheduler` are both thin users of :meth:`prefill`,
    :meth:`decode` (one step for a batch of rows, each at its own position) and
    :func:`sample_rows` (the logits processors, per-row generators) with :func:`row_logprobs`.

    Decode steps run the model eagerly on a :class:`KVCache`, or, with ``compile``, through one
    ``torch.compile``d step over a :class:`StaticKVCache` (prefill stays eager): the compiled
    graph replaces a few hundred Python-dispatched tensor ops per token with one call, about 3x
    the tokens/s at batch 1 on a small model on CPU (``bench/bench_decode.py``), for a one-time
    compile of 5-20 s (cached by inductor across runs). Batches are padded to a power of two
    (:func:`batch_bucket`), a dynamic dimension of one graph. On a CPU with AVX2 the step's
    attention is the C++ decode kernel (``cpu_attention.decode_attention``), which reads only
    each row's filled slots: at 16 rows of the shakespeare-bpe shape a step over a 128-slot
    window went from 3.6 to 2.1 ms. Elsewhere attention spans a power-of-two number of slots
    (:func:`length_bucket`), another dynamic dimension. :meth:`warmup` compiles ahead. If
    compiling fails (no C++ compiler, an unsupported op), one warning on stderr, and eager
    decoding from then on. Greedy rows with no penalty or hook decode ``multi_step`` tokens per
    compiled call in :meth:`generate` (:meth:`decode_greedy`: the argmax inside the graph), the
    same tokens for a fraction of the per-call cost.

    Args:
        model: a :class:`GPT` in eval mode (the engine calls ``model.eval()``).
        compile: compile the decode step (at :meth:`warmup` or the first decode).
        prefix_cache_bytes: > 0 keeps a :class:`PrefixCache` of that many bytes that
            :meth:`prefill` reads and :meth:`remember` fills; 0: none.
        multi_step: tokens per compiled call in :meth:`generate` when every row is greedy with
            no penalty or hook (:meth:`decode_greedy`); 1: one per call.
    """

    def __init__(self, model: GPT, compile: bool = False, prefix_cache_bytes: int = 0, multi_step: int = MULTI_STEP):
        self.model = model.eval()
        self.multi_step = multi_step
        self.device = next(model.parameters()).device
        self.compile = compile
        self.prefix_cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self._compiled_steps: dict[int, Callable] = {}  # tokens per call -> compiled decode function
        self._compiled_ok = False  # a compiled step has run: later errors are real errors
        self._decode_kernel = False  # the compiled step attends through cpu_attention.decode_attention

    def prefill(self, ids: Sequence[int], cache: KVCache, last: bool = True) -> torch.Tensor | None:
        """Run a prompt into a one-row ``cache`` (reset first); returns the (1, V) logits after
        its last token. The longest prefix found in the prefix cache is copied in, not run.

        With ``last=False`` the last token is not run: the cache holds ``len(ids) - 1`` positions
        and None comes back; the caller feeds ``ids[-1]`` through :meth:`decode`, where it rides
        a batch step with other rows (the server's scheduler: a prompt whose other tokens are in
        the prefix cache, or a one-token prompt, then costs no forward pass of its own).

        Raises:
            BarkError: the prompt does not fit ``cache.max_len``.
        """
        assert cache.batch_size == 1
        cache.reset()
        n, k, v = self.prefix_cache.lookup(ids) if self.prefix_cache is not None else (0, None, None)  # n < len(ids)
        if n:
            cache.k[:, 0, :, :n] = k[:, :, :n]
            cache.v[:, 0, :, :n] = v[:, :, :n]
            cache.lengths[0] = n
        todo = list(ids[n:]) if last else list(ids[n:-1])
        if not todo:
            return None
        idx = torch.tensor([todo], dtype=torch.long, device=self.device)  # (1, T)
        logits = self.model(idx, kv_cache=cache)[0][:, -1, :]
        return logits if last else None

    def remember(self, ids: Sequence[int], cache: KVCache, row: int) -> None:
        """Put row ``row`` of ``cache`` in the prefix cache as the KV entries of ``ids``, which must
        be the row's tokens (only the first ``cache.lengths[row]`` are kept). No-op without one."""
        n = min(len(ids), cache.lengths[row])
        if self.prefix_cache is not None and n > 0:
            self.prefix_cache.put(list(ids)[:n], cache.k[:, row, :, :n], cache.v[:, row, :, :n])

    def _step(self, steps: int = 1):
        """The compiled decode function for ``steps`` tokens per call (built on first use).

        One step returns the logits; several (greedy rows only) run the model ``steps`` times in
        one graph, each feeding the argmax of the last, and return the tokens."""
        if steps not in self._compiled_steps:
            self._decode_kernel = self.model.decode_kernel()
            kernel = self._decode_kernel

            def step(idx, k, v, pos):  # tensors only: a fresh cache object each call needs no new guard
                cache = StaticKVCache(k, v, pos, decode_kernel=kernel)
                logits = self.model(idx, kv_cache=cache)[0][:, -1, :]
                return (logits, *cache.new_entries())  # (B, V), (n_layer, B, n_kv_head, 1, hs) x2

            def greedy_steps(idx, k, v, pos):
                cache = StaticKVCache(k, v, pos, decode_kernel=kernel)
                out = []
                for _ in range(steps):  # unrolled by dynamo: one graph for all the steps
                    idx = self.model(idx, kv_cache=cache)[0][:, -1, :].argmax(dim=-1, keepdim=True)  # (B, 1)
                    out.append(idx)
                return (torch.cat(out, dim=1), *cache.new_entries())  # (B, steps), (n_layer, B, n_kv_head, steps, hs) x2

            fn = step if steps == 1 else greedy_steps
            # a code object of this engine's own: dynamo keeps its graphs, and its limit of 8 of
            # them, per code object, so engines of other models (or steps) do not use up each other's
            fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
            self._compiled_steps[steps] = compile_fn(fn, self.device.type, fullgraph=True)
        return self._compiled_steps[steps]

    def _run_compiled(self, tokens: Sequence[int], cache: KVCache, steps: int):
        """Run the compiled ``steps``-token function on the first ``n = len(tokens)`` rows (padded
        to :func:`batch_bucket` rows) and write their new entries into ``cache``; returns its
        first output for the n rows, or None when the first compile failed (said once on stderr;
        eager decoding from then on; the cache is intact: the failure comes before the step runs)."""
        n = len(tokens)
        b = batch_bucket(n, cache.batch_size)
        idx = torch.tensor(list(tokens) + [0] * (b - n), dtype=torch.long, device=self.device).view(b, 1)
        pos = torch.tensor(cache.lengths[:n] + [0] * (b - n), device=self.device)  # (b,)
        fn = self._step(steps)
        # the kernel reads only each row's filled slots: no length buckets (and no graphs for them)
        L = cache.max_len if self._decode_kernel else length_bucket(max(cache.lengths[:n]) + steps - 1, cache.max_len)
        k, v = cache.k[:, :b, :, :L], cache.v[:, :b, :, :L]  # (n_layer, b, n_kv_head, L, hs) views
        if 1 < b < cache.batch_size:  # one graph for the batch sizes from 2 up that leave rows free
            for t, dim in ((idx, 0), (k, 1), (v, 1), (pos, 0)):
                torch._dynamo.mark_dynamic(t, dim)
        if L < cache.max_len:  # and for the lengths that leave slots free
            torch._dynamo.mark_dynamic(k, 3)
            torch._dynamo.mark_dynamic(v, 3)
        try:
            out, new_k, new_v = fn(idx, k, v, pos)
        except Exception as e:  # noqa: BLE001 - compile errors come in many types
            if self._compiled_ok:
                raise
            first = str(e).splitlines()[0][:120] if str(e) else ""
            print(f"warning: torch.compile failed ({type(e).__name__}: {first}); decoding without compile", file=sys.stderr)
            self.compile = False
            return None
        self._compiled_ok = True
        write_new_entries(cache, new_k[:, :n], new_v[:, :n])  # outside the graph: see StaticKVCache
        cache.lengths[:n] = [x + steps for x in cache.lengths[:n]]
        return out[:n]

    def decode(self, tokens: Sequence[int], cache: KVCache) -> torch.Tensor:
        """One decode step for the first ``n = len(tokens)`` rows of ``cache``, each at its own
        position: feeds row b's token ``tokens[b]`` and advances its length.

        Compiled, the batch is padded to :func:`batch_bucket` rows (padding rows are computed at
        position 0 of rows past ``n`` and their entries dropped) and attends over each row's
        filled slots (the decode kernel) or the first :func:`length_bucket` slots (SDPA). A
        batch or length smaller than the cache's is a dynamic
        dimension of one graph; the cache's full size is a static one (its own graph), which is
        why the scheduler's cache has a spare row and slot. A compile failure before the first
        compiled step says so once on stderr and decodes eagerly from then on.

        Returns:
            (n, V) logits of the next token of each row.
        """
        if self.compile:
            logits = self._run_compiled(tokens, cache, 1)
            if logits is not None:
                return logits
        n = len(tokens)
        view = cache.narrow(n)
        idx = torch.tensor(list(tokens), dtype=torch.long, device=self.device).view(n, 1)
        logits = self.model(idx, kv_cache=view)[0][:, -1, :]  # (n, V)
        cache.lengths[:n] = view.lengths
        return logits

    def decode_greedy(self, tokens: Sequence[int], cache: KVCache, steps: int) -> list[list[int]] | None:
        """``steps`` greedy decode steps in one compiled call (vLLM's multi-step scheduling) for
        the first ``n = len(tokens)`` rows: feeds ``tokens``, then each row's argmax, ``steps``
        times, and advances each row's length by ``steps``. The tokens are those of ``steps``
        calls of :meth:`decode` with an argmax between them; the per-call cost (guards, the
        wrapper, copying the new entries out, the argmax's trip through Python) is paid once.
        Each row must have ``steps`` free slots.

        Returns:
            n lists of ``steps`` token ids: row b's next tokens. None without compile (or when it
            failed): then nothing was decoded, and :meth:`decode` is the way.
        """
        assert steps > 1 and max(cache.lengths[: len(tokens)]) + steps <= cache.max_len
        if not self.compile:
            return None
        out = self._run_compiled(tokens, cache, steps)
        return None if out is None else out.tolist()

    def warmup(self, cache: KVCache, max_rows: int | None = None) -> None:
        """Compile the decode step for every batch bucket of 1 to ``max_rows`` rows (default
        ``cache.batch_size``) now, as a server does before it reports healthy, then reset
        ``cache``. No-op without ``compile``."""
        sizes = sorted({batch_bucket(n, cache.batch_size) for n in range(1, (max_rows or cache.batch_size) + 1)})
        for b in sizes:
            if not self.compile:
                break
            self.decode([0] * b, cache)  # entries at slot 0 of each row, forgotten below
        cache.reset()

    @torch.no_grad()
    def generate(
        self,
        prompt: Sequence[int],
        params: SamplingParams | None = None,
        *,
        stop_ids: Sequence[int] = (),
        processors: Sequence[Callable] = (),
        **sampling,
    ) -> Iterator[list[int | None]]:
        """Stream generated tokens, one step at a time, for ``num_samples`` rows of one prompt.

        The prompt is prefilled once into a KV cache; each step decodes one token per row
        (compiled and greedy with no penalty or hook: ``multi_step`` tokens per call, yielded one
        step at a time, the same tokens). When a row reaches ``block_size`` the window slides: the last ``block_size // 2`` tokens are
        prefilled into a fresh cache (an approximation of the naive path, which re-reads the
        full last ``block_size`` tokens at every step).

        Args:
            prompt: token ids, 1 <= len <= block_size.
            params: the sampling settings; or give their fields as keywords (``max_new_tokens=``,
                ``temperature=``, ...: :class:`~barkgpt.config.SamplingParams`). Sample j draws
                with seed ``params.seed + j``. ``stop`` strings are the text layer's.
            stop_ids: token ids that end a row (the stop token is still yielded once).
            processors: per-row logits hooks given to every row (see :class:`Row`).

        Yields:
            A list of ``num_samples`` entries per step: the new token id of each row, or None for
            a row that has already stopped. Ends when every row stopped or after max_new_tokens.

        Raises:
            BarkError: an empty prompt, one longer than ``block_size``, or a bad sampling setting.
        """
        p = params if params is not None else SamplingParams(**sampling)
        block_size = self.model.config.block_size
        check_prompt(prompt, block_size)
        n, stop = p.num_samples, set(stop_ids)
        rows = [Row(prompt, p, None if p.seed is None else p.seed + j, processors, self.device) for j in range(n)]
        cache = KVCache.for_model(self.model, 1, block_size + 1)  # a spare slot: see decode()
        logits = self.prefill(prompt, cache)  # prefill the prompt once...
        cache = cache.expand(n)  # ...and share it with every row
        logits = logits.expand(n, -1)  # (n, V)
        done = [False] * n
        steps = self.multi_step if self.compile and all(plain_greedy(r) for r in rows) else 1
        ahead: list[list[int]] = []  # tokens a multi-step call decoded, not yet yielded (each step's n)
        for i in range(p.max_new_tokens):
            tokens = ahead.pop(0) if ahead else sample_rows(logits, rows)
            out = []
            for b, t in enumerate(tokens):
                out.append(None if done[b] else t)
                done[b] = done[b] or t in stop
            yield out
            if all(done):
                return
            for row, t in zip(rows, tokens):
                row.generated.append(t)
            if ahead:  # in the cache already: the multi-step call fed it
                continue
            if steps > 1 and p.max_new_tokens - i > 2 and cache.get_pos() + steps <= block_size:
                # several steps in one call where single steps would not slide the window meanwhile
                got = self.decode_greedy(tokens, cache, steps)
                if got is not None:
                    ahead = [list(col) for col in zip(*got)]
                    continue
            if cache.get_pos() >= block_size:  # slide the window: re-prefill the recent half
                cache = KVCache.for_model(self.model, n, block_size + 1)
                recent = torch.tensor([r.ids[-(block_size // 2) :] for r in rows], device=self.device)  # (n, block_size // 2)
                logits = self.model(recent, kv_cache=cache)[0][:, -1, :]
            else:
                logits = self.decode(tokens, cache)
