"""The model: causality, cached decoding, init loss, overfitting, both families."""

import math

import pytest
import torch

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig
from barkgpt.engine import KVCache
from barkgpt.model import GPT

FAMILIES = [
    dict(family="llama", n_kv_head=1),
    dict(family="gpt2", n_kv_head=2),
    dict(family="llama", n_kv_head=1, n_expert=4, n_expert_per_token=2),
]  # Mixture-of-Experts


def make(family, n_kv_head, **kw):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=n_kv_head, n_embd=32, family=family, **kw)
    return GPT(cfg).eval()


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: "moe" if f.get("n_expert") else f["family"])
def test_future_tokens_do_not_change_past_logits(fam):
    model = make(**fam)
    idx = torch.randint(0, 64, (2, 24))
    for t in (0, 7, 22):
        changed = idx.clone()
        changed[:, t + 1] = (changed[:, t + 1] + 1) % 64
        a, _ = model(idx, idx)
        b, _ = model(changed, changed)
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])  # positions <= t see nothing after t
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # and the changed position does change


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: "moe" if f.get("n_expert") else f["family"])
def test_init_loss_is_about_ln_vocab(fam):
    model = make(**fam)
    idx = torch.randint(0, 64, (4, 32))
    _, loss = model(idx, torch.randint(0, 64, (4, 32)))
    assert abs(loss.item() - math.log(64)) < 0.1


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: "moe" if f.get("n_expert") else f["family"])
def test_kv_cache_logits_match_full_forward(fam):
    model = make(**fam)
    idx = torch.randint(0, 64, (2, 20))
    full, _ = model(idx, idx)
    cache = KVCache.for_model(model, 2)
    a, _ = model(idx[:, :9], kv_cache=cache)
    pieces = [a] + [model(idx[:, t : t + 1], kv_cache=cache)[0] for t in range(9, 20)]
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: "moe" if f.get("n_expert") else f["family"])
def test_rows_at_different_positions_decode_together(fam):
    model = make(**fam)
    idx = torch.randint(0, 64, (2, 16))
    full, _ = model(idx, idx)
    rows = []
    for b, n in enumerate((5, 11)):  # prefill each row alone, to a different length
        c = KVCache.for_model(model, 1)
        model(idx[b : b + 1, :n], kv_cache=c)
        rows.append(c)
    cache = KVCache.for_model(model, 2)
    for b, c in enumerate(rows):
        cache.k[:, b], cache.v[:, b] = c.k[:, 0], c.v[:, 0]
    cache.lengths = [5, 11]
    out, _ = model(torch.stack([idx[0, 5], idx[1, 11]]).view(2, 1), kv_cache=cache)
    assert torch.allclose(out[0, 0], full[0, 5], atol=1e-5)
    assert torch.allclose(out[1, 0], full[1, 11], atol=1e-5)


@pytest.mark.parametrize("fam", FAMILIES, ids=lambda f: "moe" if f.get("n_expert") else f["family"])
def test_overfits_one_batch(fam):
    model = make(**fam).train()
    torch.manual_seed(1)
    idx = torch.randint(0, 64, (4, 16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def test_residual_projections_get_scaled_init():
    model = make("llama", 1)
    std = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 2)) < 0.004
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 0.004


def test_tied_embeddings_share_storage():
    model = make("llama", 1)
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = make("llama", 1, tie_embeddings=False)
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_parameter_count_and_flops():
    model = make("gpt2", 2)
    n = sum(p.numel() for p in model.parameters())
    assert model.num_params() == n
    assert model.flops_per_token() > 6 * (n - 32 * 32)


def test_moe_routes_each_token_to_its_top_k_experts():
    """The batched dispatch equals a per-token computation of Mixtral's routing."""
    import torch.nn.functional as F

    model = make("llama", 1, n_expert=4, n_expert_per_token=2)
    moe = model.transformer.h[0].mlp
    x = torch.randn(2, 5, 32)
    out = moe(x)
    n = moe.c_proj.shape[-1]  # intermediate_size
    for b in range(2):
        for t in range(5):
            p = moe.router(x[b, t]).softmax(-1)
            w, e = p.topk(2)
            w = w / w.sum()
            ref = sum(
                wi * moe.c_proj[ei] @ (F.silu(moe.c_fc[ei, :n] @ x[b, t]) * (moe.c_fc[ei, n:] @ x[b, t])) for wi, ei in zip(w, e)
            )
            assert torch.allclose(out[b, t], ref, atol=1e-5)
    assert moe.expert_tokens is None  # counted in training only
    moe.train()(x)
    assert moe.expert_tokens.sum().item() == 2 * 10


def test_moe_load_balancing_loss():
    model = make("llama", 1, n_expert=4, n_expert_per_token=2).train()
    idx = torch.randint(0, 64, (4, 32))
    _, loss = model(idx, idx)
    aux = [b.mlp.aux_loss for b in model.transformer.h]
    assert all(a.item() >= 2 - 1e-4 for a in aux)  # n_expert_per_token at perfect balance, more otherwise
    model.eval()
    _, eval_loss = model(idx, idx)  # no auxiliary term outside training
    assert loss.item() == pytest.approx(eval_loss.item() + 0.01 * sum(a.item() for a in aux) / 2, abs=1e-5)
    model.train()
    model.zero_grad()
    model(idx, idx)[1].backward()
    assert model.transformer.h[0].mlp.router.weight.grad.abs().sum() > 0


def test_moe_config_errors():
    from barkgpt.common import BarkError

    with pytest.raises(BarkError, match="n_expert_per_token .5. must be between 1 and n_expert .4."):
        GPTConfig(vocab_size=64, n_expert=4, n_expert_per_token=5)
    with pytest.raises(BarkError, match="llama family"):
        GPTConfig(vocab_size=64, family="gpt2", n_expert=4)
    cfg = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=64, n_expert=4, n_expert_per_token=1)
    dense = GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=64)
    assert GPT(cfg).flops_per_token() == GPT(dense).flops_per_token() + 6 * 2 * 32 * 4  # + the routers only


def test_attention_dropout_applies_with_a_mask():
    """Packed fine-tuning rows pass an explicit mask: attention dropout must apply there too
    (it used to be dropped silently on the masked path)."""
    torch.manual_seed(0)
    attn = (
        GPT(GPTConfig(family="gpt2", n_layer=1, n_head=2, n_kv_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.5))
        .transformer.h[0]
        .attn
    )
    attn.resid_dropout = torch.nn.Identity()  # leave only the attention dropout
    x = torch.randn(2, 8, 32)
    mask = torch.ones(8, 8, dtype=torch.bool).tril().expand(2, 1, 8, 8)  # (B, 1, T, T) causal
    outs = {}
    for mode, m in (("unmasked", None), ("masked", mask)):
        attn.train()
        dropped = attn(x, attn_mask=m)
        attn.eval()
        outs[mode] = (dropped, attn(x, attn_mask=m))
    for dropped, plain in outs.values():
        assert not torch.allclose(dropped, plain), "attention dropout was not applied"
    torch.testing.assert_close(outs["masked"][1], outs["unmasked"][1])  # same attention without dropout


def test_attention_dropout_zero_keeps_residual_dropout_only():
    """``attention_dropout`` 0 with ``dropout`` 0.5: the attention weights are not dropped (the same
    output in train and eval mode once residual dropout is off), the residual branches still are;
    unset, it follows ``dropout``."""
    cfg = dict(family="gpt2", n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.5)
    assert GPTConfig(**cfg).attention_dropout_p == 0.5
    with pytest.raises(BarkError, match="attention_dropout"):
        GPTConfig(**cfg, attention_dropout=1.0)
    torch.manual_seed(0)
    block = GPT(GPTConfig(**cfg, attention_dropout=0.0)).transformer.h[0]
    attn, x = block.attn, torch.randn(2, 8, 32)
    assert attn.dropout == 0.0 and attn.resid_dropout.p == 0.5 and block.mlp.dropout.p == 0.5
    attn.train()
    dropped = attn(x)
    attn.resid_dropout = torch.nn.Identity()
    kept = attn(x)
    attn.eval()
    torch.testing.assert_close(kept, attn(x))  # no dropout on the attention weights
    assert not torch.allclose(dropped, kept), "residual dropout was not applied"


def test_gelu_tanh_compiled_form_equals_gelu_new():
    """Under torch.compile gelu_tanh is written with a sigmoid (vectorizable); it is still
    GPT-2's gelu_new, values and gradients, and eagerly it is F.gelu(approximate="tanh")."""
    import torch.nn.functional as F

    from barkgpt.model import gelu_tanh

    x = torch.linspace(-8, 8, 4001, dtype=torch.float64).requires_grad_()
    expect = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    (g_expect,) = torch.autograd.grad(expect.sum(), x)
    assert torch.equal(gelu_tanh(x.detach()), F.gelu(x.detach(), approximate="tanh"))
    graphs = []

    def backend(gm, example_inputs):  # records what dynamo traced, runs it as is
        graphs.append(gm.code)
        return gm.forward

    y = torch.compile(gelu_tanh, backend=backend, fullgraph=True)(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert "sigmoid" in graphs[0] and "gelu" not in graphs[0]  # the compiled branch ran
    assert torch.allclose(y, expect, atol=1e-12) and torch.allclose(g, g_expect, atol=1e-12)
