"""Fast generation on token ids: a KV cache, a pure sampling function and the decode loop.

The engine knows nothing about tokenization (as nanochat's ``engine.py``); ``generate.py``
wraps it with a tokenizer, stop strings and streaming text. ``GPT.generate`` (full recompute)
is the reference this engine is tested against.
"""

from __future__ import annotations

import sys
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from barkgpt.common import BarkError, compile_fn
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

    def __init__(self, n_layer: int, batch_size: int, n_kv_head: int, max_len: int, head_dim: int, device="cpu", dtype=torch.float32):
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.lengths = [0] * batch_size  # python ints: no device sync to read them
        self.device = device
        self._pos = None  # (B, T) positions of the tokens in flight

    @classmethod
    def for_model(cls, model: GPT, batch_size: int, max_len: int | None = None) -> "KVCache":
        """A cache sized for ``model`` (``max_len`` defaults to ``block_size``)."""
        c = model.config
        p = next(model.parameters())
        return cls(c.n_layer, batch_size, c.n_kv_head, max_len or c.block_size, c.head_dim, p.device, p.dtype)

    @property
    def batch_size(self) -> int:
        """Rows in the cache."""
        return len(self.lengths)

    def expand(self, batch_size: int) -> "KVCache":
        """A new cache whose ``batch_size`` rows all copy this one-row cache."""
        assert self.batch_size == 1
        out = KVCache.__new__(KVCache)
        out.k = self.k.repeat(1, batch_size, 1, 1, 1)
        out.v = self.v.repeat(1, batch_size, 1, 1, 1)
        out.max_len, out.device, out._pos = self.max_len, self.device, None
        out.lengths = self.lengths * batch_size
        return out

    def narrow(self, n: int) -> "KVCache":
        """A cache over the first ``n`` rows that shares this one's storage: writes go through,
        but ``lengths`` is a copy (read it back after a forward pass)."""
        out = KVCache.__new__(KVCache)
        out.k, out.v = self.k[:, :n], self.v[:, :n]  # views: (n_layer, n, n_kv_head, max_len, hs)
        out.max_len, out.device, out._pos = self.max_len, self.device, None
        out.lengths = self.lengths[:n]
        return out

    def copy_row(self, dst: int, src: "KVCache", src_row: int = 0) -> None:
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
        pos = self._pos if self._pos is not None else self.lengths[0] + torch.arange(T, device=self.device).expand(self.batch_size, T)
        return row_causal_mask(pos, self.get_pos() + T)  # (B, 1, T, L)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values (B, n_kv_head, T, hs) and return all cached ones (B, n_kv_head, L, hs)."""
        T = k.size(2)
        L = self.get_pos() + T
        if self._pos is None:  # rows share a position: one slice write
            p = self.lengths[0]
            self.k[layer, :, :, p:p + T] = k
            self.v[layer, :, :, p:p + T] = v
        else:  # each row writes at its own offset
            scatter_rows(self.k[layer], self.v[layer], self._pos, k, v)
        return self.k[layer, :, :, :L], self.v[layer, :, :, :L]

    def advance(self, T: int) -> None:
        """Count ``T`` more tokens in every row."""
        self.lengths = [n + T for n in self.lengths]


class StaticKVCache:
    """A KV cache with every shape fixed, for a compiled decode step (as HF's ``StaticCache``).

    Positions live in a (B,) int64 tensor instead of Python ints, and attention always spans all
    ``max_len`` slots under a (B, 1, T, max_len) mask, so one compiled graph serves every
    position: nothing the graph reads changes shape between steps.

    Args:
        k, v: (n_layer, B, n_kv_head, max_len, head_dim), e.g. a prefilled :class:`KVCache`'s;
            written in place.
        pos: (B,) int64, how many positions each row holds; advanced in place.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor):
        self.k, self.v, self.pos = k, v, pos
        self.max_len = k.size(3)
        self._p = None  # (B, T) positions of the tokens in flight

    def positions(self, T: int) -> torch.Tensor:
        """(B, T) positions of the next ``T`` tokens of each row."""
        self._p = row_positions(self.pos, T)
        return self._p

    def attn_mask(self, T: int) -> torch.Tensor:
        """(B, 1, T, max_len) bool, True where query t of row b may attend slot j (j <= its position)."""
        return row_causal_mask(self._p, self.max_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values (B, n_kv_head, T, hs) at each row's positions; return all slots
        (B, n_kv_head, max_len, hs)."""
        scatter_rows(self.k[layer], self.v[layer], self._p, k, v)
        return self.k[layer], self.v[layer]

    def advance(self, T: int) -> None:
        """Count ``T`` more tokens in every row."""
        self.pos.add_(T)


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


def apply_presence_frequency_penalty(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                                     frequency: float) -> torch.Tensor:
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


def sampling_probs(logits: torch.Tensor, temperature: float | Sequence[float] = 1.0, top_k: int | Sequence[int] = 0,
                   top_p: float | Sequence[float] = 1.0, min_p: float | Sequence[float] = 0.0) -> torch.Tensor:
    """The distribution to sample the next token from, after temperature and filters.

    Filters apply to temperature-scaled logits, in HF's order: top-k, then top-p (nucleus,
    Holtzman et al. 2019: the smallest set whose probability reaches ``top_p``, always keeping
    the most likely token), then min-p (Nguyen et al. 2024: drop tokens below ``min_p`` times the
    top probability). Each setting is one number for every row or B numbers (a list, tuple or
    1-D tensor), one per row, so a batch of requests with different settings is filtered in one
    pass. Which filters run is decided from the settings on the host, without a device sync.

    Args:
        logits: (B, V) float.
        temperature: > 0 (greedy rows are the caller's: take the argmax instead).
        top_k: keep the k most likely tokens; 0 keeps all.
        top_p: in (0, 1]; 1 keeps all.
        min_p: in [0, 1); 0 keeps all.

    Returns:
        (B, V) float32 probabilities, each row summing to 1; filtered tokens are exactly 0.
    """
    V = logits.size(-1)
    rows = lambda x: x.tolist() if isinstance(x, torch.Tensor) else list(x) if isinstance(x, (list, tuple)) else [x]
    col = lambda xs, dtype: torch.tensor(xs, dtype=dtype, device=logits.device).view(-1, 1)  # (B or 1, 1)
    temps, ks, ps, ms = rows(temperature), rows(top_k), rows(top_p), rows(min_p)
    logits = logits.float() / (temps[0] if len(temps) == 1 else col(temps, torch.float32))
    use_k, use_p, use_m = any(0 < k < V for k in ks), any(p < 1.0 for p in ps), any(m > 0.0 for m in ms)
    if use_k or use_p or use_m:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        remove = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if use_k:
            rank = torch.arange(V, device=logits.device).view(1, V)
            remove |= rank >= col([k if k > 0 else V for k in ks], torch.long)
        probs = F.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        if use_p:  # drop a token once the mass before it already reaches top_p
            remove |= (probs.cumsum(dim=-1) - probs) >= col(ps, torch.float32)
        if use_m:
            remove |= probs < col(ms, torch.float32) * probs[:, :1]
        remove[:, 0] = False  # the most likely token always survives
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return F.softmax(logits, dim=-1)


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


def sample_next_token(logits: torch.Tensor, rng: torch.Generator | None = None, temperature: float = 1.0,
                      top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0) -> torch.Tensor:
    """Pick the next token of each row from its logits. A pure function of its arguments.

    Greedy (argmax) at temperature 0; else one uniform number per row from ``rng`` and
    :func:`sample_from_probs` over :func:`sampling_probs`.

    Args:
        logits: (B, V) float.
        rng: the ``torch.Generator`` to sample with (None: torch's global one).
        temperature: 0 means argmax (greedy).
        top_k, top_p, min_p: see :func:`sampling_probs`.

    Returns:
        (B,) int64 token ids.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, temperature, top_k, top_p, min_p)
    return sample_from_probs(probs, torch.rand(logits.size(0), generator=rng, device=logits.device))


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


class Engine:
    """Batched, KV-cached generation over token ids for one model.

    Decode steps run the model eagerly on a :class:`KVCache`, or, with ``compile``, through one
    ``torch.compile``d step over a :class:`StaticKVCache` (prefill stays eager): the compiled
    graph replaces a few hundred Python-dispatched tensor ops per token with one call, about 3x
    the tokens/s at batch 1 on a small model on CPU (``bench/bench_decode.py``), for a one-time
    compile of 5-20 s (cached by inductor across runs). Worth it for long generations and servers.

    Args:
        model: a :class:`GPT` in eval mode (the engine calls ``model.eval()``).
        compile: compile the decode step (first used at the first generation).
    """

    def __init__(self, model: GPT, compile: bool = False):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.compile = compile
        self._compiled_step = None
        self._compiled_ok = False  # a compiled step has run: later errors are real errors

    def _decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step: (B, 1) ids -> (B, V) logits at each row's position; advances the cache.

        If compiling fails (no C++ compiler, an unsupported op), says so once on stderr and
        decodes eagerly from then on: the failure comes before the step runs, so the cache is intact.
        """
        if self.compile:
            if self._compiled_step is None:
                def step(idx, k, v, pos):  # tensors only: a fresh cache object each call needs no new guard
                    return self.model(idx, kv_cache=StaticKVCache(k, v, pos))[0][:, -1, :]

                self._compiled_step = compile_fn(step, self.device.type, fullgraph=True)
            pos = torch.tensor(cache.lengths, device=self.device)  # (B,), advanced in place by the step
            try:
                logits = self._compiled_step(idx, cache.k, cache.v, pos)
            except Exception as e:  # noqa: BLE001 - compile errors come in many types
                if self._compiled_ok:
                    raise
                print(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                      f"decoding without compile", file=sys.stderr)
                self.compile = False
            else:
                self._compiled_ok = True
                cache.advance(1)
                return logits
        return self.model(idx, kv_cache=cache)[0][:, -1, :]

    @torch.no_grad()
    def generate(self, prompt: Sequence[int], num_samples: int = 1, max_new_tokens: int = 100,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int | None = None,
                 stop_ids: Sequence[int] = ()) -> Iterator[list[int | None]]:
        """Stream generated tokens, one step at a time, for ``num_samples`` rows of one prompt.

        The prompt is prefilled once into a KV cache; each step decodes one token per row. When a
        row reaches ``block_size`` the window slides: the last ``block_size // 2`` tokens are
        prefilled into a fresh cache (an approximation of the naive path, which re-reads the
        full last ``block_size`` tokens at every step).

        Args:
            prompt: token ids, 1 <= len <= block_size.
            num_samples: rows generated together.
            max_new_tokens: steps to run at most.
            temperature, top_k, top_p, min_p: see :func:`sample_next_token`.
            repetition_penalty: see :func:`apply_repetition_penalty`.
            seed: seeds the sampling ``torch.Generator`` (None: nondeterministic).
            stop_ids: token ids that end a row (the stop token is still yielded once).

        Yields:
            A list of ``num_samples`` entries per step: the new token id of each row, or None for
            a row that has already stopped. Ends when every row stopped or after max_new_tokens.

        Raises:
            BarkError: an empty prompt or one longer than ``block_size``.
        """
        block_size = self.model.config.block_size
        if len(prompt) == 0:
            raise BarkError("the prompt is empty; give at least one token (e.g. start from <EOS>)")
        if len(prompt) > block_size:
            raise BarkError(f"the prompt has {len(prompt)} tokens but the model's block_size is {block_size}; shorten it or use --truncate")
        rng = torch.Generator(device=self.device)
        rng.manual_seed(seed) if seed is not None else rng.seed()
        stop = set(stop_ids)
        history = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=self.device)  # (B, T)
        cache = KVCache.for_model(self.model, 1)
        logits, _ = self.model(history[:1], kv_cache=cache)  # prefill the prompt once...
        cache = cache.expand(num_samples)  # ...and share it with every row
        logits = logits[:, -1, :].expand(num_samples, -1)  # (B, V)
        done = [False] * num_samples
        for _ in range(max_new_tokens):
            logits = apply_repetition_penalty(logits, history, repetition_penalty)
            nxt = sample_next_token(logits, rng, temperature, top_k, top_p, min_p)  # (B,)
            ids = nxt.tolist()
            out = []
            for b, t in enumerate(ids):
                out.append(None if done[b] else t)
                done[b] = done[b] or t in stop
            yield out
            if all(done):
                return
            history = torch.cat((history, nxt.unsqueeze(1)), dim=1)
            if cache.get_pos() >= block_size:  # slide the window: re-prefill the recent half
                cache = KVCache.for_model(self.model, num_samples)
                logits = self.model(history[:, -(block_size // 2):], kv_cache=cache)[0][:, -1, :]
            else:
                logits = self._decode(nxt.unsqueeze(1), cache)
