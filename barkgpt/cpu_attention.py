"""Causal self-attention for short contexts on CPU: a small C++ kernel (``csrc/cpu_attention.cpp``)
that training uses instead of PyTorch's CPU flash attention where it is faster.

At the shakespeare-char shape (B 12, T 64, 4 query heads over 1 key/value head of size 32) one
forward + backward takes ~0.88 ms against flash attention's ~1.19 ms (``bench/bench_attention.py``:
1.2-1.6x at four shapes), and a whole compiled training step is ~7% faster. It covers float32
on a CPU with AVX2 and FMA, head sizes 16 and 32, T up to :data:`MAX_T`, no dropout and no mask beyond the causal one;
everything else goes to ``F.scaled_dot_product_attention``.

:func:`load` builds the kernel once per machine with ``torch.utils.cpp_extension`` (~15 s; cached
in ``~/.cache/torch_extensions``) and registers ``torch.ops.barkgpt.causal_attention`` with its
autograd formula and a fake kernel, so ``torch.compile`` treats it as one opaque op.
``train`` calls :func:`load` before its first step when it compiles the model (``compile: true``,
as the presets for real text do); set ``BARKGPT_CPU_ATTENTION=0`` to keep the stock attention.
Until :func:`load` succeeded, :func:`usable` is False and nothing changes.

The same library holds ``torch.ops.barkgpt.decode_attention`` (:func:`decode_attention`), the
attention of a compiled decode step (``barkgpt.engine``): one query per row over that row's
filled cache slots and its new keys/values, read in place (no copy of the cache, no mask).
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

MAX_T = 256  # the kernel keeps (B, H, T, T) attention weights for the backward: T^2 memory
MAX_WEIGHT_BYTES = 64 << 20  # and at most this much of them per layer (B * H * T * T * 4 bytes)
HEAD_SIZES = (16, 32)  # at 64, flash attention is faster
_SOURCE = Path(__file__).parent / "csrc" / "cpu_attention.cpp"
_lock = threading.Lock()
_state = {"ready": False, "tried": False}


def usable(q: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """True when :func:`causal_attention` can take ``q`` (B, T, H, D): the kernel is loaded, and
    ``q`` is float32 on the CPU with D in :data:`HEAD_SIZES`, 1 < T <= :data:`MAX_T`, attention
    weights of at most :data:`MAX_WEIGHT_BYTES`, and no dropout."""
    B, T, H, D = q.shape
    return (
        _state["ready"]
        and q.device.type == "cpu"
        and q.dtype == torch.float32
        and dropout_p == 0.0
        and D in HEAD_SIZES
        and 1 < T <= MAX_T
        and B * H * T * T * 4 <= MAX_WEIGHT_BYTES
    )


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with scale ``1/sqrt(D)``; differentiable.

    Args:
        q: (B, T, H, D) queries; k, v: (B, T, H_kv, D) keys and values, H a multiple of H_kv
            (query head h uses key/value head h // (H / H_kv), as ``enable_gqa``). Any strides
            with a contiguous last dim (views into a fused qkv projection need no copy).

    Returns:
        (B, T, H, D), contiguous: reshape to (B, T, H * D) for the output projection.

    Raises:
        RuntimeError: the kernel is not loaded (see :func:`usable`) or a shape it does not cover.

    Softmax attention as in Vaswani et al. 2017; the backward is FlashAttention's (Dao et al.
    2022, Algorithm 4) over the kept attention weights.
    """
    return torch.ops.barkgpt.causal_attention(q, k, v, q.size(-1) ** -0.5)[0]


DECODE_HEAD_SIZES = (16, 32, 64)


def decode_usable(q: torch.Tensor) -> bool:
    """True when :func:`decode_attention` can take ``q`` (B, 1, H, D): the kernel is loaded, and
    ``q`` is float32 on the CPU with D in :data:`DECODE_HEAD_SIZES`."""
    return _state["ready"] and q.device.type == "cpu" and q.dtype == torch.float32 and q.size(-1) in DECODE_HEAD_SIZES


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """Attention of one new token per row over its cached keys/values and the new ones, with scale
    ``1/sqrt(D)``, reading the cache without copying or writing it (inference only: no autograd).

    Args:
        q: (B, 1, H, D) the new queries.
        k_cache, v_cache: (B, H_kv, L, D) cached keys/values; row b's first ``pos[b]`` slots count.
        k_new, v_new: (B, J, H_kv, D) each row's J >= 1 keys/values not yet in the cache, the
            query's own last (J > 1 when one compiled call decodes several tokens); the caller
            stores them.
        pos: (B,) int64, each in [0, L].
        All with a contiguous last dim, any other strides (slices of a larger cache need no copy).

    Returns:
        (B, 1, H, D), contiguous.

    Raises:
        RuntimeError: the kernel is not loaded (see :func:`decode_usable`), mismatched shapes, or a
            position outside the cache.

    Softmax attention as in Vaswani et al. 2017, query head h using key/value head h // (H / H_kv).
    """
    return torch.ops.barkgpt.decode_attention(q, k_cache, v_cache, k_new, v_new, pos, q.size(-1) ** -0.5)


def load(quiet: bool = False) -> bool:
    """Build (first time on this machine) and register the kernel; True when it is usable.

    Does nothing and returns False when ``BARKGPT_CPU_ATTENTION=0``, without AVX2/FMA, or when
    the build fails (no C++ compiler or ninja): then a one-line warning (unless ``quiet``) and
    training keeps PyTorch's attention. Safe to call from several threads or processes (DDP
    ranks): the build is locked, and it runs once per process.
    """
    with _lock:
        if _state["tried"]:
            return _state["ready"]
        _state["tried"] = True
        if os.environ.get("BARKGPT_CPU_ATTENTION", "1") == "0":
            return False
        if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
            return False
        try:
            _build_and_register()
        except Exception as e:  # noqa: BLE001 - a missing compiler or ninja raises many types
            if not quiet:
                print(
                    f"warning: the CPU attention kernel did not build ({type(e).__name__}: "
                    f"{str(e).strip().splitlines()[-1][:160] if str(e).strip() else ''}); using PyTorch's attention",
                    file=sys.stderr,
                )
            return False
        _state["ready"] = True
        return True


def _put_ninja_on_path() -> None:
    """``cpp_extension`` runs ``ninja`` from PATH; pip's ``ninja`` package puts it in the venv's
    bin folder, which is not on PATH when the venv is not activated."""
    if shutil.which("ninja") is None:
        with contextlib.suppress(ImportError):
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def _build_and_register() -> None:
    """Build and load the C++ ops (``torch.ops.barkgpt.*``), then register their fake kernels
    (shapes for ``torch.compile``) and autograd formula; once per process (a failure is retried)."""
    from torch.utils.cpp_extension import load as build

    _put_ninja_on_path()
    build(
        name="barkgpt_cpu_attention",
        sources=[str(_SOURCE)],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        is_python_module=False,
        verbose=False,
    )
    ops = torch.ops.barkgpt

    @torch.library.register_fake("barkgpt::causal_attention")
    def _(q, k, v, scale):
        B, T, H, D = q.shape
        return q.new_empty(B, T, H, D), q.new_empty(B, H, T, T)

    @torch.library.register_fake("barkgpt::decode_attention")
    def _(q, k_cache, v_cache, k_new, v_new, pos, scale):
        return q.new_empty(q.shape)

    @torch.library.register_fake("barkgpt::causal_attention_backward")
    def _(dout, q, k, v, out, p, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, p = output
        ctx.save_for_backward(q, k, v, out, p)
        ctx.scale = scale

    def backward(ctx, dout, _dp):
        q, k, v, out, p = ctx.saved_tensors
        dout = dout if dout.stride(-1) == 1 else dout.contiguous()
        return (*ops.causal_attention_backward(dout, q, k, v, out, p, ctx.scale), None)

    torch.library.register_autograd("barkgpt::causal_attention", backward, setup_context=setup_context)
