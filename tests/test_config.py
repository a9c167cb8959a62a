"""Configs: presets, YAML, flags, cross-field checks and their messages."""

import pytest

from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, SamplingParams, TrainConfig, build_configs, config_to_dict, dump_yaml, field_types


def test_presets_resolve():
    for name in ("bark", "bark-chat", "shakespeare-char", "shakespeare-bpe", "tinystories", "tinystories-moe", "gpt2-124m"):
        model, train = build_configs(preset=name)
        assert model.n_embd % model.n_head == 0
        assert train.max_iters > train.warmup_iters


def test_shakespeare_char_is_nanogpts_cpu_recipe():
    model, train = build_configs(preset="shakespeare-char")
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size) == (4, 4, 128, 64)
    assert (train.batch_size, train.max_iters, model.dropout) == (12, 2000, 0.0)


def test_gpt2_124m_is_gpt2_small():
    """The preset builds GPT-2 small: 124,439,808 parameters with GPT-2's vocabulary (as
    GPT2LMHeadModel, tied head), and nanoGPT's FLOPs per token for MFU."""
    import torch

    from barkgpt.common import peak_flops
    from barkgpt.model import GPT

    model_cfg, train = build_configs(preset="gpt2-124m", overrides={"vocab_size": 50257})
    with torch.device("meta"):
        model = GPT(model_cfg)
    assert model.num_params() == 124_439_808
    assert model.flops_per_token() == 6 * (124_439_808 - 1024 * 768) + 12 * 12 * 768 * 1024
    assert train.compile and train.dtype == "auto"  # bf16 autocast on CUDA
    assert peak_flops("cpu") is None  # MFU only against a known GPU's peak


def test_flags_override_preset():
    model, train = build_configs(preset="bark", overrides={"n_layer": 3, "max_iters": 7, "warmup_iters": 1})
    assert model.n_layer == 3 and train.max_iters == 7


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(n_embd=30, n_head=4), ["n_embd", "n_head", "divisible"]),
        (dict(n_head=4, n_kv_head=3), ["n_kv_head", "divisible"]),
    ],
)
def test_cross_field_errors_name_the_fields(kw, words):
    with pytest.raises(BarkError) as e:
        GPTConfig(**kw)
    assert all(w in str(e.value) for w in words)


def test_unknown_key_names_closest(tmp_path):
    with pytest.raises(BarkError, match="did you mean 'n_layer'"):
        build_configs(overrides={"n_layers": 3})
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  max_iter: 5\n")
    with pytest.raises(BarkError, match="max_iters"):
        build_configs(config=str(f))


def test_sample_interval_is_gone(tmp_path, capsys):
    """It was never read (a sample is written at each eval), so it is no field or flag; an older
    run's config.yaml that has it still loads, with a warning; any other unknown key is an error."""
    assert "sample_interval" not in field_types(TrainConfig)
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  sample_interval: 0\n  max_iters: 700\n")
    assert build_configs(config=str(f))[1].max_iters == 700
    assert "sample_interval is no longer a setting" in capsys.readouterr().err
    f.write_text("train:\n  sample_intervals: 0\n")
    with pytest.raises(BarkError, match="unknown key"):
        build_configs(config=str(f))


def test_bad_value_type(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  n_layer: many\n")
    with pytest.raises(BarkError, match="n-layer"):
        build_configs(config=str(f))


def test_config_yaml_round_trip(tmp_path):
    model, train = build_configs(preset="shakespeare-char")
    f = tmp_path / "config.yaml"
    f.write_text(dump_yaml(config_to_dict(model, train)))
    model2, train2 = build_configs(config=str(f))
    assert model2 == model and train2 == train


def test_warmup_must_be_shorter_than_run():
    with pytest.raises(BarkError, match="warmup"):
        TrainConfig(max_iters=50, warmup_iters=100)


@pytest.mark.parametrize(
    "kw, word",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(min_p=1.0), "min_p"),
        (dict(max_new_tokens=0), "max_new_tokens"),
    ],
)
def test_bad_sampling_values(kw, word):
    with pytest.raises(BarkError, match=word):
        SamplingParams(**kw)


def test_non_finite_numbers_are_refused_everywhere(tmp_path):
    """NaN and inf pass ``<=`` checks (a learning rate of inf is "positive"): flags, YAML and
    dataclasses refuse them, naming the field."""
    from barkgpt.config import ServeConfig, coerce_value, parse_value

    for text in ("inf", "-inf", "nan", "1e999"):
        with pytest.raises(BarkError, match="--learning-rate must be a finite number"):
            parse_value("learning_rate", text, float)
    for value in (float("inf"), float("nan"), 10**400):
        with pytest.raises(BarkError, match="learning_rate must be a finite number"):
            coerce_value("learning_rate", value, float)
    (tmp_path / "run.yaml").write_text("train:\n  learning_rate: .inf\n")
    with pytest.raises(BarkError, match="learning_rate must be a finite number"):
        build_configs(config=str(tmp_path / "run.yaml"))
    for make, name in (
        (lambda: TrainConfig(learning_rate=float("nan")), "learning_rate"),
        (lambda: TrainConfig(grad_clip=float("inf")), "grad_clip"),
        (lambda: GPTConfig(rope_theta=float("nan")), "rope_theta"),
        (lambda: SamplingParams(top_p=float("nan")), "top_p"),
        (lambda: ServeConfig(shutdown_timeout=float("inf")), "shutdown_timeout"),
    ):
        with pytest.raises(BarkError, match=f"{name} must be a finite number"):
            make()


def test_serve_limits_are_checked():
    from barkgpt.config import ServeConfig

    for kw, word in (
        (dict(max_queue=0), "max_queue"),
        (dict(max_run_params=0), "max_run_params"),
        (dict(max_run_memory=0), "max_run_memory"),
    ):
        with pytest.raises(BarkError, match=word):
            ServeConfig(**kw)


@pytest.mark.timeout(10)  # a search over every integer up to n_embd would take minutes (the server builds configs from requests)
def test_divisor_hint_stays_quick_for_a_huge_prime_width():
    with pytest.raises(BarkError, match=r"try --n-head 1\b"):
        GPTConfig(n_embd=2**31 - 1, n_head=6)  # a Mersenne prime: only 1 and itself divide it
