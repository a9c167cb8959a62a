"""How big a training run started over HTTP may be: :func:`estimate_run` counts its parameters and
the memory it needs from its config alone, which :class:`~barkgpt.server.runs.TrainingRuns` checks
against ``--max-run-params`` and ``--max-run-memory`` (default :func:`default_memory_limit`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from barkgpt.config import GPTConfig, TrainConfig

DEFAULT_VOCAB = 2048  # the vocabulary a size estimate assumes when the data does not say (barkgpt prepare's bpe default)


def estimate_run(model: GPTConfig, train: TrainConfig, vocab_size: int) -> tuple[int, int]:
    """The parameters and the bytes of memory a training run needs, estimated from its config
    alone (building the model to count would itself allocate what is being checked).

    Parameters: token embeddings (and an untied head), learned positions (gpt2), and per block
    the attention (q, k, v with ``n_kv_head`` heads, output projection), the MLP (GELU: two
    matrices, SwiGLU: three, MoE: three per expert plus the router) and two norms; biases when
    the config has them.

    Memory: 16 bytes a parameter (fp32 weights and gradients, AdamW's two moments), plus one
    micro-batch's activations: 34 bytes per token and channel per layer at 16 bits in
    Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
    (section 4.1, without the attention scores, which SDPA's fused kernels do not keep), so
    68 at fp32; plus the logits, their log-softmax and its gradient (12 bytes per token and
    vocabulary entry) and the RoPE tables.

    Args:
        model: the run's model config (``intermediate_size``, ``n_kv_head`` resolved).
        train: its train config (``batch_size`` is the micro-batch in sequences).
        vocab_size: the vocabulary, in tokens.

    Returns:
        ``(parameters, bytes)``.
    """
    C, L, T, B, V = model.n_embd, model.n_layer, model.block_size, train.batch_size, vocab_size
    kv, inner, bias = model.n_kv_head * model.head_dim, model.intermediate_size, int(bool(model.bias))
    attn = C * C + 2 * C * kv + C * C + bias * (2 * C + 2 * kv)
    if model.n_expert:
        mlp = model.n_expert * 3 * C * inner + C * model.n_expert
    elif model.family == "llama":
        mlp = 3 * C * inner + bias * (2 * inner + C)
    else:
        mlp = 2 * C * inner + bias * (inner + C)
    norm = C * (1 + bias) if model.family == "gpt2" else C
    params = V * C * (1 if model.tie_embeddings else 2) + (T * C if model.family == "gpt2" else 0)
    params += L * (attn + mlp + 2 * norm) + norm
    memory = 16 * params + 68 * L * T * B * C + 12 * B * T * V + (8 * T * model.head_dim if model.family == "llama" else 0)
    return params, memory


def meta_vocab_size(data: str | None) -> int | None:
    """The ``vocab_size`` in a prepared data folder's ``meta.json``, or None (no folder, no file,
    not a positive integer)."""
    if not data:
        return None
    try:
        vocab = json.loads((Path(data) / "meta.json").read_text(encoding="utf-8")).get("vocab_size")
    except (OSError, ValueError, AttributeError):
        return None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab > 0 else None


def default_memory_limit() -> int:
    """Half this machine's RAM in bytes (8 GiB where the OS does not say): the default of
    ``--max-run-memory``."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (AttributeError, ValueError, OSError):
        return 8 << 30
