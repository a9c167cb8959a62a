"""Configuration dataclasses and how a config reaches the code.

    dataclass defaults -> --preset / --config run.yaml -> --flags -> __post_init__ checks

Each field's comment is its ``--help`` text. A config file is YAML with two sections, ``model``
(:class:`GPTConfig`) and ``train`` (:class:`TrainConfig`); ``out_dir/config.yaml`` is written in
the same shape, so ``barkgpt train --config runs/x/config.yaml`` reproduces a run.

This module imports no torch: loading a config or printing ``--help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from barkgpt.common import BarkError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass
class GPTConfig:
    """Model shape. The names are nanoGPT's; HF names appear only in ``export/``.

    Two families map 1:1 onto Hugging Face classes: ``gpt2`` (learned positions, LayerNorm, GELU,
    biases; ``GPT2LMHeadModel``) and ``llama`` (RoPE, RMSNorm, SwiGLU, grouped-query attention, no
    biases; ``LlamaForCausalLM``).

    Raises:
        BarkError: a cross-field rule fails (``n_embd % n_head``, ``n_head % n_kv_head``, ...).
    """

    family: str = "llama"  # llama (RoPE, RMSNorm, SwiGLU, GQA) or gpt2 (learned positions, LayerNorm, GELU)
    vocab_size: int | None = None  # tokens in the vocabulary; None takes it from the data's tokenizer
    block_size: int = 256  # context length in tokens
    n_layer: int = 6  # transformer blocks
    n_head: int = 6  # query heads
    n_kv_head: int | None = None  # key/value heads (grouped-query attention); None means n_head
    n_embd: int = 384  # width of the residual stream
    intermediate_size: int | None = None  # MLP hidden width; None means 4*n_embd (gpt2) or 8/3*n_embd rounded up to 64 (llama)
    dropout: float = 0.0  # dropout on attention and residual branches (0 for small data is usually fine)
    attention_dropout: float | None = None  # on the attention weights alone; None: dropout (0 keeps the CPU kernel)
    bias: bool | None = None  # biases in Linear and LayerNorm; None means True for gpt2, False for llama
    rope_theta: float = 10000.0  # RoPE base frequency (llama)
    norm_eps: float = 1e-5  # epsilon of LayerNorm / RMSNorm
    tie_embeddings: bool = True  # share the token embedding with the output head (lm_head)
    n_expert: int = 0  # Mixture-of-Experts: SwiGLU experts per layer (0: a dense MLP; llama family only)
    n_expert_per_token: int = 2  # experts the router picks for each token (top-k, Mixtral routing)
    router_aux_loss_coef: float = 0.01  # weight of the Switch Transformer load-balancing loss

    def __post_init__(self):
        check_finite(self)
        if self.family not in ("llama", "gpt2"):
            raise BarkError(f"family must be 'llama' or 'gpt2', got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.intermediate_size is None:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.n_embd
            else:  # SwiGLU has three matrices: 2/3 of 4*n_embd keeps the parameter count (LLaMA paper)
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        for name in ("block_size", "n_layer", "n_head", "n_kv_head", "n_embd", "intermediate_size"):
            if getattr(self, name) < 1:
                raise BarkError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.vocab_size is not None and self.vocab_size < 2:
            raise BarkError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.n_embd % self.n_head != 0:
            raise BarkError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"try --n-head {_divisor_near(self.n_embd, self.n_head)}"
            )
        if self.n_head % self.n_kv_head != 0:
            raise BarkError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head}); "
                f"try --n-kv-head {_divisor_near(self.n_head, self.n_kv_head)}"
            )
        if self.family == "llama" and (self.n_embd // self.n_head) % 2:
            raise BarkError(
                f"RoPE needs an even head_dim, got n_embd/n_head = {self.n_embd // self.n_head}; change --n-head or --n-embd"
            )
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise BarkError(
                "the gpt2 family has no grouped-query attention: set --n-kv-head equal to --n-head (or use --family llama)"
            )
        for name, p in (("dropout", self.dropout), ("attention_dropout", self.attention_dropout)):
            if p is not None and not 0.0 <= p < 1.0:
                raise BarkError(f"{name} must be in [0, 1), got {p}")
        if self.n_expert < 0 or self.n_expert == 1:
            raise BarkError(f"n_expert must be 0 (dense) or at least 2, got {self.n_expert}")
        if self.n_expert:
            if self.family != "llama":
                raise BarkError("Mixture-of-Experts needs the llama family (SwiGLU experts, as Mixtral); add --family llama")
            if not 1 <= self.n_expert_per_token <= self.n_expert:
                raise BarkError(
                    f"n_expert_per_token ({self.n_expert_per_token}) must be between 1 and n_expert ({self.n_expert}); "
                    f"try --n-expert-per-token {min(2, self.n_expert)}"
                )

    @property
    def attention_dropout_p(self) -> float:
        """Dropout probability on the attention weights: ``attention_dropout``, or ``dropout`` when
        it is None (left unresolved, so a fine-tune's ``--dropout`` still reaches attention)."""
        return self.dropout if self.attention_dropout is None else self.attention_dropout

    @property
    def head_dim(self) -> int:
        """Width of one attention head: ``n_embd // n_head``."""
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    """Training run settings: nanoGPT's ``train.py`` names.

    Raises:
        BarkError: contradictory settings (warmup longer than the run, min_lr above learning_rate, Muon with FSDP...).
    """

    data: str | None = (
        None  # prepared data folder (barkgpt prepare), a .txt/.jsonl/folder to prepare into out_dir/data, or the name of a built-in generated dataset (the toy presets' data; data.BUILTIN_DATASETS)
    )
    tokenizer: str = "bpe"  # tokenizer kind when --data is raw text: bpe, char or word
    tokenizer_vocab_size: int | None = None  # vocabulary size to train when --data is raw text (bpe default 2048)
    text_field: str = "text"  # the JSON field or table column that holds the text of raw --data (.jsonl, .parquet)
    out_dir: str = "runs/default"  # where config.yaml, metrics.jsonl, loss.png, last/ and best/ go
    init_from: str = "scratch"  # scratch, or a checkpoint folder to start from (fine-tuning)
    batch_size: int = 12  # sequences per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float = 1e-3  # peak learning rate after warmup
    min_lr: float = 1e-4  # learning rate at the end of cosine decay
    warmup_iters: int = 100  # linear warmup steps
    lr_decay_iters: int | None = None  # steps of cosine decay; None means max_iters
    lr_schedule: str = "cosine"  # cosine to min_lr after warmup, or wsd: constant, then linear to min_lr
    lr_cooldown_frac: float = 0.4  # wsd: the share of the steps after warmup that decay to min_lr
    max_iters: int = 2000  # optimizer steps
    optimizer: str = "adamw"  # adamw, or muon: Muon for the blocks' 2-D weight matrices, AdamW for the rest
    muon_learning_rate: float | None = None  # Muon's peak learning rate (None: learning_rate; its update RMS matches AdamW's)
    muon_ns_steps: int = 5  # Muon's Newton-Schulz iterations per step (torch.optim.Muon's 5; 3 takes 3/5 of their time)
    weight_decay: float = 0.1  # AdamW weight decay on 2-D weights (not norms, biases)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # clip the global gradient norm to this (0 disables)
    eval_interval: int = 250  # steps between evaluations and checkpoints
    eval_iters: int = 20  # batches per evaluation split
    log_interval: int = 10  # steps between metrics.jsonl lines
    sample_prompt: str = ""  # prompt of the text sample written to samples.jsonl at each eval ('' starts from <EOS>)
    device: str = "auto"  # auto, cpu, cuda, cuda:N or mps
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state with FSDP2 instead of DDP
    seed: int = 1337  # seeds the model init and the batch sampler
    max_time: float | None = None  # wall-clock seconds for the run, final eval and checkpoint included (None: no limit)
    fit_to_time: bool = False  # with max_time: re-fit max_iters to the measured step time to end at max_time (--budget)
    log_to: list[str] = field(default_factory=list)  # also log to tensorboard or wandb (offline), repeatable

    def __post_init__(self):
        check_finite(self)
        positive = ("batch_size", "gradient_accumulation_steps", "max_iters", "eval_interval", "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) < 1:
                raise BarkError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.tokenizer not in ("bpe", "char", "word"):
            raise BarkError(f"tokenizer must be bpe, char or word, got {self.tokenizer!r}")
        if self.learning_rate <= 0:
            raise BarkError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.optimizer not in ("adamw", "muon"):
            raise BarkError(f"optimizer must be adamw or muon, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.fsdp:
            raise BarkError("--optimizer muon needs whole weight matrices, which --fsdp shards; use DDP (drop --fsdp) or AdamW")
        if not 1 <= self.muon_ns_steps <= 10:
            raise BarkError(f"muon_ns_steps must be between 1 and 10, got {self.muon_ns_steps}")
        if self.muon_learning_rate is not None and self.muon_learning_rate <= 0:
            raise BarkError(f"muon_learning_rate must be positive, got {self.muon_learning_rate}")
        if self.lr_schedule not in ("cosine", "wsd"):
            raise BarkError(f"lr_schedule must be cosine or wsd, got {self.lr_schedule!r}")
        if not 0 < self.lr_cooldown_frac <= 1:
            raise BarkError(f"lr_cooldown_frac must be in (0, 1], got {self.lr_cooldown_frac}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise BarkError(f"min_lr ({self.min_lr}) must be between 0 and learning_rate ({self.learning_rate})")
        if self.lr_decay_iters is None:
            self.lr_decay_iters = self.max_iters
        if self.warmup_iters < 0 or self.warmup_iters >= max(self.lr_decay_iters, 1) and self.max_iters > 1:
            raise BarkError(
                f"warmup_iters ({self.warmup_iters}) must be shorter than the run (lr_decay_iters {self.lr_decay_iters}); "
                f"lower --warmup-iters or raise --max-iters"
            )
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise BarkError("grad_clip and weight_decay must not be negative")
        if self.max_time is not None and self.max_time <= 0:
            raise BarkError(f"max_time must be a positive number of seconds, got {self.max_time}")
        if self.fit_to_time and self.max_time is None:
            raise BarkError("fit_to_time needs max_time: add --max-time SECONDS (or use --budget, which sets both)")
        for tracker in self.log_to:
            if tracker not in ("tensorboard", "wandb"):
                raise BarkError(f"--log-to {tracker!r} is not a tracker; use --log-to tensorboard or --log-to wandb")


@dataclass
class SamplingParams:
    """How one generation samples: the only place sampling settings and their defaults live.

    ``barkgpt sample``/``chat`` flags (one per field), ``barkgpt.load(...).generate(**fields)``,
    the OpenAI request schemas (``server/protocol.py`` maps their names onto these) and
    :class:`~barkgpt.engine.Engine` all meet here, and ``__post_init__`` is the one validation.
    The engine applies the settings as logits processors in this order: repetition, presence and
    frequency penalties, then temperature, top-k, top-p, min-p (HF's and vLLM's order).

    Raises:
        BarkError: temperature < 0, top_k < 0, top_p outside (0, 1], min_p outside [0, 1),
            repetition_penalty <= 0, presence/frequency_penalty outside [-2, 2], max_new_tokens < 1,
            num_samples < 1, logprobs < 0, a seed outside [-2**63, 2**64), or a NaN/inf anywhere.
    """

    max_new_tokens: int = 200  # tokens to generate per sample
    temperature: float = 0.8  # 0 is greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set with this much probability (1: off)
    min_p: float = 0.0  # drop tokens below min_p times the top probability (0: off)
    repetition_penalty: float = 1.0  # CTRL-style penalty on tokens already in the context (1: off)
    presence_penalty: float = 0.0  # OpenAI's: subtract this once from each token generated so far, in [-2, 2] (0: off)
    frequency_penalty: float = (
        0.0  # OpenAI's: subtract this times its count from each token generated so far, in [-2, 2] (0: off)
    )
    seed: int | None = None  # seed for sampling (None: random); sample j of num_samples uses seed + j
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends before them
    num_samples: int = 1  # samples generated together in one batch
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely tokens

    def __post_init__(self):
        check_finite(self)
        if not self.temperature >= 0:
            raise BarkError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise BarkError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise BarkError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise BarkError(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise BarkError(f"repetition_penalty must be > 0 (1 turns it off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise BarkError(f"{name} must be in [-2, 2] (0 turns it off), got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            raise BarkError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.num_samples < 1:
            raise BarkError(f"num_samples must be at least 1, got {self.num_samples}")
        if self.logprobs is not None and self.logprobs < 0:
            raise BarkError(f"logprobs must be >= 0 (or None for none), got {self.logprobs}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise BarkError(f"seed must be in [-2**63, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True at temperature 0: the argmax, no random draw."""
        return self.temperature == 0


@dataclass
class ServeConfig:
    """Settings of ``barkgpt serve``, one ``--flag`` per field (the model folder and device are
    the separate ``--model`` and ``--device`` flags). The API key may also come from the
    ``BARKGPT_API_KEY`` environment variable, read by the command, not here.

    The security fields (``allowed_host``, ``cors_origin``, ``data_root``, ``max_run_params``,
    ``max_run_memory``) are explained in the README's Security section.

    Raises:
        BarkError: a port outside 1..65535, threads < 1, max_batch_size < 1, max_queue < 1, max_body_bytes < 1,
            a negative or non-finite shutdown_timeout, an empty api_key, both api_key and api_key_file,
            max_run_params < 1 or max_run_memory < 1.
    """

    host: str = "127.0.0.1"  # address to bind (127.0.0.1: this machine only; 0.0.0.0: every interface)
    port: int = 8000  # TCP port
    api_key: str | None = (
        None  # require this key as 'Authorization: Bearer KEY' (None: no key, unless env BARKGPT_API_KEY is set)
    )
    api_key_file: str | None = None  # read the API key from this file (instead of --api-key)
    model_name: str | None = None  # the model id in /v1/models (None: the run folder's name)
    max_batch_size: int = 16  # requests decoded together in one batch
    threads: int | None = (
        None  # torch threads for the model (None: env OMP_NUM_THREADS, else all cores but one, left to the HTTP event loop)
    )
    compile: bool = True  # torch.compile the decode step before /health turns 200 (~3x tokens/s at batch 1 on CPU; eager, with one warning, where no C++ compiler works)
    prefix_cache: bool = (
        True  # reuse the KV entries of earlier prompts and replies that a new prompt starts with (--no-prefix-cache: off)
    )
    max_queue: int = 256  # requests waiting for a batch row; more get 429 (one request needing more rows than this gets 400)
    max_body_bytes: int = 1 << 20  # request bodies larger than this get 413
    cors_origin: list[str] = field(default_factory=list)  # allow browser calls from this origin (repeatable; none: CORS off)
    shutdown_timeout: float = 30.0  # seconds running requests get to finish after SIGTERM; then they end with an error
    runs: str | None = None  # a folder of training runs to watch, start and stop on the web page's /train (None: none)
    data_root: list[str] = field(
        default_factory=list
    )  # a folder whose files a run started over HTTP may train on, besides --runs (repeatable)
    allowed_host: list[str] = field(
        default_factory=list
    )  # a Host name to answer besides the bound address and localhost (repeatable; for a reverse proxy; '*': any)
    max_run_params: int = 200_000_000  # a run started over HTTP may have at most this many parameters (estimated)
    max_run_memory: int | None = (
        None  # bytes of memory a run started over HTTP may need to train (estimated; None: half this machine's RAM)
    )

    def __post_init__(self):
        check_finite(self)
        if not 1 <= self.port <= 65535:
            raise BarkError(f"port must be in 1..65535, got {self.port}")
        if self.max_batch_size < 1:
            raise BarkError(f"max_batch_size must be at least 1, got {self.max_batch_size}")
        if self.threads is not None and self.threads < 1:
            raise BarkError(f"threads must be at least 1, got {self.threads}")
        if self.max_queue < 1:
            raise BarkError(f"max_queue must be at least 1, got {self.max_queue}")
        if self.max_body_bytes < 1:
            raise BarkError(f"max_body_bytes must be at least 1, got {self.max_body_bytes}")
        if not (self.shutdown_timeout >= 0 and math.isfinite(self.shutdown_timeout)):
            raise BarkError(f"shutdown_timeout must be a number of seconds >= 0, got {self.shutdown_timeout}")
        if self.api_key == "":
            raise BarkError("api_key is empty; give a key or leave --api-key out")
        if self.api_key is not None and self.api_key_file is not None:
            raise BarkError("give --api-key or --api-key-file, not both")
        if self.max_run_params < 1:
            raise BarkError(f"max_run_params must be at least 1, got {self.max_run_params}")
        if self.max_run_memory is not None and self.max_run_memory < 1:
            raise BarkError(f"max_run_memory must be at least 1 byte, got {self.max_run_memory}")


def _divisor_near(n: int, want: int) -> int:
    """The divisor of ``n`` closest to ``want`` (for error messages); O(sqrt n), so a huge ``n``
    from a request cannot stall the caller."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return min(divisors, key=lambda d: (abs(d - want), d))


def check_finite(cfg) -> None:
    """Refuse NaN and infinite numbers in any field of dataclass ``cfg`` (a learning rate of
    ``inf`` passes every ``<=`` check, and NaN fails none).

    Raises:
        BarkError: naming the first field that holds one.
    """
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise BarkError(f"{f.name} must be a finite number, got {value}")


# --------------------------------------------------------------------------- parsing helpers


def field_types(cls) -> dict[str, type]:
    """Map each field of dataclass ``cls`` to its resolved annotation."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def field_help(cls) -> dict[str, str]:
    """Map each field of dataclass ``cls`` to the comment after it in the source (its help text)."""
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith(("#", "def", '"')):
            name = line.split(":", 1)[0].strip()
            out[name] = line.split("#", 1)[1].strip()
    return out


def parse_value(name: str, text: str, tp) -> typing.Any:
    """Convert a command-line string to the field's type (``"none"`` gives None for optionals).

    Raises:
        BarkError: the text is not a valid value of that type.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    optional = type(None) in args
    if optional:
        if text.lower() in ("none", "null", ""):
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    try:
        if tp is bool:
            low = text.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if origin is list:
            return [text] if text else []
        value = tp(text)
        if isinstance(value, float) and not math.isfinite(value):
            raise BarkError(f"--{name.replace('_', '-')} must be a finite number, got {text!r}")
        return value
    except ValueError:
        kind = getattr(tp, "__name__", str(tp))
        raise BarkError(f"--{name.replace('_', '-')} expects {kind}, got {text!r}") from None


def coerce_value(name: str, value, tp):
    """Check (and lightly convert) a value read from YAML against the field's type.

    Raises:
        BarkError: the value has the wrong type.
    """
    if isinstance(value, str):
        return parse_value(name, value, tp) if tp is not str else value
    args = typing.get_args(tp)
    base = next((a for a in args if a is not type(None)), tp) if args and type(None) in args else tp
    if value is None:
        if type(None) in args:
            return None
        raise BarkError(f"{name} cannot be null")
    if isinstance(value, float) and not math.isfinite(value):
        raise BarkError(f"{name} must be a finite number, got {value}")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:
            raise BarkError(f"{name} must be a finite number, got an integer of {value.bit_length()} bits")
        return float(value)
    if typing.get_origin(base) is list and isinstance(value, list):
        return value
    if isinstance(base, type) and isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    raise BarkError(f"{name} expects {getattr(base, '__name__', base)}, got {value!r}")


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> BarkError:
    """A one-line error for an unknown key, naming the closest valid one."""
    valid = sorted(valid)
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(valid)}"
    return BarkError(f"unknown {where} {key!r}{hint}")


def preset_names() -> list[str]:
    """The sorted names of the presets in the package's ``configs/`` folder (``shakespeare-char``, ...)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    """The YAML file of a preset in the package's ``configs/`` folder.

    Raises:
        BarkError: no such preset (the message lists the presets).
    """
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.exists():
        names = preset_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise BarkError(f"unknown preset {name!r}; {hint}presets: {', '.join(names)}")
    return path


# Settings that existed once, so that the config.yaml of an older run still reproduces it:
# section -> key -> why it went. Any other unknown key is an error.
REMOVED_KEYS = {"train": {"sample_interval": "samples are written at each evaluation"}}


def read_config_file(path: str | Path) -> dict[str, dict]:
    """Read a run config YAML into ``{"model": {...}, "train": {...}}`` of raw values.

    Raises:
        BarkError: missing file, invalid YAML, an unknown section or key.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BarkError(f"config file {path} not found; check the path (presets: barkgpt train --preset NAME)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise BarkError(f"config file {path} is not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if not isinstance(raw, dict):
        raise BarkError(f"config file {path} must be a mapping with 'model' and 'train' sections")
    out: dict[str, dict] = {"model": {}, "train": {}}
    for section, values in raw.items():
        if section not in out:
            raise unknown_key_error(section, out, f"section in {path.name}")
        if not isinstance(values, dict):
            raise BarkError(f"section {section!r} in {path} must be a mapping")
        cls = GPTConfig if section == "model" else TrainConfig
        types = field_types(cls)
        for key, value in values.items():
            if key in REMOVED_KEYS.get(section, {}):  # in config.yaml files written before it went
                print(
                    f"warning: {path.name}: {section}.{key} is no longer a setting ({REMOVED_KEYS[section][key]}); ignored",
                    file=sys.stderr,
                )
                continue
            if key not in types:
                raise unknown_key_error(key, types, f"key in section {section!r} of {path.name}")
            out[section][key] = coerce_value(key, value, types[key])
    return out


def build_configs(
    preset: str | None = None, config: str | None = None, overrides: dict | None = None
) -> tuple[GPTConfig, TrainConfig]:
    """Resolve defaults, then a preset or config file, then flag overrides, into checked configs.

    Args:
        preset: name of a YAML file in ``barkgpt/configs`` (``shakespeare-char``, ``tinystories``...).
        config: path to a run YAML (applied after the preset).
        overrides: field name -> already-typed value, from command-line flags (last word).

    Raises:
        BarkError: an unknown key, a bad value, or a failed cross-field check.
    """
    values: dict[str, dict] = {"model": {}, "train": {}}
    for path in ([preset_path(preset)] if preset else []) + ([Path(config)] if config else []):
        for section, vals in read_config_file(path).items():
            values[section].update(vals)
    model_keys, train_keys = field_types(GPTConfig), field_types(TrainConfig)
    for key, value in (overrides or {}).items():
        if key in model_keys:
            values["model"][key] = value
        elif key in train_keys:
            values["train"][key] = value
        else:
            raise unknown_key_error(key, [*model_keys, *train_keys], "option")
    return GPTConfig(**values["model"]), TrainConfig(**values["train"])


def config_to_dict(model: GPTConfig, train: TrainConfig | None = None) -> dict:
    """The ``{"model": ..., "train": ...}`` dict written to ``config.yaml``."""
    out = {"model": dataclasses.asdict(model)}
    if train is not None:
        out["train"] = dataclasses.asdict(train)
    return out


def dump_yaml(d: dict) -> str:
    """YAML text of a config dict, keys in field order."""
    import yaml

    return yaml.safe_dump(d, sort_keys=False)
