"""Text-level generation: streaming equals the full reply, stop strings, word spacing, errors."""

import pytest
import torch

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig
from barkgpt.generate import TextGenerator
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    tok = Tokenizer.train("char", iter(["abcdefghij klmnop\nqrstuvwxyz .,!?" * 20]))
    torch.manual_seed(3)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():  # make <EOS> unlikely so replies run to max_new_tokens
        model.lm_head.weight[tok.eos_id] = 0
    return TextGenerator(model.eval(), tok)


def test_stream_equals_generate(gen):
    kw = dict(max_new_tokens=40, temperature=0.9, top_k=20, seed=5)
    assert "".join(gen.stream("abc", **kw)) == gen.generate("abc", **kw)
    assert gen.generate("abc", **kw) == gen.generate("abc", **kw)


def test_stop_strings_cut_the_reply(gen):
    full = gen.generate("abc", max_new_tokens=30, temperature=0)
    stop = full[10:13]
    cut = gen.generate("abc", max_new_tokens=30, temperature=0, stop=[stop])
    assert cut == full[: full.index(stop)]
    assert "".join(gen.stream("abc", max_new_tokens=30, temperature=0, stop=[stop])) == cut
    [c] = gen.complete("abc", max_new_tokens=30, temperature=0, stop=[stop])
    assert c.finish_reason == "stop"
    [c] = gen.complete("abc", max_new_tokens=5, temperature=0)
    assert c.finish_reason == "length" and c.completion_tokens == 5


def test_num_samples_returns_a_list(gen):
    out = gen.generate("ab", max_new_tokens=5, num_samples=3, seed=1)
    assert isinstance(out, list) and len(out) == 3


def test_word_replies_continue_the_prompt_with_a_space():
    tok = Tokenizer.from_words(["<PAD>", "<EOS>", "<BOS>", "<UNK>", "User:", "Assistant:", "speak", *"abcd"])
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)).eval()
    g = TextGenerator(model, tok)
    prompt = "User: speak Assistant:"
    [c] = g.complete(prompt, max_new_tokens=5, temperature=0)
    ids = tok.encode(prompt) + [
        s[0] for s in g.engine.generate(tok.encode(prompt), max_new_tokens=c.completion_tokens, temperature=0)
    ]
    expected = tok.decode([i for i in ids if i != tok.eos_id])
    assert prompt + c.text == expected


def test_long_prompt_needs_truncate(gen):
    with pytest.raises(BarkError, match="--truncate"):
        gen.generate("a" * 40, max_new_tokens=2)
    assert isinstance(gen.generate("a" * 40, max_new_tokens=2, truncate=True), str)


def test_bad_sampling_values(gen):
    for kw in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(BarkError):
            gen.generate("a", **kw)
