"""The engine: sampling filters, KV-cache generation against the naive reference."""

import pytest
import torch

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, SamplingParams
from barkgpt.engine import (
    Engine,
    KVCache,
    PrefixCache,
    Row,
    apply_repetition_penalty,
    common_prefix,
    process_logits,
    sample_next_token,
    token_logprobs,
)
from barkgpt.model import GPT


@pytest.fixture(params=["llama", "gpt2"])
def model(request):
    torch.manual_seed(0)
    kv = 1 if request.param == "llama" else 2
    return GPT(GPTConfig(family=request.param, vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=kv, n_embd=32)).eval()


def test_greedy_kv_cache_equals_naive(model):
    for prompt in ([1], [5, 9, 2, 33, 7], list(range(3, 20))):
        fast = [s[0] for s in Engine(model).generate(prompt, max_new_tokens=32 - len(prompt), temperature=0)]
        naive = model.generate(torch.tensor([prompt]), 32 - len(prompt))[0, len(prompt) :].tolist()
        assert fast == naive


def test_sampling_is_seeded_and_batched(model):
    eng = Engine(model)
    a = list(eng.generate([1, 2, 3], num_samples=4, max_new_tokens=10, temperature=1.0, seed=7))
    b = list(eng.generate([1, 2, 3], num_samples=4, max_new_tokens=10, temperature=1.0, seed=7))
    assert a == b
    rows = list(zip(*a))
    assert len(rows) == 4 and len(set(rows)) > 1  # the rows sample independently


def test_generation_slides_past_block_size(model):
    steps = list(Engine(model).generate([1, 2, 3], max_new_tokens=80, temperature=0))
    assert len(steps) == 80


@pytest.mark.parametrize("kernel", [True, False], ids=["decode-kernel", "sdpa"])
def test_compiled_decode_equals_eager(model, kernel, monkeypatch):
    """The compiled static-cache step gives the eager engine's tokens, across the window slide
    (80 tokens with block_size 32) and for two rows sampled with one seed: through the C++
    decode attention kernel (CPUs with AVX2) and through SDPA over the merged cache (elsewhere)."""
    if kernel and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the decode kernel needs AVX2 and FMA")
    if not kernel:
        monkeypatch.setattr(GPT, "decode_kernel", lambda self: False)
    eager, compiled = Engine(model), Engine(model, compile=True)
    kw = dict(num_samples=2, max_new_tokens=80, temperature=0.7, seed=3)
    assert list(compiled.generate([1, 2, 3], **kw)) == list(eager.generate([1, 2, 3], **kw))
    assert compiled._compiled_steps  # the compiled path really ran
    assert compiled._decode_kernel is kernel


@pytest.mark.parametrize("family,kernel", [("llama", True), ("gpt2", False)], ids=["llama-kernel", "gpt2-sdpa"])
def test_multi_step_greedy_decode_gives_the_single_step_tokens(family, kernel, monkeypatch):
    """Greedy decoding 4 tokens per compiled call gives the eager engine's tokens (as one per
    call does: test_compiled_decode_equals_eager): across the window slide (80 tokens, block_size 32: the steps near the edge go
    one by one), for a length that is no multiple of 4, and with a stop token that falls inside
    a multi-step call; through the decode kernel (llama, RoPE) and SDPA (gpt2, learned positions)."""
    if kernel and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("the decode kernel needs AVX2 and FMA")
    if not kernel:
        monkeypatch.setattr(GPT, "decode_kernel", lambda self: False)
    torch.manual_seed(1)
    kv = 1 if family == "llama" else 2
    cfg = GPTConfig(
        family=family, vocab_size=64, block_size=32, n_layer=1, n_head=2, n_kv_head=kv, n_embd=32, tie_embeddings=False
    )
    model = GPT(cfg).eval()  # untied: a random tied model's greedy tokens repeat the last one
    eager, multi = Engine(model), Engine(model, compile=True, multi_step=4)
    want = [s[0] for s in eager.generate([1, 2, 3], max_new_tokens=80, temperature=0)]
    assert len(set(want)) > 10  # tokens that could differ
    assert [s[0] for s in multi.generate([1, 2, 3], max_new_tokens=80, temperature=0)] == want
    assert [s[0] for s in multi.generate([1, 2, 3], max_new_tokens=7, temperature=0)] == want[:7]
    stop = next(t for t in want[1:] if want.index(t) % 4 != 0)  # yielded from inside a call
    got = [s[0] for s in multi.generate([1, 2, 3], max_new_tokens=80, temperature=0, stop_ids=[stop])]
    assert got == want[: want.index(stop) + 1]
    assert set(multi._compiled_steps) == {1, 4} and multi._decode_kernel is kernel  # 4 per call, 1 by the edge


def test_a_failed_compile_falls_back_to_eager(model, capsys):
    """No C++ compiler for inductor: one warning, then the eager engine's tokens."""
    import torch._dynamo
    import torch._inductor.config as inductor_config

    eager = [s[0] for s in Engine(model).generate([1, 2], max_new_tokens=12, temperature=0)]
    cxx, cache = inductor_config.cpp.cxx, inductor_config.fx_graph_cache
    inductor_config.cpp.cxx = ("/nonexistent/c++",)
    inductor_config.fx_graph_cache = False  # no cached kernels to fall back on
    torch._dynamo.reset()
    try:
        engine = Engine(model, compile=True)
        assert [s[0] for s in engine.generate([1, 2], max_new_tokens=12, temperature=0)] == eager
    finally:
        inductor_config.cpp.cxx, inductor_config.fx_graph_cache = cxx, cache
        torch._dynamo.reset()
    assert not engine.compile and "torch.compile failed" in capsys.readouterr().err


def test_stop_ids_end_rows(model):
    first = [s[0] for s in Engine(model).generate([4], max_new_tokens=5, temperature=0)]
    steps = list(Engine(model).generate([4], max_new_tokens=5, temperature=0, stop_ids=[first[1]]))
    assert [s[0] for s in steps] == first[: first.index(first[1]) + 1]


def test_greedy_and_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.5]])
    assert sample_next_token(logits, temperature=0).item() == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next_token(logits, g, 1.0, top_k=1).item() for _ in range(20)} == {1}
    assert {sample_next_token(logits, g, 1.0, top_p=0.5).item() for _ in range(20)} == {1}
    assert {sample_next_token(logits, g, 1.0, top_k=2).item() for _ in range(50)} == {1, 2}
    assert {sample_next_token(logits, g, 1.0, min_p=0.5).item() for _ in range(50)} <= {1, 2}
    assert len({sample_next_token(logits, g, 1.0).item() for _ in range(200)}) == 4


def test_per_row_settings_filter_each_row_as_alone():
    """One batched pass of the logits processors with settings per row gives each row what it
    gets alone."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    settings = [(0.7, 5, 1.0, 0.0), (1.3, 0, 0.8, 0.0), (1.0, 0, 1.0, 0.1), (0.5, 3, 0.9, 0.05)]
    rows = [Row([1], SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m)) for t, k, p, m in settings]
    batched = torch.softmax(process_logits(logits, rows), dim=-1)
    for b, row in enumerate(rows):
        torch.testing.assert_close(batched[b : b + 1], torch.softmax(process_logits(logits[b : b + 1], [row]), dim=-1))
    assert (batched[0] > 0).sum() == 5 and (batched[3] > 0).sum() <= 3


def test_a_row_draws_what_one_rand_per_token_draws():
    """Row.uniform draws its generator's numbers a block at a time: the same numbers, in the same
    order, across a block's end, as one ``torch.rand(1)`` per sampled token."""
    row, g = Row([1], SamplingParams(seed=5)), torch.Generator().manual_seed(5)
    got = [row.uniform() for _ in range(150)]
    assert got == [torch.rand(1, generator=g).item() for _ in range(150)]


def test_inverse_cdf_sampling_draws_from_the_distribution():
    from barkgpt.engine import sample_from_probs

    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0])
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(sample_from_probs(probs.expand(len(u), -1), u), minlength=5) / len(u)
    assert counts[1] == 0 and counts[4] == 0  # zero-probability tokens never come out
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)
    edge = sample_from_probs(torch.tensor([[0.0, 1.0, 0.0], [0.3, 0.7, 0.0]]), torch.tensor([0.0, 0.9999999]))
    assert edge.tolist() == [1, 1]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_presence_and_frequency_penalties():
    from barkgpt.engine import apply_presence_frequency_penalty

    logits = torch.zeros(1, 4)
    out = apply_presence_frequency_penalty(logits, torch.tensor([[1, 1, 3]]), presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -1.0, 0.0, -0.75]]


def test_token_logprobs_are_the_raw_log_softmax():
    logits = torch.tensor([[2.0, 0.5, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    chosen, top, ids = token_logprobs(logits, torch.tensor([0, 2]), k=2)
    expected = torch.log_softmax(logits, dim=-1)
    assert torch.allclose(chosen, expected[[0, 1], [0, 2]])
    assert ids[0].tolist() == [3, 0] and torch.allclose(top[0], expected[0, [3, 0]])
    assert (top <= 0).all() and token_logprobs(logits, torch.tensor([0, 1]), k=10)[1].shape == (2, 4)


def test_each_sample_draws_from_its_own_seed(model):
    """Sample j of ``num_samples`` draws with seed + j, as the server's n choices do, so it does
    not depend on how many samples run beside it."""
    kw = dict(max_new_tokens=8, temperature=1.0)
    together = list(zip(*Engine(model).generate([1, 2], num_samples=3, seed=7, **kw)))
    alone = [tuple(s[0] for s in Engine(model).generate([1, 2], seed=7 + j, **kw)) for j in range(3)]
    assert together == alone


def test_a_row_hook_constrains_every_token(model):
    """The per-row hook (where constrained decoding goes) runs before sampling: a banned token
    never comes out, greedy or sampled."""
    greedy = [s[0] for s in Engine(model).generate([3], max_new_tokens=10, temperature=0)]
    banned = greedy[0]

    def ban(row, logits):
        return logits.index_fill(0, torch.tensor([banned]), float("-inf"))

    for temperature in (0, 1.0):
        out = [s[0] for s in Engine(model).generate([3], max_new_tokens=10, temperature=temperature, seed=1, processors=[ban])]
        assert banned not in out and len(out) == 10


def test_sampling_settings_are_validated_once_in_sampling_params(model):
    for kw, word in (
        (dict(temperature=-1), "temperature"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(frequency_penalty=-2.5), "frequency_penalty"),
        (dict(logprobs=-1), "logprobs"),
    ):
        with pytest.raises(BarkError, match=word):
            SamplingParams(**kw)
    with pytest.raises(BarkError, match="top_p"):
        next(Engine(model).generate([1], top_p=0))


def test_prefix_cache_keeps_the_longest_prefix_within_its_bytes():
    k = torch.arange(2 * 1 * 10 * 2, dtype=torch.float32).view(2, 1, 10, 2)  # (n_layer, n_kv_head, L, hs)
    per_token = 2 * k[:, :, :1].numel() * 4
    cache = PrefixCache(max_bytes=12 * per_token)
    cache.put([1, 2, 3], k, k)
    cache.put([1, 2, 3, 4, 5], k, k)  # holds the first entry: it replaces it
    assert len(cache) == 1 and cache.bytes == 5 * per_token
    n, got, _ = cache.lookup([1, 2, 3, 4, 5])
    assert n == 4 and torch.equal(got[:, :, :4], k[:, :, :4])  # the last prompt token is always run
    assert cache.lookup([1, 2, 9])[0] == 2 and cache.lookup([7, 1])[0] == 0
    cache.put([7, 8, 9, 9], k, k)
    cache.lookup([1, 2, 3])  # [1..5] is now the most recently used
    cache.put([6, 6, 6, 6], k, k)  # 13 tokens > 12: the least recently used entry leaves
    assert cache.lookup([7, 8, 9, 9, 1])[0] == 0 and cache.lookup([1, 2, 3, 4, 5, 6])[0] == 5
    assert cache.bytes <= cache.max_bytes and cache.hits == 4 + 2 + 2 + 5 and cache.queries == 5 + 3 + 2 + 3 + 5 + 6
    assert cache.tokens == 9


def test_prefix_cache_finds_what_a_scan_of_every_entry_finds():
    """The sorted index (two neighbours per lookup and put) against the rule it replaces, on
    random prompts that share prefixes, hold one another and repeat."""
    import random

    rnd = random.Random(0)
    k = torch.zeros(1, 1, 12, 1)
    cache, live = PrefixCache(max_bytes=1 << 30), set()
    for _ in range(3000):
        ids = tuple(rnd.choice((1, 2, 3)) for _ in range(rnd.randint(1, 12)))  # 3 tokens: many shared prefixes
        if rnd.random() < 0.5:
            want = min(max((common_prefix(e, ids) for e in live), default=0), len(ids) - 1)
            assert cache.lookup(ids)[0] == want
        else:
            cache.put(ids, k, k)
            if not any(e[: len(ids)] == ids for e in live):  # the rule: an entry holding it keeps it out...
                live = {e for e in live if ids[: len(e)] != e} | {ids}  # ...and it replaces those it holds
            assert set(cache._entries) == live and cache._sorted == sorted(live)


def test_prefill_from_the_prefix_cache_gives_the_same_logits(model):
    plain, cached = Engine(model), Engine(model, prefix_cache_bytes=1 << 20)
    first = list(range(1, 11))
    one = KVCache.for_model(model, 1)
    cached.prefill(first, one)
    cached.remember(first, one, 0)
    longer = first + [11, 12, 13]
    got = cached.prefill(longer, one)
    torch.testing.assert_close(got, plain.prefill(longer, KVCache.for_model(model, 1)))
    assert cached.prefix_cache.hits == 10 and one.lengths == [13]
