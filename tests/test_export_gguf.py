"""GGUF export: the file's metadata (read back with ``gguf``'s reader), and parity with real
llama.cpp through ``llama-cpp-python`` whenever it is installed (``make test`` builds it).

llama.cpp must tokenize varied text exactly as we do, give our fp32 logits within 1e-3 from an
f32 file with an F32 KV cache, and pick the same 32 greedy tokens; an export without the RoPE
Q/K permutation must fail that parity check, which proves the check can fail.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the export extra (gguf) is not installed")

from barkgpt.checkpoint import save_checkpoint
from barkgpt.cli import main
from barkgpt.config import GPTConfig
from barkgpt.export.gguf import export_gguf
from barkgpt.generate import TextGenerator
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

TEXTS = [
    "ROMEO: what light through yonder window breaks?",
    "Café naïve 東京は大きい 🐶🐕 woof!",
    "  leading spaces, trailing  \n\n\ttabs and 12345 numbers 3.14",
    "don't you'll we've I'm <EOS> after special",
    "User: hi\nAssistant: hello<EOS>\n",
    "symbols #@$%^&*() and ünïcödé ß ﬁ",
]
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (make test builds it: compiling llama.cpp takes 9-18 min)",
)


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Decisive random weights (std 0.3, norms near 1): greedy decoding without near-ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * (0.3 if p.dim() >= 2 else 0.1)
                + (0 if p.dim() >= 2 or name.endswith("bias") else 1)
            )
    return model.eval()


@pytest.fixture(scope="module")
def bpe(tiny_text):
    return Tokenizer.train("bpe", [tiny_text + " ".join(TEXTS) * 5], 360)


def checkpoint(tmp_path, tokenizer, family="llama", **kw):
    if family == "moe":
        family, kw = "llama", {"n_expert": 4, "n_expert_per_token": 2, "intermediate_size": 96, **kw}
    cfg = GPTConfig(
        family=family,
        vocab_size=tokenizer.vocab_size,
        block_size=96,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if family == "llama" else None,
        n_embd=64,
        **kw,
    )
    model = randomize(GPT(cfg))
    save_checkpoint(tmp_path / f"ck-{family}", model, tokenizer)
    return tmp_path / f"ck-{family}", model


def test_metadata(tmp_path, bpe):
    ckpt, model = checkpoint(tmp_path, bpe)
    out = export_gguf(ckpt, tmp_path / "m.gguf", outtype="f16")
    r = gguf.GGUFReader(str(out))

    def field(name):
        f = r.fields[name]
        return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == bpe.vocab_size and tokens[:4] == ["<PAD>", "<EOS>", "<BOS>", "<UNK>"]
    assert list(field("tokenizer.ggml.token_type")[:5]) == [3, 3, 3, 3, 1]  # specials are control tokens
    assert len(field("tokenizer.ggml.merges")) > 0
    assert field("tokenizer.ggml.eos_token_id") == 1 and field("tokenizer.ggml.add_bos_token") is False
    assert field("llama.attention.head_count_kv") == 2 and field("llama.rope.dimension_count") == 16
    assert "Assistant:" in field("tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    assert "output.weight" not in types  # tied head: llama.cpp reuses token_embd


def test_refuses_what_llama_cpp_cannot_represent(tmp_path, capsys):
    ckpt, _ = checkpoint(tmp_path, Tokenizer.from_words(["<PAD>", "<EOS>", "<BOS>", "<UNK>", *"abcdefg"]))
    assert main(["export", "gguf", "--model", str(ckpt), "--out", str(tmp_path / "bark.gguf")]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp has no word-level tokenizer" in err and "--tokenizer bpe" in err
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []  # nothing half-written


def llama_cpp_logits(path, ids):
    """llama.cpp's logits (len(ids), vocab) for one sequence, with an F32 KV cache."""
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(
        model_path=str(path),
        n_ctx=96,
        n_batch=96,
        logits_all=True,
        verbose=False,
        n_threads=1,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        seed=0,
    )
    llm.eval(ids)
    return llm, np.array(llm.scores[: len(ids)])


def ggml_gelu(monkeypatch):
    """Make our GELU round like ggml's CPU GELU, which reads an fp16 lookup table (input and
    output rounded to fp16; GGML_GELU_FP16): up to ~5e-3 off in the logits of these random
    models, so without this the gpt2 family could only be held to 1e-2."""
    gelu = torch.nn.functional.gelu
    monkeypatch.setattr(
        torch.nn.functional, "gelu", lambda x, approximate="none": gelu(x.half().float(), approximate=approximate).half().float()
    )


@needs_llama
@pytest.mark.parametrize("family", ["llama", "gpt2", "moe"])
def test_llama_cpp_parity(tmp_path, bpe, family, monkeypatch):
    ckpt, model = checkpoint(tmp_path, bpe, family)
    path = export_gguf(ckpt, tmp_path / "m.gguf", outtype="f32")
    from llama_cpp import Llama

    vocab_only = Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in TEXTS:
        assert vocab_only.tokenize(text.encode(), add_bos=False, special=True) == bpe.encode(text), text
        ids = bpe.encode(text)
        assert vocab_only.detokenize(ids, special=True).decode("utf-8", "replace") == bpe.decode(ids)

    ids = bpe.encode(" ".join(TEXTS))[:48]
    llm, theirs = llama_cpp_logits(path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0].numpy()
    assert np.abs(ours - theirs).max() < (1e-2 if family == "gpt2" else 1e-3)
    if family == "gpt2":
        ggml_gelu(monkeypatch)
        with torch.no_grad():
            ours = model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0].numpy()
        assert np.abs(ours - theirs).max() < 1e-3

    # 32 greedy tokens, llama.cpp's own decode loop against our KV-cache engine
    prompt = ids[:16]
    llm.reset()
    llm.eval(prompt)
    theirs_gen = []
    for _ in range(32):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        theirs_gen.append(nxt)
        llm.eval([nxt])
    ours_gen = [s[0] for s in TextGenerator(model, bpe).engine.generate(prompt, max_new_tokens=32, temperature=0.0, stop_ids=[])]
    assert ours_gen == theirs_gen


def adjacent_pair_rope(x: torch.Tensor, pos: int, theta: float) -> torch.Tensor:
    """llama.cpp's RoPE for arch ``llama`` (``GGML_ROPE_TYPE_NORM``) on x (n, hs): rows ``2i`` and
    ``2i + 1`` rotate together by ``pos * theta ** (-2i / hs)``."""
    hs = x.shape[-1]
    angle = pos * theta ** (-torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * angle.cos() - b * angle.sin(), a * angle.sin() + b * angle.cos()
    return out


def test_q_and_k_are_written_for_llama_cpps_rope(tmp_path, bpe):
    """The exported attn_q/attn_k rotated as llama.cpp rotates them give our attention scores
    (rotate-half RoPE over our rows): the RoPE permutation, checked without llama.cpp."""
    from barkgpt.model import apply_rope, rope_cache

    ckpt, model = checkpoint(tmp_path, bpe)
    r = gguf.GGUFReader(str(export_gguf(ckpt, tmp_path / "m.gguf", outtype="f32")))
    exported = {t.name: torch.from_numpy(np.array(t.data, dtype=np.float32)) for t in r.tensors}
    c, hs = model.config, model.config.head_dim
    wq, wk, _ = model.transformer.h[1].attn.c_attn.weight.detach().split([c.n_head * hs, c.n_kv_head * hs, c.n_kv_head * hs])
    x = torch.randn(c.n_embd, generator=torch.Generator().manual_seed(0))  # one residual vector (C,)
    cos, sin = rope_cache(8, hs, c.rope_theta)  # (8, hs) each
    m, n = 7, 2  # query and key positions: scores depend on m - n only through RoPE
    ours_q, ours_k = (
        apply_rope((wq @ x).view(c.n_head, hs), cos[m], sin[m]),
        apply_rope((wk @ x).view(c.n_kv_head, hs), cos[n], sin[n]),
    )
    theirs_q = adjacent_pair_rope((exported["blk.1.attn_q.weight"].view(-1, c.n_embd) @ x).view(c.n_head, hs), m, c.rope_theta)
    theirs_k = adjacent_pair_rope((exported["blk.1.attn_k.weight"].view(-1, c.n_embd) @ x).view(c.n_kv_head, hs), n, c.rope_theta)
    ours, theirs = ours_q @ ours_k.T, theirs_q @ theirs_k.T  # (n_head, n_kv_head) scores
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    assert ours.abs().max() > 1e-2  # the scores are not all ~0


@needs_llama
def test_parity_catches_missing_rope_permutation(tmp_path, bpe, monkeypatch):
    """The real export path with :func:`permute_rope` made a no-op must fail the parity check."""
    import barkgpt.export.gguf as gguf_export

    ckpt, model = checkpoint(tmp_path, bpe)
    monkeypatch.setattr(gguf_export, "permute_rope", lambda w, n_head: w)  # Q/K left in HF's layout
    path = export_gguf(ckpt, tmp_path / "bad.gguf", outtype="f32")
    ids = bpe.encode(" ".join(TEXTS))[:48]
    _, theirs = llama_cpp_logits(path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0].numpy()
    assert np.abs(ours[0] - theirs[0]).max() < 1e-3  # position 0 has no rotation: still equal...
    assert np.abs(ours - theirs).max() > 1e-2  # ...but later positions are wrong


@needs_llama
@pytest.mark.parametrize("outtype", ["f16", "q8_0"])
def test_quantized_files_run(tmp_path, bpe, outtype):
    ckpt, model = checkpoint(tmp_path, bpe)
    path = export_gguf(ckpt, tmp_path / f"m-{outtype}.gguf", outtype=outtype)
    ids = bpe.encode(" ".join(TEXTS))[:48]
    _, theirs = llama_cpp_logits(path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids]), targets=torch.tensor([ids]))[0][0].numpy()
    # Rounding error relative to the logits. These random models amplify it (q8_0 also rounds the
    # activations): measured 0.3% for f16 and 6% for q8_0, where a wrong tensor layout gives ~100%.
    rel = np.linalg.norm(ours - theirs) / np.linalg.norm(ours)
    assert rel < {"f16": 0.01, "q8_0": 0.15}[outtype], f"{outtype}: llama.cpp's logits are {rel:.1%} off ours"
    assert np.abs(ours - theirs).max() > 1e-6  # the weights really were rounded
