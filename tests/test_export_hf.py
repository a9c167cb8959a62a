"""Hugging Face export and import, checked against real ``transformers`` (no mocks).

Exports of both families and all three tokenizer kinds must load with ``AutoModelForCausalLM`` and
``AutoTokenizer`` (no ``trust_remote_code``), give our fp32 logits within 1e-4, the same 32 greedy
tokens, the same tokenization and the same chat text. Imports of tiny random HF models built here
(no download) must give HF's logits in our model.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the export extra (transformers) is not installed")

from barkgpt.checkpoint import load_checkpoint, save_checkpoint
from barkgpt.cli import main
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig
from barkgpt.export.hf import export_hf, import_hf
from barkgpt.generate import TextGenerator
from barkgpt.model import GPT
from barkgpt.tokenizer import Tokenizer

SAMPLES = [
    "ROMEO: what light through yonder window breaks?",
    "Café naïve 東京 🐶 <EOS> woof  spaces\n\nnew lines",
    "The quick brown fox. 12345 #@$%",
    "User: speak Assistant: woof arf <EOS>",
]


def randomize(model: GPT, seed: int = 0) -> GPT:
    """Give a model decisive random weights (std 0.3, norms near 1) so greedy decoding has no ties."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:
                p.copy_(1 + torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizers_by_kind(tiny_text):
    """One trained tokenizer per kind; the word one is Bark's fixed vocabulary."""
    from barkgpt.bark import bark_tokenizer

    return {
        "bpe": Tokenizer.train("bpe", [tiny_text], 320),
        "char": Tokenizer.train("char", [tiny_text]),
        "word": bark_tokenizer(),
    }


def make_checkpoint(tmp_path, family: str, tokenizer: Tokenizer, tie: bool = True) -> tuple:
    cfg = GPTConfig(
        family=family,
        vocab_size=tokenizer.vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2 if family == "llama" else None,
        n_embd=32,
        tie_embeddings=tie,
    )
    model = randomize(GPT(cfg))
    path = tmp_path / f"ckpt-{family}"
    save_checkpoint(
        path,
        model,
        tokenizer,
        info={"step": 7, "tokens_seen": 1234, "val_loss": 2.5, "data": {"source": "tiny.txt", "source_sha256": "ab" * 32}},
    )
    return path, model


def load_hf(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        tok = transformers.AutoTokenizer.from_pretrained(path)
    return model, tok


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "fetch",
            "description": "Fetch an item — for the dog <fast>",
            "parameters": {
                "type": "object",
                "properties": {"item": {"type": "string", "enum": ["ball", "stick"]}},
                "required": ["item"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "bark", "parameters": {"type": "object", "properties": {"times": {"type": "integer"}}}},
    },
]
TOOL_TALK = [
    {"role": "system", "content": "You are a dog."},
    {"role": "user", "content": "Get the ball, then bark twice"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "fetch", "arguments": '{"item": "ball"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "bark", "arguments": {"times": 2}}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "name": "fetch", "content": "got the ball"},
    {"role": "tool", "tool_call_id": "call_2", "name": "bark", "content": "woof woof"},
    {"role": "assistant", "content": "Here is the ball. Woof!"},
    {"role": "user", "content": "Thanks"},
]


@pytest.mark.parametrize("chat_tokens", [False, True], ids=["plain", "chat-tokens"])
def test_export_chat_template_with_tools_matches_transformers(tmp_path, tokenizers_by_kind, chat_tokens):
    """transformers' apply_chat_template(messages, tools=...) on the export renders what we render."""
    tokenizer = tokenizers_by_kind["bpe"]
    if chat_tokens:
        tokenizer, _ = tokenizer.with_chat_tokens()
    ckpt, _ = make_checkpoint(tmp_path, "llama", tokenizer)
    _, hf_tok = load_hf(export_hf(ckpt, tmp_path / "hf", sample=False))
    for messages, tools in [(TOOL_TALK, TOOLS), (TOOL_TALK[1:], TOOLS), (TOOL_TALK[1:3], TOOLS[:1]), (TOOL_TALK, None)]:
        for prompt in (True, False):
            ours = tokenizer.apply_chat_template(messages, add_generation_prompt=prompt, tools=tools)
            theirs = hf_tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=prompt)
            assert theirs == ours
            assert hf_tok(ours)["input_ids"] == tokenizer.encode(ours)
    assert '<tool_call>{"name": "fetch", "arguments": {"item": "ball"}}</tool_call>' in ours
    assert "# Tools" not in ours  # tools=None: no tools section


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_parity(tmp_path, tokenizers_by_kind, family, kind):
    tokenizer = tokenizers_by_kind[kind]
    ckpt, model = make_checkpoint(tmp_path, family, tokenizer, tie=kind != "char")  # char: untied head
    out = export_hf(ckpt, tmp_path / "hf")
    hf_model, hf_tok = load_hf(out)
    assert type(hf_model).__name__ == {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]

    for text in SAMPLES:  # same ids, same text back
        ids = tokenizer.encode(text)
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == tokenizer.decode(ids)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "speak"},
        {"role": "assistant", "content": "woof"},
        {"role": "user", "content": "speak"},
    ]
    assert hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == tokenizer.apply_chat_template(
        messages
    )

    # a batch of prompts: fp32 logits at every position within 1e-4
    stream = tokenizer.encode(" ".join(SAMPLES) * 4)
    batch = torch.tensor([stream[i * 20 : i * 20 + 24] for i in range(3)])
    with torch.no_grad():
        ours, _ = model(batch, targets=batch)
        theirs = hf_model(batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4

    # 32 greedy tokens: transformers' generate against our KV-cache engine
    prompt = batch[0, :16].tolist()
    steps = TextGenerator(model, tokenizer).engine.generate(prompt, max_new_tokens=32, temperature=0.0, stop_ids=[])
    ours_gen = [s[0] for s in steps]
    theirs_gen = hf_model.generate(
        torch.tensor([prompt]),
        max_new_tokens=32,
        min_new_tokens=32,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=tokenizer.pad_id,
    )[0, 16:].tolist()
    assert len(ours_gen) == 32 and ours_gen == theirs_gen


def test_mixture_of_experts_exports_to_mixtral(tmp_path, tokenizers_by_kind):
    tokenizer = tokenizers_by_kind["bpe"]
    cfg = GPTConfig(
        vocab_size=tokenizer.vocab_size,
        block_size=64,
        n_layer=2,
        n_head=4,
        n_kv_head=2,
        n_embd=32,
        intermediate_size=48,
        n_expert=4,
        n_expert_per_token=2,
    )
    model = randomize(GPT(cfg))
    save_checkpoint(tmp_path / "moe", model, tokenizer)
    hf_model, _ = load_hf(export_hf(tmp_path / "moe", tmp_path / "hf"))
    assert type(hf_model).__name__ == "MixtralForCausalLM" and hf_model.config.num_local_experts == 4
    ids = torch.tensor([tokenizer.encode(s)[:12] for s in SAMPLES[:3]])
    with torch.no_grad():
        assert (model(ids, targets=ids)[0] - hf_model(ids).logits).abs().max().item() < 1e-4
        theirs = hf_model.generate(
            ids[:1], max_new_tokens=32, min_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, 12:].tolist()
    assert [
        s[0]
        for s in TextGenerator(model, tokenizer).engine.generate(ids[0].tolist(), max_new_tokens=32, temperature=0.0, stop_ids=[])
    ] == theirs
    # transformers 5 saves experts in its own layout (or 4.x's): either imports back to the same logits
    hf_model.save_pretrained(tmp_path / "resaved")
    tokenizer.save(tmp_path / "resaved")
    again, _, _ = load_checkpoint(import_hf(tmp_path / "resaved", tmp_path / "imported"))
    assert again.config.n_expert == 4
    with torch.no_grad():
        assert (again(ids, targets=ids)[0] - hf_model(ids).logits).abs().max().item() < 1e-4


def test_export_files(tmp_path, tokenizers_by_kind):
    from safetensors import safe_open

    ckpt, _ = make_checkpoint(tmp_path, "llama", tokenizers_by_kind["bpe"])
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    for key in (
        "architectures",
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "torch_dtype",
    ):
        assert key in config, key
    assert config["rope_parameters"]["rope_theta"] == config["rope_theta"] and config["num_key_value_heads"] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert "model.layers.1.self_attn.k_proj.weight" in f.keys()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [1]
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in tok_cfg
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<EOS>"
    card = (out / "README.md").read_text()
    assert "ab" * 32 in card and "| steps | 7 |" in card and "1,234" in card and "2.5000" in card and "## Sample" in card


def hf_gpt2_tokenizer(tiny_text, folder):
    """A GPT-2-style tokenizer folder whose only special token is <|endoftext|> (as openai-community/gpt2)."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        [tiny_text],
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tk.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "GPT2Tokenizer",
                "bos_token": "<|endoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": {"content": "<|endoftext|>", "special": True},
                "model_max_length": 1024,
            }
        )
    )
    return tk.get_vocab_size()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_parity(tmp_path, tiny_text, family):
    src = tmp_path / "src"
    vocab = hf_gpt2_tokenizer(tiny_text, src)
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
        hf_model = transformers.GPT2LMHeadModel(cfg)
    else:  # untied head, grouped-query attention, a non-default rope_theta
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            rope_theta=5000.0,
            rms_norm_eps=1e-6,
            bos_token_id=0,
            eos_token_id=0,
        )
        hf_model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in hf_model.parameters():  # HF initialises norms to 1 and biases to 0: make them matter
            p.add_(torch.randn_like(p) * 0.1)
    hf_model.eval().save_pretrained(src)

    out = import_hf(src, tmp_path / "imported")
    model, tokenizer, _ = load_checkpoint(out)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_id == 0 and tokenizer.pad_id == 0
    ids = torch.tensor([tokenizer.encode(s)[:12] for s in SAMPLES[:3]])
    with torch.no_grad():
        assert (model(ids, targets=ids)[0] - hf_model(ids).logits).abs().max().item() < 1e-4

    # and back out again: the round trip gives HF's logits too
    again, _ = load_hf(export_hf(out, tmp_path / "again"))
    with torch.no_grad():
        assert (again(ids).logits - hf_model(ids).logits).abs().max().item() < 1e-4


def test_import_then_finetune(tmp_path, tiny_text, capsys):
    src = tmp_path / "src"
    vocab = hf_gpt2_tokenizer(tiny_text, src)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    ).save_pretrained(src)
    assert main(["import", "hf", "--model", str(src), "--out", str(tmp_path / "imp")]) == 0
    (tmp_path / "text.txt").write_text(tiny_text)
    assert (
        main(
            [
                "prepare",
                "--input",
                str(tmp_path / "text.txt"),
                "--out",
                str(tmp_path / "data"),
                "--tokenizer-from",
                str(tmp_path / "imp"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "data"),
                "--init-from",
                str(tmp_path / "imp"),
                "--out-dir",
                str(tmp_path / "run"),
                "--max-iters",
                "3",
                "--eval-interval",
                "3",
                "--eval-iters",
                "1",
                "--batch-size",
                "2",
                "--warmup-iters",
                "1",
                "--compile",
                "false",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert main(["sample", "--model", str(tmp_path / "run"), "--max-new-tokens", "5", "--device", "cpu"]) == 0


def test_bad_input(tmp_path, tokenizers_by_kind, capsys):
    ckpt, _ = make_checkpoint(tmp_path, "gpt2", tokenizers_by_kind["word"])
    (tmp_path / "taken").mkdir()
    assert main(["export", "hf", "--model", str(ckpt), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert main(["export", "hf", "--model", str(ckpt), "--out", str(tmp_path / "taken"), "--force"]) == 0
    assert (tmp_path / "taken" / "model.safetensors").is_file()

    (tmp_path / "empty").mkdir()
    assert main(["export", "hf", "--model", str(tmp_path / "empty"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint" in capsys.readouterr().err and not (tmp_path / "x").exists()

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    assert main(["import", "hf", "--model", str(bert), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "'BertForMaskedLM'" in err and "GPT2LMHeadModel" in err and "LlamaForCausalLM" in err
    assert not (tmp_path / "y").exists()
    with pytest.raises(BarkError, match="not a local folder"):
        import_hf(str(tmp_path / "nowhere" / "model"), tmp_path / "z")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left behind
