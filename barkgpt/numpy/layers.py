"""The layers of the GPT in NumPy, each with a ``forward`` and a hand-written ``backward``.

Every layer keeps what its backward needs from the last ``forward`` (one forward, then one
backward: the training loop's order), reads its weights from a shared ``params`` dict and adds
its weight gradients into the ``grads`` dict of the same names (the torch model's state-dict
names, e.g. ``transformer.h.0.attn.c_attn.weight``). ``backward(dy)`` takes dL/d(output) and
returns dL/d(input). Shapes follow nanoGPT: ``x`` (B, T, C), ``q`` (B, n_head, T, head_dim).

The math is float32 (float64 when the params are: the gradient check), batched ``matmul`` with
no Python loop over tokens or heads. Sources: the layers of :mod:`barkgpt.model` (nanoGPT's
GPT-2, HF's Llama), Karpathy's llm.c ``train_gpt2.c`` for the backward passes' layout, and the
papers cited on each class.
"""

from __future__ import annotations

import math

import numpy as np

GELU_A = math.sqrt(2.0 / math.pi)  # tanh approximation of GELU (Hendrycks & Gimpel 2016), GPT-2's gelu_new


class Linear:
    """``y = x W^T + b``: (..., in) -> (..., out), ``W`` (out, in) as ``nn.Linear``.

    Args:
        params, grads: the shared name -> array dicts.
        name: the module name (``weight`` and ``bias`` are appended).
        bias: whether ``{name}.bias`` exists.
    """

    def __init__(self, params: dict, grads: dict, name: str, bias: bool):
        self.p, self.g = params, grads
        self.w, self.b = f"{name}.weight", f"{name}.bias" if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., in) -> (..., out); one 2-D matmul over all rows."""
        self.x = x
        w = self.p[self.w]
        y = x.reshape(-1, x.shape[-1]) @ w.T  # (N, out)
        if self.b is not None:
            y += self.p[self.b]
        return y.reshape(*x.shape[:-1], w.shape[0])

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(..., out) -> (..., in).

        ``y_nj = sum_i x_ni W_ji + b_j``, so ``dL/dW_ji = sum_n dy_nj x_ni`` (``dy^T x``),
        ``dL/db_j = sum_n dy_nj`` and ``dL/dx_ni = sum_j dy_nj W_ji`` (``dy W``).
        """
        x2, dy2 = self.x.reshape(-1, self.x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        self.g[self.w] += dy2.T @ x2
        if self.b is not None:
            self.g[self.b] += dy2.sum(axis=0)
        return (dy2 @ self.p[self.w]).reshape(self.x.shape)


class Embedding:
    """Row lookup ``y = W[idx]``: token ids (B, T) -> (B, T, C), or positions (T,)/(B, T) -> (T, C)/(B, T, C).

    Args:
        params, grads: the shared dicts; name: the module name (``{name}.weight`` is (rows, C)).
    """

    def __init__(self, params: dict, grads: dict, name: str):
        self.p, self.g, self.w = params, grads, f"{name}.weight"

    def forward(self, idx: np.ndarray) -> np.ndarray:
        """Gather the rows ``idx`` (any int shape) -> ``idx.shape + (C,)``."""
        self.idx = idx
        return self.p[self.w][idx]

    def backward(self, dy: np.ndarray) -> None:
        """``y[n] = W[idx[n]]``, so ``dL/dW[r] = sum over n with idx[n] == r of dy[n]``: a
        scatter-add (``np.add.at``; repeated ids add up). Nothing flows to the integer input."""
        C = dy.shape[-1]
        if self.idx.ndim == 1 and dy.ndim == 3:  # shared positions (T,) broadcast over the batch
            dy = dy.sum(axis=0)
        np.add.at(self.g[self.w], self.idx.reshape(-1), dy.reshape(-1, C))


class LayerNorm:
    """``y = (x - mean) / sqrt(var + eps) * w + b`` over the last axis (Ba et al. 2016), (..., C).

    Args:
        params, grads: the shared dicts; name: the module name; eps: ``norm_eps``; bias: whether
            ``{name}.bias`` exists (``GPTConfig.bias``).
    """

    def __init__(self, params: dict, grads: dict, name: str, eps: float, bias: bool):
        self.p, self.g, self.eps = params, grads, eps
        self.w, self.b = f"{name}.weight", f"{name}.bias" if bias else None

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., C) -> (..., C)."""
        xc = x - x.mean(axis=-1, keepdims=True)
        self.rstd = 1.0 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + self.eps)  # (..., 1)
        self.xhat = xc * self.rstd
        y = self.xhat * self.p[self.w]
        return y + self.p[self.b] if self.b is not None else y

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(..., C) -> (..., C).

        With ``xhat = (x - mu) r``, ``r = (var + eps)^-1/2`` and ``g = dy * w``:
        ``dL/dw = sum dy xhat``, ``dL/db = sum dy``; since ``dmu/dx_i = 1/C`` and
        ``dr/dx_i = -r^3 (x_i - mu) / C``, ``dL/dx = r (g - mean(g) - xhat mean(g xhat))``.
        """
        C = dy.shape[-1]
        self.g[self.w] += (dy * self.xhat).reshape(-1, C).sum(axis=0)
        if self.b is not None:
            self.g[self.b] += dy.reshape(-1, C).sum(axis=0)
        g = dy * self.p[self.w]
        return self.rstd * (g - g.mean(axis=-1, keepdims=True) - self.xhat * (g * self.xhat).mean(axis=-1, keepdims=True))


class RMSNorm:
    """``y = x / sqrt(mean(x^2) + eps) * w`` over the last axis (Zhang & Sennrich 2019), as
    ``nn.RMSNorm``; (..., C).

    Args:
        params, grads: the shared dicts; name: the module name; eps: ``norm_eps``.
    """

    def __init__(self, params: dict, grads: dict, name: str, eps: float):
        self.p, self.g, self.w, self.eps = params, grads, f"{name}.weight", eps

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(..., C) -> (..., C)."""
        self.rstd = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + self.eps)  # (..., 1)
        self.xhat = x * self.rstd
        return self.xhat * self.p[self.w]

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(..., C) -> (..., C).

        With ``xhat = x r``, ``r = (mean(x^2) + eps)^-1/2`` and ``g = dy * w``: ``dL/dw = sum dy xhat``;
        ``dr/dx_i = -r^3 x_i / C``, so ``dL/dx = r g - x r^3 mean(g x) = r (g - xhat mean(g xhat))``.
        """
        C = dy.shape[-1]
        self.g[self.w] += (dy * self.xhat).reshape(-1, C).sum(axis=0)
        g = dy * self.p[self.w]
        return self.rstd * (g - self.xhat * (g * self.xhat).mean(axis=-1, keepdims=True))


def norm_layer(params: dict, grads: dict, name: str, config) -> LayerNorm | RMSNorm:
    """The family's norm: RMSNorm (llama, never a bias) or LayerNorm (gpt2, a bias when ``config.bias``)."""
    if config.family == "llama":
        return RMSNorm(params, grads, name, config.norm_eps)
    return LayerNorm(params, grads, name, config.norm_eps, config.bias)


def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin tables for rotary embeddings (RoFormer, Su et al. 2021), each
    (length, head_dim) float32, exactly as :func:`barkgpt.model.rope_cache` builds them: HF
    Llama's frequencies ``theta ** (-2i / head_dim)`` repeated over both halves, computed in
    float32, and the sin table carrying ``rotate_half``'s minus on its first half."""
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))).astype(
        np.float32
    )
    freqs = np.outer(np.arange(length, dtype=np.float32), inv_freq).astype(np.float32)  # (length, head_dim/2)
    emb = np.concatenate([freqs, freqs], axis=-1)  # (length, head_dim)
    sin = np.sin(emb)
    return np.cos(emb), np.concatenate([-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]], axis=-1)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate ``x`` (B, T, n, hs) by position: HF Llama's ``x cos + rotate_half(x) sin``, written
    ``x cos + roll(x, hs/2) sin_signed`` (tables (T, 1, hs) or (B, T, 1, hs))."""
    return x * cos + np.roll(x, x.shape[-1] // 2, axis=-1) * sin


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """dL/dx of :func:`apply_rope`: ``y = x cos + P x sin`` with ``P`` the half swap (a
    permutation that is its own inverse, so ``P^T = P``), hence ``dL/dx = dy cos + P (dy sin)``."""
    return dy * cos + np.roll(dy * sin, dy.shape[-1] // 2, axis=-1)


class Dropout:
    """Inverted dropout (Srivastava et al. 2014): zero each entry with probability ``p`` and scale
    the rest by ``1 / (1 - p)``; the identity when ``p`` is 0 or no ``rng`` is given (eval)."""

    def __init__(self, p: float):
        self.p, self.mask = p, None

    def forward(self, x: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """x (any shape) -> the same shape."""
        if not self.p or rng is None:
            self.mask = None
            return x
        self.mask = (rng.random(x.shape, dtype=np.float32) >= self.p).astype(x.dtype) / (1.0 - self.p)
        return x * self.mask

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """``y = x m`` with the kept-and-scaled mask ``m``, so ``dL/dx = dy m``."""
        return dy if self.mask is None else dy * self.mask


def causal_bias(T: int, L: int, dtype) -> np.ndarray:
    """(T, L) additive mask: 0 where query ``t`` (at position ``L - T + t``) may see key ``s``
    (``s <= L - T + t``), -inf elsewhere."""
    allowed = np.arange(L)[None, :] <= np.arange(L - T, L)[:, None]
    return np.where(allowed, 0.0, -np.inf).astype(dtype)


class CausalSelfAttention:
    """Multi-head causal self-attention with grouped-query heads (Ainslie et al. 2023) and RoPE
    (llama); (B, T, C) -> (B, T, C). Weights as :class:`barkgpt.model.CausalSelfAttention`:
    one ``c_attn`` (q, k, v heads stacked) and ``c_proj``.

    Query heads are grouped by the key/value head they share, ``q`` (B, n_kv_head, g*T, hs) with
    ``g = n_head / n_kv_head``, so one batched matmul per product serves every head: query head
    ``h`` reads kv head ``h // g``, as ``F.scaled_dot_product_attention(enable_gqa=True)``.
    """

    def __init__(self, params: dict, grads: dict, name: str, config, layer_idx: int):
        self.n_head, self.n_kv_head, self.hs = config.n_head, config.n_kv_head, config.head_dim
        self.layer_idx, self.rope = layer_idx, config.family == "llama"
        self.c_attn = Linear(params, grads, f"{name}.c_attn", config.bias)
        self.c_proj = Linear(params, grads, f"{name}.c_proj", config.bias)
        self.attn_drop, self.resid_drop = Dropout(config.attention_dropout_p), Dropout(config.dropout)

    def forward(self, x, rope=None, bias=None, kv_cache=None, rng=None) -> np.ndarray:
        """(B, T, C) -> (B, T, C).

        Args:
            x: the normed residual stream.
            rope: ``(cos, sin)`` tables (T, 1, hs) or (B, T, 1, hs) (llama), else None.
            bias: additive mask (T, L) or (B, 1, 1, T, L); None: causal over the keys.
            kv_cache: a :class:`barkgpt.numpy.generate.KVCache` (inference), or None.
            rng: the dropout generator (None: no dropout).
        """
        B, T, C = x.shape
        nh, nkv, hs = self.n_head, self.n_kv_head, self.hs
        qkv = self.c_attn.forward(x).reshape(B, T, nh + 2 * nkv, hs)  # (B, T, nh+2nkv, hs)
        qk, v = qkv[:, :, : nh + nkv], qkv[:, :, nh + nkv :]
        if self.rope:  # rotate q and k together
            qk = apply_rope(qk, *rope)
        self.rope_tables = rope
        q = qk[:, :, :nh].transpose(0, 2, 1, 3)  # (B, nh, T, hs)
        k, v = qk[:, :, nh:].transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, L, hs): all cached positions
        L = k.shape[2]
        self.q = np.ascontiguousarray(q).reshape(B, nkv, (nh // nkv) * T, hs)  # (B, nkv, g*T, hs): heads by kv group
        self.k, self.v = k, v
        att = (self.q @ k.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B, nkv, g*T, L)
        att = att.reshape(B, nkv, nh // nkv, T, L) + (causal_bias(T, L, x.dtype) if bias is None else bias)
        att = np.exp(att - att.max(axis=-1, keepdims=True))
        att /= att.sum(axis=-1, keepdims=True)  # softmax over the keys
        self.att = att.reshape(B, nkv, (nh // nkv) * T, L)
        y = self.attn_drop.forward(self.att, rng) @ v  # (B, nkv, g*T, hs)
        y = y.reshape(B, nh, T, hs).transpose(0, 2, 1, 3).reshape(B, T, C)  # re-assemble the heads
        return self.resid_drop.forward(self.c_proj.forward(y), rng)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(B, T, C) -> (B, T, C).

        Per head, ``S = q k^T / sqrt(hs)`` (masked), ``P = softmax(S)``, ``y = P v``. Then
        ``dv = P^T dy``, ``dP = dy v^T``; the softmax Jacobian ``dS_ts = P_ts (dP_ts - sum_s' dP_ts' P_ts')``
        (masked entries have ``P = 0``, so get no gradient); ``dq = dS k / sqrt(hs)`` and
        ``dk = dS^T q / sqrt(hs)``. With the query heads of one kv head stacked along the rows,
        the ``dv`` and ``dk`` products sum over the group by themselves. RoPE's backward
        (:func:`rope_backward`) and ``c_attn``'s follow.
        """
        nh, nkv, hs = self.n_head, self.n_kv_head, self.hs
        B, T, C = dy.shape
        dy = self.c_proj.backward(self.resid_drop.backward(dy))
        dy = np.ascontiguousarray(dy.reshape(B, T, nh, hs).transpose(0, 2, 1, 3)).reshape(B, nkv, (nh // nkv) * T, hs)
        p_used = self.att if self.attn_drop.mask is None else self.att * self.attn_drop.mask
        dv = p_used.transpose(0, 1, 3, 2) @ dy  # (B, nkv, L, hs)
        dp = self.attn_drop.backward(dy @ self.v.transpose(0, 1, 3, 2))  # (B, nkv, g*T, L)
        ds = self.att * (dp - (dp * self.att).sum(axis=-1, keepdims=True)) * (1.0 / math.sqrt(hs))
        dq = (ds @ self.k).reshape(B, nh, T, hs).transpose(0, 2, 1, 3)  # (B, T, nh, hs)
        dk = (ds.transpose(0, 1, 3, 2) @ self.q).transpose(0, 2, 1, 3)  # (B, T, nkv, hs)
        dqk = np.concatenate([dq, dk], axis=2)  # (B, T, nh+nkv, hs)
        if self.rope:
            dqk = rope_backward(dqk, *self.rope_tables)
        dqkv = np.concatenate([dqk, dv.transpose(0, 2, 1, 3)], axis=2)  # (B, T, nh+2nkv, hs)
        return self.c_attn.backward(dqkv.reshape(B, T, -1))


class MLP:
    """Position-wise feed-forward, (B, T, C) -> (B, T, C): GELU (gpt2, tanh form) or SwiGLU
    (llama; Shazeer 2020), ``c_fc`` holding [gate; up] stacked, as :class:`barkgpt.model.MLP`."""

    def __init__(self, params: dict, grads: dict, name: str, config):
        self.gated, self.hidden = config.family == "llama", config.intermediate_size
        self.c_fc = Linear(params, grads, f"{name}.c_fc", config.bias)
        self.c_proj = Linear(params, grads, f"{name}.c_proj", config.bias)
        self.drop = Dropout(config.dropout)

    def forward(self, x: np.ndarray, rng=None) -> np.ndarray:
        """(B, T, C) -> (B, T, C)."""
        h = self.c_fc.forward(x)
        if self.gated:
            gate, up = h[..., : self.hidden], h[..., self.hidden :]
            self.gate, self.up, self.sig = gate, up, 0.5 * (1.0 + np.tanh(0.5 * gate))  # sigmoid, without exp's overflow
            a = gate * self.sig * up  # silu(gate) * up
        else:
            self.h, self.t = h, np.tanh(GELU_A * (h + 0.044715 * h**3))
            a = 0.5 * h * (1.0 + self.t)
        return self.drop.forward(self.c_proj.forward(a), rng)

    def backward(self, dy: np.ndarray) -> np.ndarray:
        """(B, T, C) -> (B, T, C).

        SwiGLU ``a = silu(g) u`` with ``silu(g) = g s``, ``s = sigmoid(g)``: ``da/du = g s`` and
        ``da/dg = u s (1 + g (1 - s))`` (since ``s' = s (1 - s)``). GELU ``a = h (1 + t) / 2``,
        ``t = tanh(A (h + 0.044715 h^3))``: ``da/dh = (1 + t) / 2 + h (1 - t^2) A (1 + 3 * 0.044715 h^2) / 2``.
        """
        da = self.c_proj.backward(self.drop.backward(dy))
        if self.gated:
            s, g = self.sig, self.gate
            dh = np.concatenate([da * self.up * s * (1.0 + g * (1.0 - s)), da * g * s], axis=-1)
        else:
            h, t = self.h, self.t
            dh = da * (0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * GELU_A * (1.0 + 3 * 0.044715 * h * h))
        return self.c_fc.backward(dh)


def cross_entropy(logits: np.ndarray, targets: np.ndarray, ignore_index: int = -1) -> tuple[float, np.ndarray, np.ndarray]:
    """Mean cross-entropy over the targets that are not ``ignore_index``, and its gradient.

    Args:
        logits: (B, T, V) float.
        targets: (B, T) int next-token ids.

    Returns:
        ``(loss, dlogits, nll)``: the mean in nats (NaN when every target is ignored, as
        ``F.cross_entropy``), dL/dlogits (B, T, V), and each target's nll (B, T), 0 where ignored.

    The gradient: ``L = (1/n) sum_valid (logsumexp(z) - z_y)``, so
    ``dL/dz_v = (softmax(z)_v - [v == y]) / n`` on valid rows and 0 on ignored ones.
    """
    B, T, V = logits.shape
    z = logits.reshape(-1, V)
    y = targets.reshape(-1)
    valid = y != ignore_index
    yc = np.where(valid, y, 0)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    s = e.sum(axis=-1, keepdims=True)
    rows = np.arange(len(y))
    nll = (np.log(s[:, 0]) - z[rows, yc]) * valid  # (N,)
    n = int(valid.sum())
    loss = float(nll.sum() / n) if n else float("nan")
    d = e / s
    d[rows, yc] -= 1.0
    d *= (valid / max(n, 1)).astype(d.dtype)[:, None]
    return loss, d.reshape(B, T, V), nll.reshape(B, T)
