"""The CPU attention kernel (barkgpt/csrc/cpu_attention.cpp) against PyTorch's attention:
outputs and gradients, strided inputs, grouped-query heads, the model and a compiled step."""

import pytest
import torch
import torch.nn.functional as F

from barkgpt import cpu_attention
from barkgpt.config import GPTConfig
from barkgpt.model import GPT


@pytest.fixture(scope="module")
def kernel():
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the kernel needs AVX2 and FMA")
    before = dict(cpu_attention._state)
    cpu_attention._state["tried"] = False
    assert cpu_attention.load(), "the kernel did not build (see the warning above)"
    yield
    cpu_attention._state.update(before)  # as it was: later tests load it (or not) themselves


def sdpa(q, k, v):
    """PyTorch's causal attention on (B, T, heads, D) tensors."""
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=q.size(2) != k.size(2)
    )
    return y.transpose(1, 2)


@pytest.mark.parametrize(
    "B,T,H,H_kv,D",
    [(12, 64, 4, 1, 32), (2, 7, 4, 2, 16), (3, 33, 2, 2, 32), (2, 9, 3, 1, 32), (1, 2, 1, 1, 16), (2, 256, 2, 1, 16)],
)
def test_outputs_and_gradients_match_sdpa(kernel, B, T, H, H_kv, D):
    torch.manual_seed(0)
    qkv = torch.randn(B, T, H + 2 * H_kv, D) * 2  # q, k, v as strided views of one projection, as in the model
    grad = torch.randn(B, T, H, D)
    results = []
    for attend in (sdpa, cpu_attention.causal_attention):
        x = qkv.clone().requires_grad_()
        q, k, v = x.split([H, H_kv, H_kv], dim=2)
        y = attend(q, k, v)
        y.backward(grad)
        results.append((y.detach(), x.grad))
    (y_ref, g_ref), (y, g) = results
    assert y.shape == (B, T, H, D) and y.is_contiguous()
    torch.testing.assert_close(y, y_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(g, g_ref, atol=5e-5, rtol=1e-4)


def test_usable_only_where_the_kernel_applies(kernel):
    q = torch.zeros(2, 64, 4, 32)
    assert cpu_attention.usable(q)
    assert not cpu_attention.usable(q, dropout_p=0.1)
    assert not cpu_attention.usable(q.double()) and not cpu_attention.usable(torch.zeros(2, 64, 4, 64))
    assert not cpu_attention.usable(torch.zeros(2, 1, 4, 32)) and not cpu_attention.usable(torch.zeros(1, 257, 4, 32))
    assert not cpu_attention.usable(torch.zeros(64, 256, 5, 16))  # 80 MiB of attention weights per layer


def test_model_losses_and_gradients_match_and_compile(kernel):
    """A llama model with the kernel gives SDPA's loss and gradients, eager and compiled."""
    cfg = GPTConfig(
        family="llama", vocab_size=65, block_size=32, n_layer=2, n_head=4, n_kv_head=1, n_embd=128, intermediate_size=256
    )
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = torch.randint(0, 65, (4, 32)), torch.randint(0, 65, (4, 32))

    def loss_and_grads(m):
        model.zero_grad(set_to_none=True)
        loss = m(x, y)[1]
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    cpu_attention._state["ready"] = False  # SDPA
    ref_loss, ref_grads = loss_and_grads(model)
    cpu_attention._state["ready"] = True
    for m in (model, torch.compile(model)):
        loss, grads = loss_and_grads(m)
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("BARKGPT_CPU_ATTENTION", "0")
    monkeypatch.setattr(cpu_attention, "_state", {**cpu_attention._state, "ready": False, "tried": False})
    assert cpu_attention.load() is False and not cpu_attention.usable(torch.zeros(2, 64, 4, 32))


@pytest.mark.parametrize(
    "k_shape,v_shape",
    [
        ((2, 8, 1, 16), (2, 8, 2, 16)),  # k and v differ
        ((2, 4, 1, 16), (2, 4, 1, 16)),  # shorter than q
        ((1, 8, 1, 16), (1, 8, 1, 16)),  # fewer batch rows
        ((2, 8, 1, 32), (2, 8, 1, 32)),  # another head size
        ((2, 8, 3, 16), (2, 8, 3, 16)),
    ],
)  # 4 heads over 3
def test_mismatched_shapes_raise(kernel, k_shape, v_shape):
    """The kernel indexes k and v with q's sizes: a mismatch is a RuntimeError, never an out-of-bounds read."""
    q = torch.randn(2, 8, 4, 16)
    with pytest.raises(RuntimeError, match="causal_attention"):
        cpu_attention.causal_attention(q, torch.randn(k_shape), torch.randn(v_shape))


def test_backward_checks_shapes(kernel):
    q, k, v = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 1, 16), torch.randn(2, 8, 1, 16)
    out, p = torch.ops.barkgpt.causal_attention(q, k, v, 0.25)
    with pytest.raises(RuntimeError, match="must have q's shape"):
        torch.ops.barkgpt.causal_attention_backward(torch.randn(2, 4, 2, 16), q, k, v, out, p, 0.25)
    with pytest.raises(RuntimeError, match=r"\(B, H, T, T\)"):
        torch.ops.barkgpt.causal_attention_backward(torch.randn_like(q), q, k, v, out, p[:, :, :4].contiguous(), 0.25)


def decode_reference(q, k_cache, v_cache, k_new, v_new, pos):
    """SDPA of each row's one query over its first pos[b] cached slots and its J new keys/values."""
    out = []
    for b in range(q.size(0)):
        n = int(pos[b])
        k = torch.cat([k_cache[b, :, :n], k_new[b].transpose(0, 1)], dim=1)  # (H_kv, n + J, D)
        v = torch.cat([v_cache[b, :, :n], v_new[b].transpose(0, 1)], dim=1)
        y = F.scaled_dot_product_attention(
            q[b].transpose(0, 1).unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), enable_gqa=q.size(2) != k.size(0)
        )
        out.append(y[0].transpose(0, 1))  # (1, H, D)
    return torch.stack(out)


@pytest.mark.parametrize(
    "B,H,H_kv,D,L,J",
    [(16, 4, 1, 32, 129, 1), (3, 4, 4, 32, 20, 1), (2, 8, 2, 64, 50, 1), (5, 2, 2, 16, 9, 1), (3, 4, 1, 32, 20, 4)],
)
def test_decode_attention_matches_sdpa(kernel, B, H, H_kv, D, L, J):
    """One query per row over a strided slice of a larger cache (as the engine passes it), rows
    at every position from an empty cache (0) to a full one (L), then J new entries (J > 1: a
    multi-step decode call's, strided as its concatenation of the fused projection's slices)."""
    torch.manual_seed(0)
    q = torch.randn(B, 1, H + 2 * H_kv, D)[:, :, :H] * 2  # a view into a fused projection
    k_cache, v_cache = torch.randn(2, B + 1, H_kv, L + 5, D)[:, :B, :, :L]
    k_new, v_new = torch.randn(2, B, J, H_kv + 1, D)[:, :, :, :H_kv]
    pos = torch.randint(0, L + 1, (B,))
    pos[0], pos[-1] = 0, L
    out = cpu_attention.decode_attention(q, k_cache, v_cache, k_new, v_new, pos)
    assert out.shape == (B, 1, H, D) and out.is_contiguous()
    torch.testing.assert_close(out, decode_reference(q, k_cache, v_cache, k_new, v_new, pos), atol=1e-5, rtol=1e-5)


def test_decode_attention_refuses_bad_positions_and_shapes(kernel):
    q, k_cache, v_cache = torch.randn(2, 1, 2, 16), torch.randn(2, 2, 8, 16), torch.randn(2, 2, 8, 16)
    k_new = v_new = torch.randn(2, 1, 2, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        cpu_attention.decode_attention(q, k_cache, v_cache, k_new, v_new, torch.tensor([0, 9]))
    with pytest.raises(RuntimeError, match="one query token per row"):
        cpu_attention.decode_attention(torch.randn(2, 2, 2, 16), k_cache, v_cache, k_new, v_new, torch.tensor([1, 1]))
    with pytest.raises(RuntimeError, match="k_new/v_new"):
        cpu_attention.decode_attention(q, k_cache, v_cache, k_new[:1], v_new[:1], torch.tensor([1, 1]))
