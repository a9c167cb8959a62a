"""GGUF export for llama.cpp, written with the ``gguf`` package's ``GGUFWriter``.

The tensor names and metadata keys are llama.cpp's (``gguf.constants``; its
``convert_hf_to_gguf.py`` is the public reference). Two details matter:

- **RoPE layout.** Our llama family rotates HF-style halves (``rotate_half``); llama.cpp's
  ``llama`` architecture rotates adjacent pairs. Rows of ``attn_q`` and ``attn_k`` are therefore
  permuted per head, ``(n, 2, hs/2, C) -> (n, hs/2, 2, C)`` (:func:`permute_rope`), with ``n``
  the key/value head count for K. The parity test fails without it.
- **Tokenizer.** Only byte-level BPE maps faithfully: ``tokenizer.ggml.model = gpt2`` with
  ``tokenizer.ggml.pre = gpt-2``, whose split regex is exactly the GPT-2 regex our
  ``ByteLevel`` pre-tokenizer uses. llama.cpp has no word- or character-level tokenizer, so those
  kinds are refused with the fix (``--tokenizer bpe``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from barkgpt.checkpoint import find_checkpoint, load_model
from barkgpt.common import BarkError, atomic_write_via
from barkgpt.config import GPTConfig
from barkgpt.export.hf import check_target
from barkgpt.tokenizer import Tokenizer

OUTTYPES = ("f32", "f16", "q8_0")
GGUF_PRE = "gpt-2"  # llama.cpp's name for the GPT-2 pre-tokenizer regex


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Reorder the rows of a Q or K projection, (n_head * hs, C) (or a bias, (n_head * hs,)),
    from HF's rotate-half RoPE layout to llama.cpp's adjacent-pair layout.

    Within each head, rows ``[0..hs/2)`` and ``[hs/2..hs)`` are interleaved so that row pairs
    ``(i, i + hs/2)`` become ``(2i, 2i + 1)``; the same permutation as llama.cpp's converter.
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> llama.cpp tensor names (``token_embd``, ``blk.N.attn_q``...), fp32.

    Shapes stay PyTorch's (out, in); GGUF stores them reversed, as llama.cpp expects. The llama
    family's Q/K rows go through :func:`permute_rope`. Mixture-of-Experts layers become llama.cpp's Mixtral tensors:
    ``ffn_gate_inp`` (the router) and ``ffn_{gate,up,down}_exps`` stacked over experts. The gpt2 family keeps the fused ``attn_qkv`` and always carries an
    ``output`` tensor (llama.cpp's gpt2 loader wants one).
    """
    c, sd, out = config, state, {}
    b = ("weight", "bias") if c.bias else ("weight",)
    out["token_embd.weight"] = sd["transformer.wte.weight"]
    if c.family == "llama":
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        for i in range(c.n_layer):
            p, g = f"transformer.h.{i}.", f"blk.{i}."
            out[g + "attn_norm.weight"] = sd[p + "ln_1.weight"]
            out[g + "ffn_norm.weight"] = sd[p + "ln_2.weight"]
            for s in b:
                wq, wk, wv = sd[p + f"attn.c_attn.{s}"].split([q, kv, kv], dim=0)
                wq, wk = permute_rope(wq, c.n_head), permute_rope(wk, c.n_kv_head)
                out[g + f"attn_q.{s}"], out[g + f"attn_k.{s}"], out[g + f"attn_v.{s}"] = wq, wk, wv
                out[g + f"attn_output.{s}"] = sd[p + f"attn.c_proj.{s}"]
                if not c.n_expert:
                    out[g + f"ffn_gate.{s}"], out[g + f"ffn_up.{s}"] = sd[p + f"mlp.c_fc.{s}"].chunk(2, dim=0)
                    out[g + f"ffn_down.{s}"] = sd[p + f"mlp.c_proj.{s}"]
            if c.n_expert:  # Mixtral in llama.cpp: arch llama with stacked expert tensors
                out[g + "ffn_gate_inp.weight"] = sd[p + "mlp.router.weight"]  # (E, C)
                out[g + "ffn_gate_exps.weight"], out[g + "ffn_up_exps.weight"] = sd[p + "mlp.c_fc"].chunk(2, dim=1)  # (E, I, C)
                out[g + "ffn_down_exps.weight"] = sd[p + "mlp.c_proj"]  # (E, C, I)
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        if not c.tie_embeddings:
            out["output.weight"] = sd["lm_head.weight"]
    else:
        out["position_embd.weight"] = sd["transformer.wpe.weight"]
        names = {
            "ln_1": "attn_norm",
            "ln_2": "ffn_norm",
            "attn.c_attn": "attn_qkv",
            "attn.c_proj": "attn_output",
            "mlp.c_fc": "ffn_up",
            "mlp.c_proj": "ffn_down",
        }
        for i in range(c.n_layer):
            for ours, theirs in names.items():
                for s in ("weight", "bias"):
                    key = f"transformer.h.{i}.{ours}.{s}"
                    if key in sd:
                        out[f"blk.{i}.{theirs}.{s}"] = sd[key]
                    elif s == "bias":  # llama.cpp's gpt2 expects biases: zeros for a bias-free model
                        out[f"blk.{i}.{theirs}.{s}"] = torch.zeros(sd[f"transformer.h.{i}.{ours}.weight"].shape[0])
        out["output_norm.weight"] = sd["transformer.ln_f.weight"]
        out["output_norm.bias"] = sd.get("transformer.ln_f.bias", torch.zeros(c.n_embd))
        out["output.weight"] = sd["lm_head.weight"] if "lm_head.weight" in sd else sd["transformer.wte.weight"]
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def _encode_tensor(t: torch.Tensor, outtype: str):
    """(numpy data, raw quant type or None) for one tensor: 1-D tensors stay f32, as llama.cpp's
    converter keeps them; q8_0 needs rows that are a multiple of 32 and falls back to f16."""
    import gguf

    a = t.numpy()
    if a.ndim == 1 or outtype == "f32":
        return a.astype(np.float32), None
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return a.astype(np.float16), None


def check_tokenizer(tokenizer: Tokenizer) -> dict:
    """The BPE model of a tokenizer that llama.cpp can represent, from its ``tokenizer.json``.

    Raises:
        BarkError: a word- or char-level tokenizer (llama.cpp has neither), or a BPE whose
            pre-tokenizer is not the byte-level GPT-2 one.
    """
    if tokenizer.kind != "bpe":
        raise BarkError(
            f"llama.cpp has no {tokenizer.kind}-level tokenizer, so this model cannot be exported to GGUF; "
            f"train it on data prepared with --tokenizer bpe (or export it with `barkgpt export hf`)"
        )
    spec = tokenizer.spec()
    pre = spec.get("pre_tokenizer") or {}
    pres = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if not any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in pres) or len(pres) != 1:
        raise BarkError(
            "this BPE tokenizer does not split text with GPT-2's byte-level regex, which is the only BPE "
            "pre-tokenizer barkgpt can map to llama.cpp faithfully; export it with `barkgpt export hf`"
        )
    return spec


def export_gguf(model_path: str | Path, out: str | Path, outtype: str = "f16", force: bool = False) -> Path:
    """Write a GGUF file that llama.cpp (``llama-cli``, ``llama-server``, ``llama-cpp-python``) runs.

    Args:
        model_path: a run folder (``best/`` preferred) or a checkpoint folder.
        out: the ``.gguf`` file to write (via a temporary file and a rename).
        outtype: ``f32``, ``f16`` or ``q8_0`` for the 2-D weights (norms and biases stay f32).
        force: replace ``out`` if it exists.

    Returns:
        ``out``.

    Raises:
        BarkError: an unknown ``outtype``, ``out`` exists without ``force``, a missing or corrupt
            checkpoint, or a tokenizer llama.cpp cannot represent.
    """
    import gguf

    if outtype not in OUTTYPES:
        raise BarkError(f"unknown --outtype {outtype!r}; use one of {', '.join(OUTTYPES)}")
    out = check_target(out, force)
    ckpt = find_checkpoint(model_path)
    model, info = load_model(ckpt)
    tokenizer = Tokenizer.load(ckpt)
    spec = check_tokenizer(tokenizer)
    c = model.config
    arch = "llama" if c.family == "llama" else "gpt2"
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[
        outtype
    ]

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_name(Path(model_path).resolve().name)
        w.add_file_type(file_type)
        w.add_context_length(c.block_size)
        w.add_embedding_length(c.n_embd)
        w.add_block_count(c.n_layer)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.n_head)
        w.add_vocab_size(c.vocab_size)
        if c.family == "llama":
            w.add_head_count_kv(c.n_kv_head)
            w.add_rope_dimension_count(c.head_dim)
            w.add_rope_freq_base(c.rope_theta)
            w.add_layer_norm_rms_eps(c.norm_eps)
            if c.n_expert:
                w.add_expert_count(c.n_expert)
                w.add_expert_used_count(c.n_expert_per_token)
        else:
            w.add_layer_norm_eps(c.norm_eps)
        _add_tokenizer(w, tokenizer, spec, c.vocab_size)
        for name, t in gguf_tensors(model.state_dict(), c).items():
            data, raw = _encode_tensor(t, outtype)
            w.add_tensor(name, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_write_via(out, write)
    return out


def _add_tokenizer(w, tokenizer: Tokenizer, spec: dict, vocab_size: int) -> None:
    """Vocabulary, token types, merges, special ids and chat template (``tokenizer.ggml.*``).

    Ids the model has but the tokenizer lacks (a model padded past the vocabulary) become
    unused ``[PADn]`` tokens, as llama.cpp's converter writes them.
    """
    import gguf

    vocab = spec["model"]["vocab"]
    special = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    by_id = {i: tok for tok, i in vocab.items()}
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i]["content"])
            types.append(gguf.TokenType.CONTROL if special[i].get("special", True) else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        raise BarkError("the BPE tokenizer has no merges (trained on too little text?); llama.cpp needs at least one")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(GGUF_PRE)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_unk_token_id(tokenizer.unk_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(tokenizer.chat_template)
