"""The GPT model: a decoder-only transformer in two families whose weights map 1:1 onto
Hugging Face's classes.

- ``llama``: rotary position embeddings in HF's rotate-half layout (RoFormer, Su et al. 2021),
  RMSNorm (Zhang & Sennrich 2019), SwiGLU MLP (Shazeer 2020), grouped-query attention
  (Ainslie et al. 2023), no biases; like ``LlamaForCausalLM``.
- ``gpt2``: learned positions, LayerNorm, GELU MLP, biases; like ``GPT2LMHeadModel``
  (Radford et al. 2019, and nanoGPT's ``model.py``).

Notable choices: causal attention through ``F.scaled_dot_product_attention``, or, for short
contexts on CPU once :func:`barkgpt.cpu_attention.load` ran, through a small C++ kernel; the query, key
and value projections fused in one ``c_attn`` matmul (and SwiGLU's gate and up projections in
one ``c_fc``), which at small widths saves most of a step's kernel-launch overhead; one
``forward(idx, targets, kv_cache)`` path for training and cached decoding, where each batch row
keeps its own position so rows of different lengths decode together (the server's continuous
batching). ``GPT.generate`` is the naive full-recompute reference the fast engine is tested
against.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from barkgpt import cpu_attention
from barkgpt.config import GPTConfig


def rope_cache(length: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin tables for rotary embeddings, each (length, head_dim), fp32.

    Frequencies ``theta ** (-2i / head_dim)`` repeated over both halves, as HF's
    ``LlamaRotaryEmbedding`` builds them (RoFormer, Su et al. 2021). The sin table carries the
    sign of HF's ``rotate_half`` (-sin on the first half) so :func:`apply_rope` needs no negation.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (length, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (length, head_dim)
    sin = emb.sin()
    return emb.cos(), torch.cat((-sin[:, : head_dim // 2], sin[:, head_dim // 2 :]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (..., T, n, hs) by position: HF Llama's ``x * cos + rotate_half(x) * sin``.

    ``rotate_half(x) * sin`` equals ``roll(x, hs/2) * sin_signed``: rolling swaps the halves
    (a, b) -> (b, a) and the signed table supplies rotate_half's minus; three ops instead of six.
    """
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin_signed)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional grouped-query heads and RoPE.

    Input and output ``x`` are (B, T, C). With a ``kv_cache`` the new keys and values are
    written at each row's own position and attention covers everything cached so far. Without
    a cache or mask, where :func:`barkgpt.cpu_attention.usable` says so (CPU, float32, short
    contexts, after ``cpu_attention.load()``), the C++ kernel computes the same attention from
    the (B, T, heads, hs) views of the projection, without transposing them.
    """

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.rope = config.family == "llama"
        # one matmul for q, k and v: (n_head + 2 * n_kv_head) heads of head_dim
        self.c_attn = nn.Linear(config.n_embd, (config.n_head + 2 * config.n_kv_head) * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.attention_dropout_p  # on the attention weights (GPT-2's attn_pdrop)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos_sin=None, kv_cache=None, attn_mask=None):
        """(B, T, C) -> (B, T, C). ``cos_sin``: RoPE tables (T, 1, hs) or (B, T, 1, hs) (llama);
        ``kv_cache``: see :class:`barkgpt.engine.KVCache`; ``attn_mask``: (B, 1, T, L) bool or None."""
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, self.n_head + 2 * self.n_kv_head, self.head_dim)  # (B, T, nh+2nkv, hs)
        qk, v = qkv.split([self.n_head + self.n_kv_head, self.n_kv_head], dim=2)
        if self.rope:  # rotate q and k together in one pass
            qk = apply_rope(qk, *cos_sin)  # tables (T, 1, hs) or (B, T, 1, hs)
        q, k = qk.split([self.n_head, self.n_kv_head], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        if kv_cache is None and attn_mask is None and cpu_attention.usable(q, dropout_p):  # short contexts on CPU
            return self.resid_dropout(self.c_proj(cpu_attention.causal_attention(q, k, v).view(B, T, C)))
        if getattr(kv_cache, "decode_kernel", False):  # a compiled decode step on CPU: the cache is read, not copied
            k, v = kv_cache.record(self.layer_idx, k, v)  # (B, J, nkv, hs): the new entries not yet in the cache
            y = cpu_attention.decode_attention(q, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx], k, v, kv_cache.pos)
            return self.resid_dropout(self.c_proj(y.view(B, T, C)))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nh, T, hs), (B, nkv, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nkv, L, hs): all cached positions
        gqa = self.n_kv_head != self.n_head  # each kv head serves n_head/n_kv_head query heads
        if attn_mask is None:  # training, or a cache whose rows all start at 0 (or one new token)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=T > 1, enable_gqa=gqa)
        else:  # rows at different positions: an explicit (B, 1, T, L) mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs): re-assemble the heads
        return self.resid_dropout(self.c_proj(y))


GELU_TANH_SCALE = 2.0 * math.sqrt(2.0 / math.pi)  # gelu_new's tanh(sqrt(2/pi) u), as a sigmoid of twice that


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's ``gelu_new``, the tanh approximation of GELU (Hendrycks & Gimpel 2016):
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, any shape.

    Eagerly it is ``F.gelu(approximate="tanh")`` (one fused kernel). Under ``torch.compile`` it is
    the same function written as ``x * sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`` (since
    ``(1 + tanh(u)) / 2 = sigmoid(2u)``): inductor's C++ backend vectorizes ``exp`` but calls
    ``tanh`` per element, so the sigmoid form's forward and backward take about half the time
    (0.84 against 1.68 ms for a (12, 64, 512) tensor on 2 cores, ``bench/bench_gelu.py``); the
    two agree to float rounding (values within 5e-7, gradients within 2e-6 there).
    """
    if torch.compiler.is_compiling():
        return x * torch.sigmoid(GELU_TANH_SCALE * (x + 0.044715 * x * x * x))
    return F.gelu(x, approximate="tanh")


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (gpt2) or SwiGLU (llama), (B, T, C) -> (B, T, C).

    For SwiGLU, ``c_fc`` holds the gate and up projections stacked ([gate; up]) so one matmul
    computes both; the exporters split it into HF's ``gate_proj``/``up_proj``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.family == "llama"
        hidden = config.intermediate_size * (2 if self.gated else 1)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(config.intermediate_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        """(B, T, C) -> (B, T, C)."""
        h = self.c_fc(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up  # SwiGLU (Shazeer 2020)
        else:
            h = gelu_tanh(h)  # GPT-2's gelu_new
        return self.dropout(self.c_proj(h))


class MoE(nn.Module):
    """Sparse Mixture-of-Experts feed-forward: ``n_expert`` SwiGLU experts, each token sent to
    its top ``n_expert_per_token`` and the outputs mixed with softmax weights over the chosen ones
    (Mixtral's routing; Jiang et al. 2024, "Mixtral of Experts"). (B, T, C) -> (B, T, C).

    Expert weights are stacked: ``c_fc`` (n_expert, 2 * intermediate_size, C) holds each
    expert's [gate; up] and ``c_proj`` (n_expert, C, intermediate_size) its down projection; the
    exporters split them into Mixtral's ``w1``/``w3``/``w2``.

    After each forward in training mode, ``expert_tokens`` (n_expert,) counts the token
    assignments per expert and ``aux_loss`` holds the Switch Transformer load-balancing loss (Fedus et al.
    2021), in the form of HF's ``load_balancing_loss_func``: n_expert * sum over experts of
    (share of assignments) * (mean router probability), summed over the k slots; it is
    ``n_expert_per_token`` when perfectly balanced and grows as routing collapses.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        E, I, C = config.n_expert, config.intermediate_size, config.n_embd  # noqa: E741 - the paper's letters: experts, width, channels
        self.n_expert, self.top_k = E, config.n_expert_per_token
        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, 2 * I, C))
        self.c_proj = nn.Parameter(torch.empty(E, C, I))
        self.dropout = nn.Dropout(config.dropout)
        self.aux_loss: torch.Tensor | None = None
        self.expert_tokens: torch.Tensor | None = None

    def forward(self, x):
        """(B, T, C) -> (B, T, C)."""
        B, T, C = x.size()
        xf = x.reshape(-1, C)  # (N, C)
        probs = self.router(xf).float().softmax(dim=-1)  # (N, E)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(xf)
        for e in range(self.n_expert):
            token, slot = (chosen == e).nonzero(as_tuple=True)  # which tokens chose expert e, and in which slot
            if token.numel() == 0:
                continue
            gate, up = (xf[token] @ self.c_fc[e].t()).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.c_proj[e].t()
            out.index_add_(0, token, y * weights[token, slot, None])
        if self.training:  # (not while generating: one op less per decode step)
            self.expert_tokens = torch.bincount(chosen.flatten(), minlength=self.n_expert).detach()
            share = F.one_hot(chosen, self.n_expert).float().mean(dim=0)  # (k, E): share of tokens per slot
            self.aux_loss = self.n_expert * (share * probs.mean(dim=0)).sum()
        return self.dropout(out.view(B, T, C))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``; (B, T, C)."""

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        norm = nn.RMSNorm if config.family == "llama" else nn.LayerNorm
        kw = {} if config.family == "llama" else {"bias": config.bias}
        self.ln_1 = norm(config.n_embd, eps=config.norm_eps, **kw)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = norm(config.n_embd, eps=config.norm_eps, **kw)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, cos_sin=None, kv_cache=None, attn_mask=None):
        """(B, T, C) -> (B, T, C); the other arguments pass to :class:`CausalSelfAttention`."""
        x = x + self.attn(self.ln_1(x), cos_sin, kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """The language model: token ids (B, T) -> logits (B, T, vocab_size).

    State-dict names are nanoGPT's: ``transformer.wte``, ``transformer.wpe`` (gpt2),
    ``transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}``,
    ``transformer.ln_f``, ``lm_head``.
    """

    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.vocab_size is not None, "resolve vocab_size from the tokenizer before building the model"
        self.config = config
        norm = nn.RMSNorm if config.family == "llama" else nn.LayerNorm
        kw = {} if config.family == "llama" else {"bias": config.bias}
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=norm(config.n_embd, eps=config.norm_eps, **kw),
            )
        )
        if config.family == "gpt2":
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        if config.family == "llama":
            cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None):
        """Initialise every parameter (GPT-2 scheme, as nanoGPT).

        | tensor                                  | init                                  |
        |-----------------------------------------|---------------------------------------|
        | ``wte``, ``wpe``, untied ``lm_head``    | normal(0, 0.02)                       |
        | ``c_attn``, ``c_fc`` weights            | normal(0, 0.02)                       |
        | ``attn.c_proj``, ``mlp.c_proj`` weights | normal(0, 0.02 / sqrt(2 * n_layer)): residual scaling, GPT-2 paper |
        | MoE ``router``, expert ``c_fc``         | normal(0, 0.02)                       |
        | MoE expert ``c_proj``                   | normal(0, 0.02 / sqrt(2 * n_layer))   |
        | all biases                              | zeros                                 |
        | norm weights (and LayerNorm biases)     | ones (zeros)                          |

        Args:
            seed: if given, draw from a fresh ``torch.Generator`` seeded with it.
        """
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = std_resid if name.endswith(("c_proj.weight", "mlp.c_proj")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()
            else:  # norm scales
                p.fill_(1.0)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out positional (and untied token) embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def decode_kernel(self) -> bool:
        """True when a compiled decode step can attend through the C++ decode kernel
        (:func:`barkgpt.cpu_attention.decode_attention`): float32 weights on the CPU, a head size it
        covers, and :func:`barkgpt.cpu_attention.load` succeeded (built once per machine, ~15 s;
        ``BARKGPT_CPU_ATTENTION=0`` turns it off)."""
        p = next(self.parameters())
        if p.device.type != "cpu" or p.dtype != torch.float32 or self.config.head_dim not in cpu_attention.DECODE_HEAD_SIZES:
            return False
        return cpu_attention.load(quiet=True)

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6 * N (matmul params) + 12 * n_layer * n_embd * block_size
        for attention (PaLM paper, appendix B; nanoGPT's ``estimate_mfu``)."""
        c = self.config
        n = self.num_params(non_embedding=True)
        if c.n_expert:  # only the chosen experts' weights touch a token
            n -= c.n_layer * (c.n_expert - c.n_expert_per_token) * 3 * c.intermediate_size * c.n_embd
        return 6 * n + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None, kv_cache=None):
        """Run the model.

        Args:
            idx: (B, T) int64 token ids; T <= block_size (without a cache).
            targets: (B, T) int64 next-token ids, or None; ``-1`` entries are ignored.
            kv_cache: a :class:`barkgpt.engine.KVCache` (or anything with ``positions(T)``,
                ``update(layer, k, v)``, ``attn_mask(T)`` and ``advance(T)``), or None.

        Returns:
            ``(logits, loss)``: logits (B, T, vocab_size) fp32 (only the last position,
            (B, 1, vocab_size), when ``targets`` is None and no cache is given), and the mean
            cross-entropy over non-ignored targets, or None. A Mixture-of-Experts model in training
            mode adds ``router_aux_loss_coef`` times its layers' mean load-balancing loss.
        """
        B, T = idx.size()
        x = self.transformer.wte(idx)  # (B, T, C)
        # positions: an int start shared by all rows (training, most decoding), or (B, T) per row
        pos = kv_cache.positions(T) if kv_cache is not None else 0
        shared = isinstance(pos, int)
        assert not shared or pos + T <= self.config.block_size, (
            f"positions up to {pos + T} exceed block_size {self.config.block_size}"
        )
        cos_sin, attn_mask = None, None
        if self.config.family == "llama":
            if shared:
                cos_sin = (self.rope_cos[pos : pos + T].unsqueeze(1), self.rope_sin[pos : pos + T].unsqueeze(1))  # (T, 1, hs)
            else:
                cos_sin = (self.rope_cos[pos].unsqueeze(2), self.rope_sin[pos].unsqueeze(2))  # (B, T, 1, hs)
        else:
            x = x + self.transformer.wpe(torch.arange(pos, pos + T, device=idx.device) if shared else pos)
        if kv_cache is not None:
            attn_mask = kv_cache.attn_mask(T)  # (B, 1, T, L) bool: causal per row
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache, attn_mask)
        if kv_cache is not None:
            kv_cache.advance(T)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)  # (B, T, vocab_size)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            if self.config.n_expert and self.training:  # load balancing (Switch Transformer)
                loss = (
                    loss
                    + self.config.router_aux_loss_coef * sum(b.mlp.aux_loss for b in self.transformer.h) / self.config.n_layer
                )
            return logits, loss
        if kv_cache is None:
            x = x[:, [-1], :]  # inference without a cache only needs the last position
        return self.lm_head(x).float(), None

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0, generator=None):
        """Naive generation by full recompute: the reference the KV-cache engine is tested against.

        Args:
            idx: (B, T) int64 prompt ids.
            max_new_tokens: tokens to append.
            temperature: 0 is greedy.
            top_k: keep the k most likely tokens (0: all).
            generator: a ``torch.Generator`` for sampling.

        Returns:
            (B, T + max_new_tokens) int64 ids. The context is cropped to the last ``block_size``
            tokens at each step.
        """
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.config.block_size :])
            logits = logits[:, -1, :]  # (B, vocab_size)
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
        return idx
