"""The GPT in NumPy: :class:`barkgpt.model.GPT`'s two families over :mod:`barkgpt.numpy.layers`.

- ``llama``: RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases (unless ``bias``);
- ``gpt2``: learned positions, LayerNorm, GELU (tanh form), biases.

Parameters live in one flat float32 buffer (``GPT.flat``), each tensor a view into it under the
torch model's state-dict name (``GPT.params``); gradients likewise (``GPT.grads``, ``GPT.flat_grad``),
so AdamW and gradient clipping are a few whole-buffer operations. A tied ``lm_head`` is
``transformer.wte.weight`` itself, stored once, as the torch checkpoint stores it. Mixture-of-Experts
is refused. Checkpoints are the torch backend's: ``model.safetensors`` with the same names.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig
from barkgpt.numpy.layers import MLP, CausalSelfAttention, Dropout, Embedding, Linear, cross_entropy, norm_layer, rope_tables


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the torch model's state-dict order (a tied
    ``lm_head.weight`` left out: it is ``transformer.wte.weight``)."""
    C, hs, bias = config.n_embd, config.head_dim, config.bias
    hidden = config.intermediate_size * (2 if config.family == "llama" else 1)
    norm_bias = config.family == "gpt2" and bias

    def linear(name, n_out, n_in):
        return {f"{name}.weight": (n_out, n_in), **({f"{name}.bias": (n_out,)} if bias else {})}

    def norm(name):
        return {f"{name}.weight": (C,), **({f"{name}.bias": (C,)} if norm_bias else {})}

    shapes = {"transformer.wte.weight": (config.vocab_size, C)}
    for i in range(config.n_layer):
        h = f"transformer.h.{i}"
        shapes |= norm(f"{h}.ln_1") | linear(f"{h}.attn.c_attn", (config.n_head + 2 * config.n_kv_head) * hs, C)
        shapes |= linear(f"{h}.attn.c_proj", C, C) | norm(f"{h}.ln_2")
        shapes |= linear(f"{h}.mlp.c_fc", hidden, C) | linear(f"{h}.mlp.c_proj", C, config.intermediate_size)
    shapes |= norm("transformer.ln_f")
    if config.family == "gpt2":
        shapes["transformer.wpe.weight"] = (config.block_size, C)
    if not config.tie_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, C)
    return shapes


def flat_views(shapes: dict[str, tuple[int, ...]], flat: np.ndarray) -> dict[str, np.ndarray]:
    """Name -> a view of ``flat`` with that shape, the tensors back to back in ``shapes``' order."""
    out, offset = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[offset : offset + n].reshape(shape)
        offset += n
    return out


class Block:
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; (B, T, C)."""

    def __init__(self, params: dict, grads: dict, config: GPTConfig, i: int):
        h = f"transformer.h.{i}"
        self.ln_1, self.ln_2 = norm_layer(params, grads, f"{h}.ln_1", config), norm_layer(params, grads, f"{h}.ln_2", config)
        self.attn = CausalSelfAttention(params, grads, f"{h}.attn", config, i)
        self.mlp = MLP(params, grads, f"{h}.mlp", config)

    def forward(self, x, rope=None, bias=None, kv_cache=None, rng=None) -> np.ndarray:
        """(B, T, C) -> (B, T, C); the other arguments pass to the attention."""
        x = x + self.attn.forward(self.ln_1.forward(x), rope, bias, kv_cache, rng)
        return x + self.mlp.forward(self.ln_2.forward(x), rng)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(B, T, C) -> (B, T, C). Each residual ``x + f(x)`` passes ``dy`` through and adds ``f``'s backward."""
        dy = dy + self.ln_2.backward(self.mlp.backward(dy))
        return dy + self.ln_1.backward(self.attn.backward(dy))


class GPT:
    """The language model in NumPy: token ids (B, T) -> logits (B, T, vocab_size).

    Args:
        config: the shape (``vocab_size`` set; ``n_expert`` 0).
        seed: initialise the weights from ``np.random.default_rng(seed)`` (see :meth:`init_weights`).
        dtype: float32, or float64 (the gradient check).

    Raises:
        BarkError: a Mixture-of-Experts config, or no ``vocab_size``.
    """

    def __init__(self, config: GPTConfig, seed: int = 0, dtype=np.float32):
        if config.n_expert:
            raise BarkError("the numpy backend has no Mixture-of-Experts (n_expert > 0); train it with --backend torch")
        if config.vocab_size is None:
            raise BarkError("vocab_size is not set; take it from the tokenizer before building the model")
        self.config, self.dtype = config, np.dtype(dtype)
        self.shapes = param_shapes(config)
        n = sum(math.prod(s) for s in self.shapes.values())
        self.flat, self.flat_grad = np.zeros(n, dtype=self.dtype), np.zeros(n, dtype=self.dtype)
        self.params, self.grads = flat_views(self.shapes, self.flat), flat_views(self.shapes, self.flat_grad)
        p, g = self.params, self.grads
        self.wte = Embedding(p, g, "transformer.wte")
        self.wpe = Embedding(p, g, "transformer.wpe") if config.family == "gpt2" else None
        self.drop = Dropout(config.dropout)
        self.blocks = [Block(p, g, config, i) for i in range(config.n_layer)]
        self.ln_f = norm_layer(p, g, "transformer.ln_f", config)
        self.lm_head = Linear(p, g, "transformer.wte" if config.tie_embeddings else "lm_head", bias=False)
        if config.family == "llama":
            self.rope_cos, self.rope_sin = (
                t.astype(self.dtype) for t in rope_tables(config.block_size, config.head_dim, config.rope_theta)
            )
        self.init_weights(seed)

    def init_weights(self, seed: int) -> None:
        """Initialise every parameter (GPT-2 scheme, as :meth:`barkgpt.model.GPT.init_weights`).

        | tensor                                  | init                                  |
        |-----------------------------------------|---------------------------------------|
        | ``wte``, ``wpe``, untied ``lm_head``    | normal(0, 0.02)                       |
        | ``c_attn``, ``c_fc`` weights            | normal(0, 0.02)                       |
        | ``attn.c_proj``, ``mlp.c_proj`` weights | normal(0, 0.02 / sqrt(2 * n_layer))   |
        | all biases                              | zeros                                 |
        | norm weights (and LayerNorm biases)     | ones (zeros)                          |

        The draws come from NumPy's generator, so the values differ from torch's for the same
        seed; the distributions are the same.
        """
        rng = np.random.default_rng(seed)
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.params.items():
            if p.ndim >= 2:
                p[...] = rng.standard_normal(p.shape, dtype=np.float32) * (std_resid if name.endswith("c_proj.weight") else 0.02)
            else:
                p[...] = 0.0 if name.endswith("bias") else 1.0

    def num_params(self) -> int:
        """Parameter count (a tied head counted once)."""
        return self.flat.size

    def flops_per_token(self) -> int:
        """Training FLOPs per token, as :meth:`barkgpt.model.GPT.flops_per_token` (PaLM, appendix B)."""
        c = self.config
        n = self.num_params() - (self.params["transformer.wpe.weight"].size if self.wpe is not None else 0)
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None, kv_cache=None, segments=None, rng=None):
        """Run the model.

        Args:
            idx: (B, T) int token ids; T <= block_size (without a cache).
            targets: (B, T) int next-token ids, or None; ``-1`` entries are ignored.
            kv_cache: a :class:`barkgpt.numpy.generate.KVCache` for decoding, or None.
            segments: (B, T) segment ids of packed rows (chat data): attention and positions
                restart at each segment, as ``train.SegmentMask``; or None.
            rng: the dropout generator (training), or None.

        Returns:
            ``(logits, loss)``: logits (B, T, vocab_size) with ``targets`` or a cache, else
            (B, 1, vocab_size) for the last position; the mean cross-entropy, or None. With
            ``targets``, :meth:`backward` then fills ``grads``.
        """
        B, T = idx.shape
        pos = kv_cache.pos if kv_cache is not None else 0
        assert pos + T <= self.config.block_size, f"positions up to {pos + T} exceed block_size {self.config.block_size}"
        positions, bias = np.arange(pos, pos + T), None
        if segments is not None:
            positions, bias = segment_positions_and_bias(segments, self.dtype)
        x = self.wte.forward(idx)  # (B, T, C)
        rope = None
        if self.wpe is not None:
            x = x + self.wpe.forward(positions)
        else:
            shape = (T, 1, -1) if positions.ndim == 1 else (B, T, 1, -1)  # (T, 1, hs) or (B, T, 1, hs)
            rope = (self.rope_cos[positions].reshape(shape), self.rope_sin[positions].reshape(shape))
        x = self.drop.forward(x, rng)
        for block in self.blocks:
            x = block.forward(x, rope, bias, kv_cache, rng)
        if kv_cache is not None:
            kv_cache.advance(T)
        if targets is None and kv_cache is None:
            x = x[:, -1:, :]  # inference without a cache only needs the last position
        logits = self.lm_head.forward(self.ln_f.forward(x))
        if targets is None:
            return logits, None
        loss, self.dlogits, self.nll = cross_entropy(logits, targets)
        return logits, loss

    def backward(self) -> None:
        """Add dL/dparam of the last :meth:`forward` with targets into ``grads`` (they accumulate:
        call :meth:`zero_grad` between steps). The chain runs the forward in reverse: head, final
        norm, blocks last to first, position and token embeddings."""
        dx = self.ln_f.backward(self.lm_head.backward(self.dlogits))
        for block in reversed(self.blocks):
            dx = block.backward(dx)
        dx = self.drop.backward(dx)
        if self.wpe is not None:
            self.wpe.backward(dx)
        self.wte.backward(dx)

    def zero_grad(self) -> None:
        """Set every gradient to 0."""
        self.flat_grad.fill(0.0)

    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> float32 array, the torch model's names (a tied ``lm_head.weight`` left out)."""
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.params.items()}

    def load_state_dict(self, state: dict[str, np.ndarray], where: str = "the weights") -> None:
        """Copy ``state`` (torch's names; a tied ``lm_head.weight`` may be there or not) in.

        Raises:
            BarkError: a missing or unexpected tensor, or one of another shape.
        """
        state = dict(state)
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        bad = sorted(set(self.shapes) ^ set(state))
        if bad:
            raise BarkError(
                f"{where} do not match the config ({len(bad)} tensors differ, e.g. {bad[0]}); the checkpoint is inconsistent"
            )
        for name, shape in self.shapes.items():
            if tuple(state[name].shape) != shape:
                raise BarkError(
                    f"{where}: {name} is {tuple(state[name].shape)} but the config's model needs {shape}; fix config.json"
                )
            self.params[name][...] = state[name]


def segment_positions_and_bias(segments: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Positions (B, T) counted from each segment's start and the additive attention mask
    (B, 1, 1, T, T): causal within a segment, -inf across (as ``train.SegmentMask``; packing
    without cross-contamination, Krell et al. 2021)."""
    B, T = segments.shape
    t = np.arange(T)
    starts = np.ones((B, T), dtype=bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    first = np.maximum.accumulate(np.where(starts, t, 0), axis=1)  # (B, T) index of each segment's first token
    allowed = (segments[:, :, None] == segments[:, None, :]) & (t[None, :] <= t[:, None])  # (B, T, T)
    return t - first, np.where(allowed, 0.0, -np.inf).astype(dtype)[:, None, None]


def load_weights(ckpt: Path, dtype=np.float32) -> GPT:
    """A :class:`GPT` with the weights of checkpoint folder ``ckpt`` (``config.json`` + ``model.safetensors``).

    Raises:
        BarkError: a corrupt config or weights file, or weights that do not match the config.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from barkgpt.checkpoint import WEIGHTS_NAME, read_checkpoint_config

    config = GPTConfig(**read_checkpoint_config(ckpt)["model"])
    try:
        state = load_file(str(Path(ckpt) / WEIGHTS_NAME))
    except (SafetensorError, OSError, ValueError) as e:
        raise BarkError(
            f"{Path(ckpt) / WEIGHTS_NAME} is corrupt or truncated ({str(e).splitlines()[0][:80]}); use another checkpoint"
        ) from None
    model = GPT(config, dtype=dtype)
    model.load_state_dict(state, str(Path(ckpt) / WEIGHTS_NAME))
    return model


def replace_vocab(model: GPT, vocab_size: int) -> GPT:
    """A copy of ``model`` with ``vocab_size`` token rows, new ones at the mean of the old (as
    ``train.resize_vocab``; Hewitt 2021), for fine-tuning that adds chat tokens."""
    old = model.config.vocab_size
    if vocab_size < old:
        raise BarkError(f"cannot shrink the vocabulary from {old} to {vocab_size} tokens")
    bigger = GPT(dataclasses.replace(model.config, vocab_size=vocab_size), dtype=model.dtype)
    state = model.state_dict()
    for name in ("transformer.wte.weight", "lm_head.weight"):
        if name in state:
            w = state[name]
            state[name] = np.concatenate([w, np.repeat(w.mean(axis=0, keepdims=True), vocab_size - old, axis=0)])
    bigger.load_state_dict(state)
    return bigger
