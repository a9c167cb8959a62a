"""Hugging Face folders: export a checkpoint so ``transformers`` loads it with no custom code,
and import a local GPT-2 or Llama folder as a checkpoint.

Weight names map 1:1 (see :func:`to_hf_state`); the only reshaping is splitting our fused
``c_attn`` into ``q_proj``/``k_proj``/``v_proj`` and SwiGLU's fused ``c_fc`` into
``gate_proj``/``up_proj`` (llama), and transposing for GPT-2's ``Conv1D`` layers (gpt2). Our RoPE
already uses HF's rotate-half layout, so no permutation is needed here (GGUF needs one; see
:mod:`barkgpt.export.gguf`).

This module imports no ``transformers``: the files are plain JSON and safetensors. The parity
tests load the results with ``transformers`` itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from barkgpt.checkpoint import find_checkpoint, load_model, save_checkpoint
from barkgpt.common import BarkError, atomic_dir
from barkgpt.config import GPTConfig
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MixtralForCausalLM": "llama", "GPT2LMHeadModel": "gpt2"}  # HF class -> family
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}  # model_type -> class


def hf_model_type(config: GPTConfig) -> str:
    """The HF ``model_type`` a model exports to: ``mixtral`` for Mixture-of-Experts, else its family."""
    return "mixtral" if config.n_expert else config.family


def hf_architecture(config: GPTConfig) -> str:
    """The HF class a model exports to: Mixtral for Mixture-of-Experts, else by family."""
    return MODEL_TYPES[hf_model_type(config)]


def check_target(out: str | Path, force: bool) -> Path:
    """Refuse to overwrite an existing export target unless ``force``.

    Raises:
        BarkError: ``out`` exists and ``force`` is off.
    """
    out = Path(out)
    if out.exists() and not force:
        raise BarkError(f"{out} already exists; pass --force to replace it or choose another --out")
    return out


# ---- weights ----------------------------------------------------------------------------------


def to_hf_state(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the HF class's (``LlamaForCausalLM`` or ``GPT2LMHeadModel``) tensor names.

    Llama: ``c_attn`` (rows [q; k; v], (nh + 2 nkv) * hs x C) splits into ``q_proj`` (nh*hs x C),
    ``k_proj``/``v_proj`` (nkv*hs x C); ``c_fc`` (rows [gate; up]) into ``gate_proj``/``up_proj``.
    Mixture-of-Experts (Mixtral): ``router`` -> ``block_sparse_moe.gate``; expert ``e``'s slice of
    ``c_fc`` (E, 2I, C) -> ``experts.e.w1`` (gate) and ``w3`` (up), of ``c_proj`` -> ``w2``. These
    are the names transformers 4.x, vLLM and llama.cpp's converter read; transformers 5.x converts
    them on load.
    GPT-2: ``nn.Linear`` weights (out, in) become ``Conv1D`` weights (in, out); a model trained
    with ``bias=False`` gets zero biases, which HF's GPT-2 always has. A tied ``lm_head`` is left
    out (``tie_word_embeddings`` restores it).
    """
    c, sd, out = config, state, {}
    b = ("weight", "bias") if c.bias else ("weight",)
    if c.family == "llama":
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        out["model.embed_tokens.weight"] = sd["transformer.wte.weight"]
        for i in range(c.n_layer):
            p, h = f"transformer.h.{i}.", f"model.layers.{i}."
            out[h + "input_layernorm.weight"] = sd[p + "ln_1.weight"]
            out[h + "post_attention_layernorm.weight"] = sd[p + "ln_2.weight"]
            for s in b:
                out[h + f"self_attn.q_proj.{s}"], out[h + f"self_attn.k_proj.{s}"], out[h + f"self_attn.v_proj.{s}"] = sd[
                    p + f"attn.c_attn.{s}"
                ].split([q, kv, kv], dim=0)
                out[h + f"self_attn.o_proj.{s}"] = sd[p + f"attn.c_proj.{s}"]
            if c.n_expert:
                out[h + "block_sparse_moe.gate.weight"] = sd[p + "mlp.router.weight"]
                for e in range(c.n_expert):
                    x = h + f"block_sparse_moe.experts.{e}."
                    out[x + "w1.weight"], out[x + "w3.weight"] = sd[p + "mlp.c_fc"][e].chunk(2, dim=0)
                    out[x + "w2.weight"] = sd[p + "mlp.c_proj"][e]
            else:
                for s in b:
                    out[h + f"mlp.gate_proj.{s}"], out[h + f"mlp.up_proj.{s}"] = sd[p + f"mlp.c_fc.{s}"].chunk(2, dim=0)
                    out[h + f"mlp.down_proj.{s}"] = sd[p + f"mlp.c_proj.{s}"]
        out["model.norm.weight"] = sd["transformer.ln_f.weight"]
    else:

        def bias(name: str, n: int) -> torch.Tensor:
            return sd[name] if name in sd else torch.zeros(n, dtype=sd["transformer.wte.weight"].dtype)

        out["transformer.wte.weight"] = sd["transformer.wte.weight"]
        out["transformer.wpe.weight"] = sd["transformer.wpe.weight"]
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[p + f"{ln}.weight"] = sd[p + f"{ln}.weight"]
                out[p + f"{ln}.bias"] = bias(p + f"{ln}.bias", c.n_embd)
            for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                w = sd[p + f"{lin}.weight"]
                out[p + f"{lin}.weight"] = w.t()
                out[p + f"{lin}.bias"] = bias(p + f"{lin}.bias", w.size(0))
        out["transformer.ln_f.weight"] = sd["transformer.ln_f.weight"]
        out["transformer.ln_f.bias"] = bias("transformer.ln_f.bias", c.n_embd)
    if not c.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def from_hf_state(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_hf_state`: HF tensor names -> ours (``lm_head`` left out when tied).

    Accepts GPT-2 names with or without the ``transformer.`` prefix (the original GPT-2 files
    lack it) and ignores the attention-mask buffers old GPT-2 files carry.

    Raises:
        BarkError: a tensor the architecture needs is missing.
    """
    c = config
    if c.family == "gpt2":
        hf = {(k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k): v for k, v in hf.items()}

    def get(name: str) -> torch.Tensor:
        if name not in hf:
            raise BarkError(
                f"the Hugging Face weights lack {name}; the folder is incomplete or not a standard {hf_architecture(c)}"
            )
        return hf[name]

    out: dict[str, torch.Tensor] = {}
    b = ("weight", "bias") if c.bias else ("weight",)
    if c.family == "llama":
        out["transformer.wte.weight"] = get("model.embed_tokens.weight")
        for i in range(c.n_layer):
            p, h = f"transformer.h.{i}.", f"model.layers.{i}."
            out[p + "ln_1.weight"] = get(h + "input_layernorm.weight")
            out[p + "ln_2.weight"] = get(h + "post_attention_layernorm.weight")
            for s in b:
                out[p + f"attn.c_attn.{s}"] = torch.cat([get(h + f"self_attn.{x}_proj.{s}") for x in "qkv"], dim=0)
                out[p + f"attn.c_proj.{s}"] = get(h + f"self_attn.o_proj.{s}")
            if not c.n_expert:
                for s in b:
                    out[p + f"mlp.c_fc.{s}"] = torch.cat([get(h + f"mlp.gate_proj.{s}"), get(h + f"mlp.up_proj.{s}")], dim=0)
                    out[p + f"mlp.c_proj.{s}"] = get(h + f"mlp.down_proj.{s}")
            elif h + "mlp.experts.gate_up_proj" in hf:  # transformers 5.x's fused layout is ours
                out[p + "mlp.router.weight"] = get(h + "mlp.gate.weight")
                out[p + "mlp.c_fc"] = get(h + "mlp.experts.gate_up_proj")
                out[p + "mlp.c_proj"] = get(h + "mlp.experts.down_proj")
            else:
                x = h + "block_sparse_moe."
                out[p + "mlp.router.weight"] = get(x + "gate.weight")
                out[p + "mlp.c_fc"] = torch.stack(
                    [torch.cat([get(x + f"experts.{e}.w1.weight"), get(x + f"experts.{e}.w3.weight")]) for e in range(c.n_expert)]
                )
                out[p + "mlp.c_proj"] = torch.stack([get(x + f"experts.{e}.w2.weight") for e in range(c.n_expert)])
        out["transformer.ln_f.weight"] = get("model.norm.weight")
    else:
        out["transformer.wte.weight"] = get("transformer.wte.weight")
        out["transformer.wpe.weight"] = get("transformer.wpe.weight")
        for i in range(c.n_layer):
            p = f"transformer.h.{i}."
            for ln in ("ln_1", "ln_2"):
                out[p + f"{ln}.weight"], out[p + f"{ln}.bias"] = get(p + f"{ln}.weight"), get(p + f"{ln}.bias")
            for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
                out[p + f"{lin}.weight"] = get(p + f"{lin}.weight").t()
                out[p + f"{lin}.bias"] = get(p + f"{lin}.bias")
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = (
            get("transformer.ln_f.weight"),
            get("transformer.ln_f.bias"),
        )
    if not c.tie_embeddings:
        out["lm_head.weight"] = get("lm_head.weight")
    return {k: v.float().contiguous() for k, v in out.items()}


# ---- configs ----------------------------------------------------------------------------------


def hf_config(config: GPTConfig, tokenizer: Tokenizer) -> dict:
    """The HF ``config.json`` for a model: every size field explicit, readable by transformers 4.x
    (``rope_theta``) and 5.x (``rope_parameters``)."""
    c = config
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    common = {
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        "initializer_range": 0.02,
        **ids,
    }
    arch = {"architectures": [hf_architecture(c)], "model_type": hf_model_type(c)}
    moe = (
        {
            "num_local_experts": c.n_expert,
            "num_experts_per_tok": c.n_expert_per_token,
            "router_aux_loss_coef": c.router_aux_loss_coef,
            "output_router_logits": False,
            "sliding_window": None,
        }
        if c.n_expert
        else {}
    )
    if c.family == "llama":
        return {
            **arch,
            "hidden_size": c.n_embd,
            "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head,
            "head_dim": c.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": c.block_size,
            "rms_norm_eps": c.norm_eps,
            "rope_theta": c.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "attention_bias": c.bias,
            "mlp_bias": c.bias,
            "attention_dropout": 0.0,
            **common,
            **moe,
        }
    return {
        **arch,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.intermediate_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        **common,
    }


def gpt_config_from_hf(hf: dict) -> GPTConfig:
    """An HF ``config.json`` dict (GPT-2 or Llama) -> :class:`GPTConfig`.

    Raises:
        BarkError: an unsupported architecture (named, with the supported ones) or a feature we
            do not implement (rope scaling, another activation, mixed biases).
    """
    arch = (hf.get("architectures") or [MODEL_TYPES.get(hf.get("model_type"), hf.get("model_type"))])[0]
    if arch not in ARCHITECTURES:
        raise BarkError(f"unsupported architecture {arch!r}; barkgpt imports {', '.join(ARCHITECTURES)}")
    family = ARCHITECTURES[arch]
    mixtral = arch == MODEL_TYPES["mixtral"]
    tie = hf.get("tie_word_embeddings", family == "gpt2")
    if family == "llama":
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BarkError(
                f"rope scaling {rope.get('rope_type', rope.get('type'))!r} is not supported; barkgpt imports plain RoPE models"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise BarkError(f"hidden_act {hf['hidden_act']!r} is not supported; barkgpt's llama family uses silu (SwiGLU)")
        bias = bool(hf.get("attention_bias", False))
        if mixtral and bias:
            raise BarkError("a Mixtral with attention biases is not supported")
        window = hf.get("sliding_window")
        if window and window < hf.get("max_position_embeddings", 2048):
            raise BarkError(f"sliding-window attention ({window} tokens) is not supported; barkgpt attends to the whole context")
        if not mixtral and bool(hf.get("mlp_bias", False)) != bias:
            raise BarkError("attention_bias and mlp_bias differ; barkgpt models have one bias setting for every layer")
        n_head = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
            raise BarkError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads; not supported")
        return GPTConfig(
            family="llama",
            vocab_size=hf["vocab_size"],
            block_size=hf.get("max_position_embeddings", 2048),
            n_layer=hf["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=hf.get("num_key_value_heads") or n_head,
            n_embd=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            bias=bias,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_embeddings=tie,
            **(
                {
                    "n_expert": hf["num_local_experts"],
                    "n_expert_per_token": hf.get("num_experts_per_tok", 2),
                    "router_aux_loss_coef": hf.get("router_aux_loss_coef", 0.01),
                }
                if mixtral
                else {}
            ),
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise BarkError(f"activation_function {act!r} is not supported; barkgpt's gpt2 family uses gelu_new")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise BarkError(
            "this GPT-2 scales attention differently (scale_attn_by_inverse_layer_idx / scale_attn_weights); not supported"
        )
    n_embd = hf.get("n_embd", hf.get("hidden_size"))
    return GPTConfig(
        family="gpt2",
        vocab_size=hf["vocab_size"],
        block_size=hf.get("n_positions", 1024),
        n_layer=hf["n_layer"],
        n_head=hf["n_head"],
        n_embd=n_embd,
        intermediate_size=hf.get("n_inner") or 4 * n_embd,
        bias=True,
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=tie,
    )


# ---- export -----------------------------------------------------------------------------------


def export_hf(model_path: str | Path, out: str | Path, force: bool = False, sample: bool = True) -> Path:
    """Write a Hugging Face folder for a checkpoint.

    Files: ``config.json``, ``model.safetensors`` (fp32, HF names, metadata ``format: pt``),
    ``generation_config.json``, ``tokenizer.json``, ``tokenizer_config.json``
    (``PreTrainedTokenizerFast``, special tokens, Jinja ``chat_template``),
    ``special_tokens_map.json`` and a ``README.md`` model card.

    Args:
        model_path: a run folder (``best/`` preferred) or a checkpoint folder.
        out: the folder to create, atomically.
        force: replace ``out`` if it exists.
        sample: put a short generated sample into the model card.

    Returns:
        ``out``.

    Raises:
        BarkError: ``out`` exists without ``force``, or the checkpoint is missing or corrupt.
    """
    from safetensors.torch import save_file

    out = check_target(out, force)
    ckpt = find_checkpoint(model_path)
    model, info = load_model(ckpt)
    tokenizer = Tokenizer.load(ckpt)
    tokenizer.model_max_length = model.config.block_size
    card = model_card(model, tokenizer, info, Path(model_path), sample)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(model.config, tokenizer), indent=2) + "\n", encoding="utf-8")
        save_file(to_hf_state(model.state_dict(), model.config), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        gen = {"bos_token_id": tokenizer.bos_id, "eos_token_id": [tokenizer.eos_id], "pad_token_id": tokenizer.pad_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
        tokenizer.save(tmp)
        special = {
            "bos_token": tokenizer.bos_token,
            "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token,
            "unk_token": tokenizer.unk_token,
        }
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def model_card(model: GPT, tokenizer: Tokenizer, info: dict, source: Path, sample: bool = True) -> str:
    """A ``README.md`` for an export: data source and hash, steps, tokens seen, val loss, a sample
    (64 tokens at temperature 0.8, seed 0, from an empty prompt: a new document after ``<EOS>``,
    which suits every tokenizer kind and vocabulary), and how to load it."""
    c, data = model.config, info.get("data") or {}
    arch = hf_architecture(c)
    val = info.get("val_loss")
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [barkgpt]",
        "---",
        "",
        f"# {source.resolve().name}",
        "",
        f"A {model.num_params() / 1e6:.2f}M-parameter `{arch}` trained from scratch with "
        "[BarkGPT](https://github.com/barkgpt/barkgpt).",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {arch}: {c.n_layer} layers, {c.n_head} heads ({c.n_kv_head} key/value), width {c.n_embd}, context {c.block_size} tokens"
        + (f", {c.n_expert} experts (top-{c.n_expert_per_token})" if c.n_expert else "")
        + " |",
        f"| tokenizer | {tokenizer.kind}, {tokenizer.vocab_size} tokens |",
        f"| data | {data.get('source', 'unknown')} (sha256 {data.get('source_sha256') or 'unknown'}) |",
        f"| steps | {info.get('step', 'unknown')} |",
        f"| tokens seen | {info.get('tokens_seen', 'unknown'):,} |"
        if isinstance(info.get("tokens_seen"), int)
        else "| tokens seen | unknown |",
        f"| val loss | {val:.4f} |" if isinstance(val, (int, float)) else "| val loss | unknown |",
        "",
    ]
    if sample:
        from barkgpt.generate import TextGenerator

        text = TextGenerator(model, tokenizer).generate("", max_new_tokens=64, temperature=0.8, seed=0)
        lines += ["## Sample", "", "A new document (empty prompt), 64 tokens at temperature 0.8:", "", "```", text, "```", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tok = AutoTokenizer.from_pretrained('PATH')",
        "model = AutoModelForCausalLM.from_pretrained('PATH')",
        "ids = tok(tok.eos_token, return_tensors='pt').input_ids  # a new document; or your prompt",
        "print(tok.decode(model.generate(ids, max_new_tokens=40, do_sample=True)[0]))",
        "```",
        "",
        "Or serve it: `vllm serve PATH`, or convert with `barkgpt export gguf` for llama.cpp.",
        "",
    ]
    return "\n".join(lines)


# ---- import -----------------------------------------------------------------------------------


def resolve_hf_folder(source: str | Path) -> Path:
    """A local folder, or a Hub name (``org/name``) downloaded with ``huggingface_hub`` when reachable.

    Raises:
        BarkError: not a folder and the Hub download failed (offline, unknown name).
    """
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise BarkError(f"{path} is a file; pass the Hugging Face model folder that holds config.json")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as e:  # noqa: BLE001 - any hub failure means: not available here
        raise BarkError(
            f"{source} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(e).__name__}); download it elsewhere and pass its local path"
        ) from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: ``model.safetensors``, a sharded index, or ``pytorch_model.bin``.

    Raises:
        BarkError: no weights file, or an unreadable one.
    """
    from safetensors.torch import load_file

    try:
        if (folder / "model.safetensors").is_file():
            return load_file(str(folder / "model.safetensors"))
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                state.update(load_file(str(folder / shard)))
            return state
        if (folder / "pytorch_model.bin").is_file():
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a corrupt file of any kind
        raise BarkError(f"the weights in {folder} are unreadable ({type(e).__name__}); re-download the model") from None
    raise BarkError(f"no weights in {folder} (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def import_hf(source: str | Path, out: str | Path, force: bool = False) -> Path:
    """Turn a Hugging Face GPT-2 or Llama folder into a barkgpt checkpoint folder at ``out``.

    The result works with ``sample``, ``chat``, ``serve``, ``export`` and ``train --init-from``.
    The tokenizer must come as ``tokenizer.json`` (a fast tokenizer); its special tokens are read
    from ``tokenizer_config.json``.

    Raises:
        BarkError: ``out`` exists without ``force``; missing ``config.json``/weights/tokenizer;
            an unsupported architecture; weights that do not fit the config.
    """
    out = check_target(out, force)
    folder = resolve_hf_folder(source)
    if not (folder / "config.json").is_file():
        raise BarkError(f"no config.json in {folder}; pass a Hugging Face model folder")
    try:
        hf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise BarkError(f"{folder / 'config.json'} is not valid JSON ({e})") from None
    config = gpt_config_from_hf(hf)
    state = from_hf_state(read_hf_weights(folder), config)
    model = GPT(config)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise BarkError(f"the weights in {folder} do not fit its config.json ({str(e).splitlines()[1].strip()[:120]})") from None
    if set(missing) - ({"lm_head.weight"} if config.tie_embeddings else set()) or unexpected:
        raise BarkError(f"the weights in {folder} do not fit its config.json")
    if not (folder / "tokenizer.json").is_file():
        raise BarkError(
            f"no tokenizer.json in {folder}; barkgpt needs the fast tokenizer file (save it with transformers' AutoTokenizer.save_pretrained)"
        )
    tokenizer = Tokenizer.load(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise BarkError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}")
    tokenizer.model_max_length = config.block_size
    save_checkpoint(out, model, tokenizer, info={"imported_from": str(source), "architecture": hf_architecture(config)})
    return out
