"""The NumPy backend (barkgpt/numpy): hand-written gradients against torch autograd and finite
differences, forward and greedy parity with the torch model, sampling filters, AdamW and the
schedule against torch's, exact resume, the run folder, no torch in its process, and a
NumPy-trained checkpoint loading in torch and exporting to Hugging Face and GGUF."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, SamplingParams, TrainConfig, build_configs
from barkgpt.numpy.generate import Engine, load_generator, process_logits
from barkgpt.numpy.model import GPT as NumpyGPT
from barkgpt.numpy.optim import AdamW, clip_grad_norm, get_lr
from barkgpt.numpy.train import train as numpy_train

# Tiny shapes of both families: llama with grouped-query attention (4 query heads on 2 and on 1
# kv heads, a bias and an untied head in one), gpt2 with and without biases.
SHAPES = {
    "llama-gqa": dict(family="llama", n_head=4, n_kv_head=2),
    "llama-mqa-bias-untied": dict(family="llama", n_head=4, n_kv_head=1, bias=True, tie_embeddings=False),
    "gpt2": dict(family="gpt2", n_head=4),
    "gpt2-nobias-untied": dict(family="gpt2", n_head=2, bias=False, tie_embeddings=False),
}


def pair(shape: dict, dtype=torch.float64, seed: int = 0, **kw) -> tuple:
    """A torch GPT with random weights (norms and biases perturbed too) and the NumPy GPT holding the same."""
    from barkgpt.model import GPT

    cfg = GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_embd=32, **shape, **kw)
    torch.manual_seed(seed)
    tm = GPT(cfg).to(dtype)
    with torch.no_grad():
        for p in tm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    nm = NumpyGPT(cfg, dtype=np.float64 if dtype == torch.float64 else np.float32)
    nm.load_state_dict({k: v.detach().numpy() for k, v in tm.state_dict().items()})
    return tm, nm


def batch(B=3, T=16, V=40, seed=0):
    rng = np.random.default_rng(seed)
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    y[0, :5] = -1  # ignored targets
    return x, y


@pytest.mark.parametrize("name", [*SHAPES, "llama-segments"])
def test_gradients_equal_torch_autograd_in_float64(name):
    from barkgpt.train import SegmentMask

    tm, nm = pair(SHAPES.get(name, SHAPES["llama-gqa"]))
    x, y = batch()
    segments = np.repeat(np.arange(4), 4)[None].repeat(3, 0) if name == "llama-segments" else None  # packed rows
    logits, _ = tm(
        torch.from_numpy(x), torch.from_numpy(y), SegmentMask(torch.from_numpy(segments)) if segments is not None else None
    )
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1), ignore_index=-1)  # float64 throughout
    loss.backward()
    _, np_loss = nm.forward(x, y, segments=segments)
    nm.backward()
    assert abs(np_loss - loss.item()) < 1e-9  # (the RoPE tables are float32 in both, from NumPy and torch sin/cos)
    for n, p in tm.named_parameters():  # every parameter, the tied embedding's two uses summed
        g, ours = p.grad.numpy(), nm.grads[n]
        assert np.abs(ours - g).max() <= 1e-6 * np.abs(g).max(), n


@pytest.mark.parametrize("family,dropout", [("llama", 0.0), ("gpt2", 0.0), ("llama", 0.3), ("gpt2", 0.3)])
def test_gradients_equal_finite_differences(family, dropout):
    cfg = GPTConfig(
        family=family,
        vocab_size=16,
        block_size=8,
        n_layer=1,
        n_head=2,
        n_kv_head=1 if family == "llama" else 2,
        n_embd=8,
        dropout=dropout,
    )
    model = NumpyGPT(cfg, seed=0, dtype=np.float64)
    rng = np.random.default_rng(1)
    model.flat[...] += rng.standard_normal(model.flat.size) * 0.1  # norms and biases away from 1 and 0
    x, y = batch(B=2, T=8, V=16)

    def loss():  # dropout: the same masks on every call (a fresh generator of one seed)
        return model.forward(x, y, rng=np.random.default_rng(7) if dropout else None)[1]

    model.zero_grad()
    loss()
    model.backward()
    for name, p in model.params.items():
        for i in rng.choice(p.size, size=min(3, p.size), replace=False):
            flat = p.reshape(-1)
            old, eps = flat[i], 1e-6
            flat[i] = old + eps
            up = loss()
            flat[i] = old - eps
            down = loss()
            flat[i] = old
            numeric, analytic = (up - down) / (2 * eps), model.grads[name].reshape(-1)[i]
            assert abs(numeric - analytic) <= 1e-6 + 1e-5 * abs(numeric), (name, i, numeric, analytic)


@pytest.mark.parametrize("name", SHAPES)
def test_forward_logits_equal_torch_in_float32(name):
    tm, nm = pair(SHAPES[name], dtype=torch.float32)
    x, y = batch()
    with torch.no_grad():
        theirs = tm(torch.from_numpy(x), torch.from_numpy(y))[0].numpy()
    assert np.abs(nm.forward(x, y)[0] - theirs).max() < 1e-5


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_greedy_kv_cache_decoding_equals_torch_engine_across_the_window_slide(name):
    from barkgpt.engine import Engine as TorchEngine

    tm, nm = pair(SHAPES[name], dtype=torch.float32)
    with torch.no_grad():
        for p in tm.parameters():
            p.mul_(10)  # peaked distributions: no near-ties for the argmax to flip on
    nm.load_state_dict({k: v.numpy() for k, v in tm.state_dict().items()})
    theirs = [s[0] for s in TorchEngine(tm).generate([1, 2, 3], max_new_tokens=40, temperature=0)]
    ours = [s[0] for s in Engine(nm).generate([1, 2, 3], max_new_tokens=40, temperature=0)]  # 43 > block_size 16
    assert ours == theirs


def test_logits_processors_equal_the_torch_engines():
    from barkgpt.engine import Row
    from barkgpt.engine import process_logits as torch_process

    logits = np.random.default_rng(0).standard_normal((1, 50)).astype(np.float32) * 3
    prompt, generated = [1, 2, 3], [4, 4, 5]
    for kw in (
        dict(temperature=0.7, top_k=7),
        dict(temperature=1.3, top_p=0.6),
        dict(temperature=1.0, min_p=0.1),
        dict(temperature=0.9, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4, top_k=20, top_p=0.9),
    ):
        p = SamplingParams(**kw)
        row = Row(prompt, p, seed=0)
        row.generated = list(generated)
        theirs = torch_process(torch.from_numpy(logits), [row]).numpy()
        ours = process_logits(logits, p, [prompt + generated], [generated])
        assert np.array_equal(np.isinf(ours), np.isinf(theirs)), kw
        assert np.allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], atol=1e-6), kw


def test_adamw_schedule_and_clipping_equal_torch():
    from barkgpt.optim import build_optimizers
    from barkgpt.train import get_lr as torch_get_lr

    cfg = TrainConfig(learning_rate=3e-3, min_lr=3e-4, warmup_iters=5, max_iters=30, weight_decay=0.1, grad_clip=0.5)
    assert get_lr is torch_get_lr  # one schedule (common.get_lr) for both trainers; its values:
    assert get_lr(0, cfg) == pytest.approx(3e-3 / 6) and get_lr(4, cfg) == pytest.approx(3e-3 * 5 / 6)
    assert get_lr(5, cfg) == pytest.approx(3e-3) and get_lr(30, cfg) == get_lr(34, cfg) == 3e-4
    assert get_lr(17, cfg) == pytest.approx(3e-4 + 0.5 * (1 + math.cos(math.pi * 12 / 25)) * 2.7e-3)
    tm, nm = pair(SHAPES["llama-mqa-bias-untied"], dtype=torch.float32)
    (opt,) = build_optimizers(tm, cfg, "cpu")
    ours = AdamW(nm, cfg)
    rng = np.random.default_rng(0)
    for step in range(4):
        grads = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p in tm.named_parameters()}
        for n, p in tm.named_parameters():
            p.grad = torch.from_numpy(grads[n].copy())
            nm.grads[n][...] = grads[n]
        torch.nn.utils.clip_grad_norm_(tm.parameters(), cfg.grad_clip)
        clip_grad_norm(nm.flat_grad, cfg.grad_clip)
        for g in opt.param_groups:
            g["lr"] = get_lr(step, cfg)
        opt.step()
        ours.step(get_lr(step, cfg))
    for n, p in tm.named_parameters():
        assert np.abs(nm.params[n] - p.detach().numpy()).max() < 1e-6, n


def test_refusals():
    with pytest.raises(BarkError, match="no Mixture-of-Experts"):
        NumpyGPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=16, n_expert=4))
    nm = NumpyGPT(GPTConfig(vocab_size=20, block_size=8, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(BarkError, match="AdamW only"):
        AdamW(nm, TrainConfig(optimizer="muon"))
    with pytest.raises(BarkError, match="runs on the CPU"):
        load_generator("nowhere", device="cuda")


BARK_TINY = {"n_layer": 1, "n_embd": 32, "batch_size": 8, "eval_iters": 2, "warmup_iters": 2, "log_interval": 1}


def bark_run(out_dir, **overrides):
    model_cfg, cfg = build_configs("bark", overrides={**BARK_TINY, "out_dir": str(out_dir), **overrides})
    return numpy_train(model_cfg, cfg, quiet=True)


def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    kw = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, dropout=0.1)  # dropout: its generator resumes too
    bark_run(tmp_path / "whole", **kw)
    bark_run(tmp_path / "split", **{**kw, "max_iters": 3})
    model_cfg, cfg = build_configs("bark", overrides={**BARK_TINY, **kw, "out_dir": str(tmp_path / "split")})
    numpy_train(model_cfg, cfg, resume=True, quiet=True)

    def rows(run):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "elapsed_s")}
            for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows("whole") == rows("split") and len(rows("whole")) == 6 + 2
    from safetensors.numpy import load_file

    a, b = load_file(str(tmp_path / "whole/last/model.safetensors")), load_file(str(tmp_path / "split/last/model.safetensors"))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert {p.name for p in (tmp_path / "whole").iterdir()} >= {
        "config.yaml",
        "metrics.jsonl",
        "samples.jsonl",
        "loss.png",
        "best",
        "last",
    }


def test_torch_trained_checkpoint_decodes_the_same_greedy_tokens_in_numpy(tmp_path):
    from barkgpt.generate import load_generator as torch_generator
    from barkgpt.train import train

    model_cfg, cfg = build_configs(
        "bark", overrides={**BARK_TINY, "out_dir": str(tmp_path), "max_iters": 10, "eval_interval": 10}
    )
    train(model_cfg, cfg, quiet=True)
    theirs, ours = torch_generator(tmp_path, device="cpu"), load_generator(tmp_path)
    prompt = theirs.tokenizer.encode("User: speak Assistant:")
    want = [s[0] for s in theirs.engine.generate(prompt, max_new_tokens=50, temperature=0)]  # past block_size 32
    assert [s[0] for s in ours.engine.generate(prompt, max_new_tokens=50, temperature=0)] == want
    assert ours.generate("User: speak Assistant:", temperature=0, max_new_tokens=20) == theirs.generate(
        "User: speak Assistant:", temperature=0, max_new_tokens=20
    )


@pytest.mark.integration
def test_cli_trains_and_samples_without_importing_torch(tmp_path):
    out = tmp_path / "run"
    code = (
        "import sys; from barkgpt.cli import main; "
        f"rc = main(['train', '--preset', 'bark', '--backend', 'numpy', '--out-dir', {str(out)!r}, '--max-iters', '4', "
        "'--eval-interval', '4', '--eval-iters', '1', '--n-layer', '1', '--warmup-iters', '1']); "
        f"rc2 = main(['sample', '--backend', 'numpy', '--model', {str(out)!r}, '--prompt', 'User: speak Assistant:', "
        "'--max-new-tokens', '5', '--seed', '0']); "
        f"rc3 = main(['eval', '--bark', '--backend', 'numpy', '--model', {str(out)!r}, '--samples', '2']); "
        "print('torch loaded:', 'torch' in sys.modules, rc, rc2, rc3)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "torch loaded: False 0 0 0" in r.stdout, r.stdout + r.stderr
    assert "done: step 4" in r.stdout and "User: speak Assistant:" in r.stdout and "bark rule followed by" in r.stdout


@pytest.fixture(scope="module")
def numpy_bpe_run(tmp_path_factory, tiny_text):
    """A llama-family (GQA) model trained 3 steps by the NumPy backend on a byte-level BPE text,
    with its logits on 24 tokens: ``(run folder, ids, logits (24, vocab_size))``."""
    tmp = tmp_path_factory.mktemp("numpy-bpe")
    (tmp / "text.txt").write_text(tiny_text * 4)
    model_cfg = GPTConfig(block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    over = dict(tokenizer_vocab_size=300, max_iters=3, warmup_iters=1, eval_interval=3, eval_iters=1, batch_size=4)
    numpy_train(model_cfg, TrainConfig(data=str(tmp / "text.txt"), out_dir=str(tmp / "run"), **over), quiet=True)
    ours = load_generator(tmp / "run")
    ids = ours.tokenizer.encode(tiny_text)[:24]
    return tmp / "run", ids, ours.model.forward(np.asarray([ids]), np.asarray([ids]))[0][0]


def test_numpy_trained_checkpoint_loads_in_torch(numpy_bpe_run):
    from barkgpt.generate import load_generator as torch_generator

    run, ids, want = numpy_bpe_run
    theirs = torch_generator(run, device="cpu")
    with torch.no_grad():
        assert np.abs(theirs.model(torch.tensor([ids]), torch.tensor([ids]))[0][0].numpy() - want).max() < 1e-5
    greedy = [s[0] for s in theirs.engine.generate(ids[:8], max_new_tokens=40, temperature=0)]
    assert [s[0] for s in load_generator(run).engine.generate(ids[:8], max_new_tokens=40, temperature=0)] == greedy


def test_numpy_trained_checkpoint_exports_to_hugging_face(numpy_bpe_run, tmp_path):
    transformers = pytest.importorskip("transformers", reason="the export extra (transformers) is not installed")
    from barkgpt.cli import main

    run, ids, want = numpy_bpe_run
    assert main(["export", "hf", "--model", str(run), "--out", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert np.abs(hf(torch.tensor([ids])).logits[0].numpy() - want).max() < 1e-4


def test_numpy_trained_checkpoint_exports_to_gguf(numpy_bpe_run, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (make test installs it)")
    pytest.importorskip("gguf", reason="the export extra (gguf) is not installed")
    from barkgpt.cli import main

    run, ids, want = numpy_bpe_run
    path = tmp_path / "m.gguf"
    assert main(["export", "gguf", "--model", str(run), "--out", str(path), "--outtype", "f32"]) == 0
    f32 = llama_cpp.GGML_TYPE_F32
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1, type_k=f32, type_v=f32
    )
    llm.eval(ids)
    assert np.abs(np.array(llm.scores[: len(ids)]) - want).max() < 1e-3


def test_resume_refuses_a_torch_run(tmp_path):
    from barkgpt.train import train

    model_cfg, cfg = build_configs("bark", overrides={**BARK_TINY, "out_dir": str(tmp_path), "max_iters": 3, "eval_interval": 3})
    train(model_cfg, cfg, quiet=True)
    with pytest.raises(BarkError, match="resume with --backend torch"):
        numpy_train(model_cfg, dataclasses.replace(cfg, max_iters=4), resume=True, quiet=True)


@pytest.mark.integration
def test_sigint_then_resume_logs_the_losses_of_the_uninterrupted_run(tmp_path):
    import os
    import signal
    import time

    flags = ["--n-layer", "1", "--n-embd", "32", "--batch-size", "8", "--eval-iters", "2", "--warmup-iters", "2"]
    flags += ["--log-interval", "1", "--max-iters", "60", "--eval-interval", "30"]

    def cli(out, *extra):
        return [
            sys.executable,
            "-m",
            "barkgpt",
            "train",
            "--preset",
            "bark",
            "--backend",
            "numpy",
            "--out-dir",
            str(out),
            *flags,
            *extra,
        ]

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run(cli(tmp_path / "whole"), check=True, capture_output=True, env=env, timeout=120)
    proc = subprocess.Popen(cli(tmp_path / "cut"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 8):
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert b"interrupted: saved" in out
    subprocess.run(cli(tmp_path / "cut", "--resume"), check=True, capture_output=True, env=env, timeout=120)

    def losses(run):
        rows = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in rows]

    assert losses("cut") == losses("whole") and len(losses("whole")) == 62
