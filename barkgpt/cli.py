"""The ``barkgpt`` command: verbs ``prepare``, ``train``, ``finetune``, ``dpo``, ``eval``, ``export``,
``import``, ``sample``, ``chat``, ``serve``.

Each verb imports its module inside its function, so ``barkgpt --help`` never imports torch.
Every config field is a kebab-case flag derived from the dataclasses in ``config.py``. Errors
print one line and exit 2 (1 for an unexpected error); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from barkgpt import __version__
from barkgpt.common import BarkError
from barkgpt.config import GPTConfig, SamplingParams, ServeConfig, TrainConfig, field_help, field_types, parse_value, preset_names


def add_dataclass_args(parser: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--kebab-case`` flag per field of ``cls`` (value parsed later by :func:`parse_value`)."""
    helps = field_help(cls)
    group = parser.add_argument_group(f"{cls.__name__} fields")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw = {"action": "append"} if isinstance(default, list) else {}
        group.add_argument(
            f"--{f.name.replace('_', '-')}",
            dest=f.name,
            default=None,
            metavar="VALUE",
            help=f"{helps.get(f.name, '')} (default: {default})",
            **kw,
        )


def collect_overrides(args: argparse.Namespace, cls) -> dict:
    """The flags the user actually gave for ``cls``'s fields, converted to their types.

    Raises:
        BarkError: a value that does not parse as the field's type.
    """
    types = field_types(cls)
    out = {}
    for name, tp in types.items():
        value = getattr(args, name, None)
        if value is None:
            continue
        out[name] = [str(v) for v in value] if isinstance(value, list) else parse_value(name, value, tp)
    return out


def load_builtin_datasets() -> None:
    """Import the modules that register built-in generated datasets (``data.register_dataset``):
    the Bark toy's ``bark`` and ``bark-chat``. Verbs that read ``--data`` or a preset's data call
    this first; it loads ``tokenizers`` and numpy, never torch."""
    import barkgpt.bark  # noqa: F401 - registers its datasets on import


def cmd_prepare(args) -> None:
    """`barkgpt prepare`: tokenize a corpus into a data folder (see data.prepare_dataset)."""
    from barkgpt.data import prepare_dataset

    meta = prepare_dataset(
        args.input,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        tokenizer_from=args.tokenizer_from,
        text_field=args.text_field,
        errors=args.errors,
    )
    print(
        f"wrote {args.out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens, "
        f"{meta['tokenizer']} tokenizer with {meta['vocab_size']} tokens"
    )


def cmd_train(args) -> None:
    """`barkgpt train`: resolve preset/config/flags, then train (or --print-config)."""
    from barkgpt.config import build_configs, config_to_dict, dump_yaml

    overrides = {**collect_overrides(args, GPTConfig), **collect_overrides(args, TrainConfig)}
    if args.backend == "numpy" and (args.budget is not None or args.dry_run):
        raise BarkError("--budget and --dry-run plan a torch run; drop them for --backend numpy (or give --max-iters)")
    if args.backend != "numpy" and wants_plan(args, overrides):
        cmd_train_planned(args, overrides)
        return
    model_cfg, train_cfg = build_configs(args.preset, args.config, overrides)
    if args.print_config:
        print(dump_yaml(config_to_dict(model_cfg, train_cfg)), end="")
        return
    if args.backend == "numpy":
        cmd_train_numpy(args, model_cfg, train_cfg)
        return
    load_builtin_datasets()
    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:  # start torchrun, which runs this verb on each rank
        from barkgpt.common import resolve_device
        from barkgpt.distributed import check_nproc, launch

        check_nproc(args.nproc, resolve_device(train_cfg.device))
        # Drop --nproc N: torchrun's parser would read it as its own --nproc-per-node (the ranks see
        # WORLD_SIZE, so they would train rather than launch again anyway).
        argv = [
            a
            for i, a in enumerate(args.argv)
            if a != "--nproc" and not a.startswith("--nproc=") and (i == 0 or args.argv[i - 1] != "--nproc")
        ]
        code = launch(args.nproc, argv)
        if code:
            raise BarkError(f"torchrun exited with status {code} (the ranks' errors are printed above)")
        return
    from barkgpt.preferences import PreferencePairs
    from barkgpt.train import open_source, train

    source = open_source(train_cfg)
    if isinstance(source, PreferencePairs):  # a generated preference dataset (bark-dpo): DPO
        from barkgpt.dpo import train_preference_preset

        result = train_preference_preset(train_cfg, source, resume=args.resume)
    else:
        result = train(model_cfg, train_cfg, resume=args.resume, source=source)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for all
        print_run_summary(result, train_cfg.out_dir)


def wants_plan(args, overrides: dict) -> bool:
    """Whether `train` plans the run (barkgpt.planner): ``--budget`` or ``--dry-run`` given, or
    ``--data`` of text with no preset, config, model flag, ``--max-iters`` or ``--resume``.

    Raises:
        BarkError: ``--budget`` with ``--preset``/``--config``/``--resume``/``--nproc``.
    """
    if args.budget is not None or args.dry_run:
        for flag, given in (("--preset", args.preset), ("--config", args.config), ("--resume", args.resume)):
            if given:
                raise BarkError(f"--budget plans the whole run, which {flag} fixes; drop {flag} or --budget/--dry-run")
        if args.nproc != 1:
            raise BarkError("--budget plans for one process; drop --nproc (or give the model flags and --max-iters yourself)")
        return True
    if args.preset or args.config or args.resume or args.nproc != 1 or "data" not in overrides or "max_iters" in overrides:
        return False
    if any(f.name in overrides for f in dataclasses.fields(GPTConfig)):
        return False
    load_builtin_datasets()
    from barkgpt.data import builtin_dataset

    return builtin_dataset(overrides["data"]) is None


def cmd_train_planned(args, overrides: dict) -> None:
    """`barkgpt train --data X [--budget 10m] [--dry-run]`: plan the run (barkgpt.planner), print
    the pre-flight table, then train within the budget (or stop, with --dry-run)."""
    import time

    from barkgpt.planner import DEFAULT_BUDGET_S, format_duration, parse_budget, plan_run, process_start_time

    started = process_start_time()
    if time.time() - started > 5:  # main() called in a long-lived process (a notebook, a test): the clock starts now
        started = time.time()
    budget = parse_budget(args.budget) if args.budget is not None else DEFAULT_BUDGET_S
    why = "" if args.budget is not None else " (the default; set it with --budget 2m, 1h...)"
    data = overrides.get("data")
    line = f"planning a {format_duration(budget)} run{why} on {data}: preparing the data, measuring this machine"
    print(line, file=sys.stderr if args.print_config else sys.stdout, flush=True)  # --print-config: stdout is the YAML
    plan = plan_run(budget, overrides, started)
    if args.print_config:  # the planned run's config, as config.yaml will hold it
        from barkgpt.config import config_to_dict, dump_yaml

        print(dump_yaml(config_to_dict(plan.model, plan.launch_config())), end="")
        return
    print(plan.table(), flush=True)
    if args.dry_run:
        print(f"dry run: planned in {time.time() - started:.1f}s; drop --dry-run to train")
        return
    from barkgpt.train import train

    cfg = plan.launch_config()
    result = train(plan.model, cfg)
    wall = time.time() - started
    print_run_summary(result, cfg.out_dir)
    print(f"wall clock {wall:.1f}s from process start, budget {budget:.0f}s ({wall / budget:.0%})")


def use_numpy_backend() -> None:
    """Before NumPy loads for ``--backend numpy``: one BLAS thread unless ``OPENBLAS_NUM_THREADS``
    or ``OMP_NUM_THREADS`` says otherwise. At this backend's small matrices OpenBLAS's threads
    spin more than they compute: a bark-shape step took 57 ms on one thread and 585 ms on two
    on the 2-core machine (bench/bench_numpy.py)."""
    if not (os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")):
        os.environ["OPENBLAS_NUM_THREADS"] = "1"


def cmd_train_numpy(args, model_cfg, train_cfg) -> None:
    """`barkgpt train --backend numpy`: the NumPy trainer (barkgpt.numpy.train), which never imports torch."""
    if args.nproc != 1:
        raise BarkError("--backend numpy trains in one process; drop --nproc or use --backend torch")
    use_numpy_backend()
    load_builtin_datasets()
    from barkgpt.numpy.train import train

    result = train(model_cfg, train_cfg, resume=args.resume)
    print_run_summary(result, train_cfg.out_dir)


def backend_generator(args, **kw):
    """The text generator of ``--model`` for ``--backend`` (torch: barkgpt.generate, numpy: barkgpt.numpy.generate)."""
    if getattr(args, "backend", "torch") == "numpy":
        use_numpy_backend()
        from barkgpt.numpy.generate import load_generator
    else:
        from barkgpt.generate import load_generator
    return load_generator(args.model, device=args.device, **kw)


def print_run_summary(result: dict, out_dir: str) -> None:
    """The closing line of `train` and `finetune`."""
    val = f"{result['val_loss']:.4f}" if result["val_loss"] is not None else "n/a"
    print(
        f"done: step {result['step']}, train loss {result['train_loss']:.4f}, val loss {val} "
        f"(best {result['best_val_loss']:.4f}), {result['tokens_per_s']:,.0f} tokens/s; checkpoints in {out_dir}"
    )


def cmd_finetune(args) -> None:
    """`barkgpt finetune`: train a checkpoint further on chat JSONL, loss on assistant turns only."""
    from barkgpt.config import read_config_file
    from barkgpt.train import FINETUNE_DEFAULTS, finetune

    values = {
        **FINETUNE_DEFAULTS,
        **(read_config_file(args.config)["train"] if args.config else {}),
        **collect_overrides(args, TrainConfig),
    }
    cfg = TrainConfig(**values)
    result = finetune(
        args.model, args.data, cfg, val_fraction=args.val_fraction, group_field=args.group_field, resume=args.resume
    )
    print_run_summary(result, cfg.out_dir)


def cmd_dpo(args) -> None:
    """`barkgpt dpo`: preference-tune a checkpoint on chosen/rejected pairs (see barkgpt.dpo)."""
    from barkgpt.config import read_config_file
    from barkgpt.dpo import DPO_DEFAULTS, dpo

    values = {
        **DPO_DEFAULTS,
        **(read_config_file(args.config)["train"] if args.config else {}),
        **collect_overrides(args, TrainConfig),
    }
    cfg = TrainConfig(**values)
    result = dpo(args.model, args.data, cfg, beta=args.beta, val_fraction=args.val_fraction, resume=args.resume)
    print_run_summary(result, cfg.out_dir)


def eval_bark_agent(args) -> None:
    """`barkgpt eval --bark-agent`: tool calls on held-out requests (see bark.bark_agent_eval)."""
    import json

    from barkgpt.bark import bark_agent_eval
    from barkgpt.generate import load_generator

    r = bark_agent_eval(load_generator(args.model, device=args.device), n=args.samples, seed=args.seed)
    if args.json:
        print(json.dumps(r))
        return
    print(
        f"right tool and arguments in {r['right']}/{r['samples']} held-out requests ({r['right_share']:.0%}); "
        f"valid calls {r['valid_share']:.0%}; answers from the result {r['answered_share']:.0%}; "
        f"no call for small talk {r['talked']}/{r['talk_samples']}"
    )
    for f in r["failures"][:5]:
        print(f"  fails: User: {f['request']} -> {f['reply']!r} (expected {json.dumps(f['expected'])})")


def cmd_eval(args) -> None:
    """`barkgpt eval`: loss, perplexity and bits per byte on a text, or --bark rule-following."""
    import json

    if args.bark:
        gen = backend_generator(args)  # first: --backend numpy sets its BLAS threads before numpy loads
        from barkgpt.bark import bark_eval, long_growl_share

        r = bark_eval(gen, n=args.samples, seed=args.seed)
        r["long_growl"] = long_growl_share(gen, n=args.samples, seed=args.seed)  # the behaviour bark-dpo prefers
        if args.json:
            print(json.dumps(r))
            return
        print(f"bark rule followed by {r['passed']}/{r['samples']} sampled replies ({r['share']:.0%})")
        others = [v for c, v in r["by_command"].items() if c != "growl"]
        g = r["long_growl"]
        print(
            f"  commands other than growl: {sum(p for p, _ in others)}/{sum(n for _, n in others)} on rule; growl answered "
            f"with the long growl (bark-dpo's preference) in {g['long_growl']}/{g['samples']} replies ({g['share']:.0%})"
        )
        for f in r["failures"][:5]:
            print(f"  fails: User: {f['command']} -> {f['reply']!r} ({f['finish_reason']})")
        return
    if args.bark_agent:
        eval_bark_agent(args)
        return
    if not args.data:
        raise BarkError(
            "barkgpt eval needs --data FILE (a text to score), --bark (the Bark chat rule check) or --bark-agent (tool calls)"
        )
    if args.backend == "numpy":
        raise BarkError(
            "eval --data scores with the torch backend (it reads any checkpoint, numpy-trained ones too); drop --backend numpy"
        )
    from barkgpt.evaluate import evaluate_text

    r = evaluate_text(
        args.model, args.data, split=args.split, val_fraction=args.val_fraction, device=args.device, batch_size=args.batch_size
    )
    if r["note"]:
        print(r["note"], file=sys.stderr)
    if args.json:
        print(json.dumps(r))
        return
    unknown = f"; {r['unknown']:,} unknown characters/words scored as <UNK>" if r["unknown"] else ""
    cut = f" (val_fraction {r['val_fraction']:g})" if r["val_fraction"] is not None else ""
    print(
        f"{r['split']} split{cut} of {r['data']}: loss {r['loss']:.4f} nats/token, perplexity {r['perplexity']:.2f}, "
        f"{r['bits_per_byte']:.4f} bits/byte over {r['tokens']:,} tokens ({r['bytes']:,} bytes){unknown}; "
        f"{r['tokens_per_s']:,.0f} tokens/s"
    )


def cmd_export(args) -> None:
    """`barkgpt export hf|gguf`: write a Hugging Face folder or a GGUF file (see barkgpt.export)."""
    if args.format == "hf":
        from barkgpt.export.hf import export_hf

        out = export_hf(args.model, args.out, force=args.force)
        print(f"wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        try:
            import gguf  # noqa: F401 - imported only to check that the export extra is installed
        except ImportError:
            raise BarkError("barkgpt export gguf needs the gguf package; pip install 'barkgpt[export]'") from None
        from barkgpt.export.gguf import export_gguf

        out = export_gguf(args.model, args.out, outtype=args.outtype, force=args.force)
        print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.outtype}): run it with llama-cli -m {out}")


def cmd_import(args) -> None:
    """`barkgpt import hf`: turn a Hugging Face GPT-2/Llama folder into a checkpoint."""
    from barkgpt.export.hf import import_hf

    out = import_hf(args.model, args.out, force=args.force)
    print(f"wrote {out}: use it with barkgpt sample/chat/serve --model {out}, or train --init-from {out}")


def sampling_kwargs(args) -> dict:
    """SamplingParams fields given on the command line, validated."""
    kw = collect_overrides(args, SamplingParams)
    kw.pop("logprobs", None)  # a server setting: the CLI prints text
    SamplingParams(**kw)  # validate early: one clear line for a bad value
    return kw


def sample_constraint(args):
    """The --json-schema/--choice/--regex/--grammar constraint of `barkgpt sample`, or None.

    Raises:
        BarkError: an unreadable file, or a constraint out of bounds.
    """
    if not (args.json_schema or args.choice or args.regex or args.grammar):
        return None
    from barkgpt.structured import Constraint

    path = args.json_schema or args.grammar
    try:
        text = open(path, encoding="utf-8").read() if path else None
    except OSError as e:
        raise BarkError(f"cannot read {path} ({e.strerror}); check the path") from None
    if args.json_schema:
        return Constraint.json_schema(text)
    if args.grammar:
        return Constraint.grammar(text)
    return Constraint.choice(args.choice) if args.choice else Constraint.regex(args.regex)


def cmd_sample(args) -> None:
    """`barkgpt sample`: stream one sample, or print --num-samples of them."""
    kw = sampling_kwargs(args)
    gen = backend_generator(args, compile=args.compile)
    prompt = args.prompt
    if args.prompt_file:
        prompt = open(args.prompt_file, encoding="utf-8").read()
    n = kw.get("num_samples", 1)
    kw["constraint"] = sample_constraint(args)
    if n == 1 and not args.one_line:
        sys.stdout.write(prompt)
        for piece in gen.stream(prompt, truncate=args.truncate, **kw):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for i, c in enumerate(gen.complete(prompt, truncate=args.truncate, **kw)):
        if args.one_line:  # one exchange per line, with the end-of-sequence token made visible
            eos = f" {gen.tokenizer.id_to_token(gen.tokenizer.eos_id)}" if c.finish_reason == "stop" else ""
            print(f"{prompt}{c.text}{eos}".replace("\n", "\\n"))
        else:
            print(f"--- sample {i + 1}\n{prompt}{c.text}")


def cmd_chat(args) -> None:
    """`barkgpt chat`: the REPL of barkgpt.chat (slash commands, history, --url for a served model)."""
    from barkgpt.chat import chat

    chat(args, sampling_kwargs(args))


def cmd_serve(args) -> None:
    """`barkgpt serve`: the OpenAI-compatible HTTP server (needs the `serve` extra).

    The port opens first and the model loads in the background (``/health`` answers 503 until
    then). Test-only: ``BARKGPT_TEST_LOAD_DELAY`` (seconds) delays the load, so tests can see the
    503 window; it is not a user setting.
    """
    import time
    from pathlib import Path

    cfg = ServeConfig(**collect_overrides(args, ServeConfig))  # bad flags fail before the slow imports
    api_key = cfg.api_key or os.environ.get("BARKGPT_API_KEY") or None
    if cfg.api_key_file:
        try:
            api_key = Path(cfg.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise BarkError(f"cannot read --api-key-file {cfg.api_key_file}: {e.strerror}") from None
        if not api_key:
            raise BarkError(f"--api-key-file {cfg.api_key_file} is empty")
    if cfg.runs and Path(cfg.runs).exists() and not Path(cfg.runs).is_dir():
        raise BarkError(f"--runs {cfg.runs} is not a folder; give the folder that holds your run folders (e.g. runs)")
    for root in cfg.data_root:
        if not Path(root).is_dir():
            raise BarkError(f"--data-root {root} is not a folder; give a folder of data that runs started on the page may read")
    if cfg.runs and not api_key and not _is_loopback(cfg.host):
        raise BarkError(
            f"--host {cfg.host} lets other machines reach the server, and --runs lets any of them start "
            "training runs: set an API key (--api-key-file FILE or BARKGPT_API_KEY) or bind 127.0.0.1"
        )
    folder = Path(args.model).resolve()
    if not folder.exists():
        raise BarkError(f"--model {args.model} does not exist; give a run folder (runs/x) or a checkpoint folder")
    name = cfg.model_name or (folder.parent.name if folder.name in ("best", "last") else folder.name)
    cfg = dataclasses.replace(cfg, model_name=name, api_key=api_key, api_key_file=None)
    load_builtin_datasets()  # runs started from the page may name them as data
    try:
        from barkgpt.server.app import run_server
    except ImportError as e:
        raise BarkError(f"barkgpt serve needs the serve extra ({e.name} is missing); pip install 'barkgpt[serve]'") from None
    from barkgpt.generate import load_generator

    def load():
        time.sleep(float(os.environ.get("BARKGPT_TEST_LOAD_DELAY") or 0))  # test-only, see the docstring
        import torch

        # One scheduler thread runs the model while the event loop streams: on a few cores,
        # leaving it a core beats one more matmul thread (16 streams: ~1,400 vs ~1,050 tokens/s on 2 cores).
        threads = cfg.threads or (None if os.environ.get("OMP_NUM_THREADS") else max(1, (os.cpu_count() or 1) - 1))
        if threads:
            torch.set_num_threads(threads)
        gen = load_generator(args.model, device=args.device)
        print(f"model loaded: block_size {gen.block_size}", flush=True)
        return gen

    auth = "API key required" if api_key else "no API key"
    print(
        f"serving {name} at http://{cfg.host}:{cfg.port}/v1 ({auth}), web page at http://{cfg.host}:{cfg.port}/; "
        "loading the model",
        flush=True,
    )
    run_server(load, cfg)


def _is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server to this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def add_prepare_verb(sub) -> None:
    """``barkgpt prepare``: its flags, on the subparsers action ``sub``."""
    sp = sub.add_parser("prepare", help="tokenize a text corpus into train.bin/val.bin + tokenizer")
    sp.add_argument(
        "--input",
        required=True,
        help="a text file, a folder of .txt/.md files, a .jsonl or .parquet file, a datasets folder (save_to_disk); .gz/.zst too",
    )
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--tokenizer", default="bpe", choices=["bpe", "char", "word"], help="tokenizer kind to train (default bpe)")
    sp.add_argument("--vocab-size", type=int, default=None, help="vocabulary size (bpe default 2048)")
    sp.add_argument("--val-fraction", type=float, default=0.1, help="tail fraction of the input for validation (default 0.1)")
    sp.add_argument("--tokenizer-from", default=None, help="reuse the tokenizer in this folder instead of training one")
    sp.add_argument(
        "--text-field", default="text", help="the JSON field or table column holding the text (.jsonl, .parquet; default text)"
    )
    sp.add_argument("--errors", default="strict", choices=["strict", "replace"], help="what to do with bytes that are not UTF-8")
    sp.set_defaults(func=cmd_prepare)


def add_train_verb(sub) -> None:
    """``barkgpt train``: its own flags plus one per GPTConfig and TrainConfig field."""
    sp = sub.add_parser("train", help="train a model (from a preset, a config file and flags)")
    sp.add_argument("--preset", default=None, help=f"a preset from barkgpt/configs: {', '.join(preset_names())}")
    sp.add_argument("--config", default=None, help="a run config YAML (e.g. runs/x/config.yaml)")
    sp.add_argument("--resume", action="store_true", help="continue from out_dir/last")
    sp.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    sp.add_argument("--nproc", type=int, default=1, help="train on N processes with DDP: starts torchrun for you (default 1)")
    sp.add_argument(
        "--backend", default="torch", choices=["torch", "numpy"], help="torch, or numpy: the NumPy-only trainer (barkgpt/numpy)"
    )
    sp.add_argument(
        "--budget",
        default=None,
        help="plan the run to end within this wall clock (90s, 10m, 2h): tokenizer, model, batch, lr, steps "
        "(default with --data alone and no preset or model flags: 10m); flags you give override the plan",
    )
    sp.add_argument("--dry-run", action="store_true", help="print the plan's pre-flight table and exit")
    add_dataclass_args(sp, GPTConfig)
    add_dataclass_args(sp, TrainConfig)
    sp.set_defaults(func=cmd_train)


def add_finetune_verb(sub) -> None:
    """``barkgpt finetune``: its own flags plus one per TrainConfig field it does not fix itself."""
    sp = sub.add_parser("finetune", help="fine-tune a model on conversations (JSONL), loss on assistant turns only")
    sp.add_argument("--model", required=True, help="the run or checkpoint folder to start from")
    sp.add_argument("--data", required=True, help="a .jsonl of OpenAI 'messages' or ShareGPT 'conversations' rows")
    sp.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of conversation groups held out for validation (default 0.1)"
    )
    sp.add_argument(
        "--group-field",
        default="tree_id",
        help="row field grouping conversations that share turns; rows without it stand alone (default tree_id)",
    )
    sp.add_argument("--config", default=None, help="a run config YAML whose train section applies (e.g. runs/x/config.yaml)")
    sp.add_argument("--resume", action="store_true", help="continue from out_dir/last")
    add_dataclass_args(sp, TrainConfig, skip=("data", "init_from", "tokenizer", "tokenizer_vocab_size"))
    sp.set_defaults(func=cmd_finetune)


def add_dpo_verb(sub) -> None:
    """``barkgpt dpo``: its own flags plus one per TrainConfig field it does not fix itself."""
    sp = sub.add_parser("dpo", help="preference-tune a model (DPO) on chosen/rejected pairs or OASST trees (JSONL)")
    sp.add_argument("--model", required=True, help="the run or checkpoint folder to start from (and the frozen reference)")
    sp.add_argument(
        "--data", required=True, help="a .jsonl of prompt/chosen/rejected rows (TRL's format) or OpenAssistant message trees"
    )
    sp.add_argument(
        "--beta", type=float, default=0.1, help="DPO's beta: how far the policy may move from the reference (default 0.1)"
    )
    sp.add_argument(
        "--val-fraction", type=float, default=0.1, help="share of pair groups (trees) held out for validation (default 0.1)"
    )
    sp.add_argument("--config", default=None, help="a run config YAML whose train section applies (e.g. runs/x/config.yaml)")
    sp.add_argument("--resume", action="store_true", help="continue from out_dir/last")
    add_dataclass_args(sp, TrainConfig, skip=("data", "init_from", "tokenizer", "tokenizer_vocab_size"))
    sp.set_defaults(func=cmd_dpo)


def add_eval_verb(sub) -> None:
    """``barkgpt eval``: its flags."""
    sp = sub.add_parser("eval", help="measure a model: loss, perplexity, bits per byte on a text; or --bark")
    sp.add_argument("--model", required=True, help="a run folder (best/ is used) or checkpoint folder")
    sp.add_argument(
        "--data",
        default=None,
        help="the text to score: a .txt file, a folder of .txt, a .jsonl with 'text', or a folder from barkgpt prepare (its tokens)",
    )
    sp.add_argument(
        "--split",
        default="all",
        choices=["all", "train", "val"],
        help="score all of it, or the part barkgpt prepare put (or would put) in train/val (default all)",
    )
    sp.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="the val share to cut a text's --split at (default: the one prepare used, as the checkpoint records it; else 0.1)",
    )
    sp.add_argument("--batch-size", type=int, default=16, help="windows of block_size tokens per forward pass (default 16)")
    sp.add_argument("--bark", action="store_true", help="instead: the share of sampled replies that follow the Bark chat rule")
    sp.add_argument(
        "--bark-agent",
        action="store_true",
        help="instead: the share of held-out requests a bark-agent model answers with the right tool call (greedy)",
    )
    sp.add_argument("--samples", type=int, default=100, help="--bark/--bark-agent: requests to sample (default 100)")
    sp.add_argument("--seed", type=int, default=0, help="--bark/--bark-agent: seed of the requests and the sampling (default 0)")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    sp.add_argument("--json", action="store_true", help="print one JSON object instead of a sentence")
    sp.add_argument("--backend", default="torch", choices=["torch", "numpy"], help="--bark: sample with torch or numpy")
    sp.set_defaults(func=cmd_eval)


def add_export_import_verbs(sub) -> None:
    """``barkgpt export hf|gguf`` and ``barkgpt import hf``: their flags."""
    sp = sub.add_parser("export", help="export a model to a Hugging Face folder or a GGUF file (llama.cpp)")
    sp.add_argument("format", choices=["hf", "gguf"], help="hf: a transformers folder; gguf: one file for llama.cpp")
    sp.add_argument("--model", required=True, help="a run folder (best/ is used) or checkpoint folder")
    sp.add_argument("--out", required=True, help="the folder (hf) or .gguf file (gguf) to write")
    sp.add_argument(
        "--outtype", default="f16", choices=["f32", "f16", "q8_0"], help="gguf: weight type of the 2-D tensors (default f16)"
    )
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("import", help="turn a Hugging Face GPT-2 or Llama folder into a barkgpt checkpoint")
    sp.add_argument("format", choices=["hf"], help="hf: a transformers folder (local path, or a Hub name when online)")
    sp.add_argument("--model", required=True, help="the Hugging Face folder (config.json, weights, tokenizer.json)")
    sp.add_argument("--out", required=True, help="the checkpoint folder to write")
    sp.add_argument("--force", action="store_true", help="replace --out if it exists")
    sp.set_defaults(func=cmd_import)


def add_generation_verbs(sub) -> None:
    """``barkgpt sample`` and ``barkgpt chat``: shared model flags, their own, and one per SamplingParams field."""
    for name, helptext, func in (
        ("sample", "generate text from a trained model", cmd_sample),
        ("chat", "talk to a model with its chat template", cmd_chat),
    ):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument(
            "--model",
            required=name == "sample",
            help="a run folder (runs/x) or checkpoint folder"
            + ("" if name == "sample" else "; with --url, a served model's name"),
        )
        sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        sp.add_argument(
            "--compile",
            action="store_true",
            help="torch.compile the decode step: ~3x tokens/s on CPU after a one-time 5-20 s compile",
        )
        sp.add_argument(
            "--backend", default="torch", choices=["torch", "numpy"], help="torch, or numpy: decode with barkgpt/numpy"
        )
        if name == "sample":
            sp.add_argument("--prompt", default="", help="text to continue ('' starts a new document)")
            sp.add_argument("--prompt-file", default=None, help="read the prompt from this file")
            sp.add_argument("--truncate", action="store_true", help="keep the tail of a prompt longer than block_size")
            sp.add_argument(
                "--one-line",
                action="store_true",
                help="with --num-samples: print each sample on one line, ending in <EOS> when the model stopped",
            )
            c = sp.add_mutually_exclusive_group()  # one constraint on the text (barkgpt/structured.py)
            c.add_argument("--json-schema", default=None, metavar="FILE", help="the sample is JSON valid under this schema file")
            c.add_argument("--choice", action="append", default=None, help="the sample is exactly one of these (repeatable)")
            c.add_argument("--regex", default=None, help="the sample matches this regex whole (Rust regex syntax)")
            c.add_argument("--grammar", default=None, metavar="FILE", help="the sample is in this Lark grammar's language")
        else:
            sp.add_argument("--system", default="", help="a system message")
            sp.add_argument(
                "--url", default=None, help="chat with a served model instead: its OpenAI API, e.g. http://127.0.0.1:8000/v1"
            )
        add_dataclass_args(sp, SamplingParams, skip=("logprobs",))
        sp.set_defaults(func=func)


def add_serve_verb(sub) -> None:
    """``barkgpt serve``: its own flags plus one per ServeConfig field."""
    sp = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    sp.add_argument("--model", required=True, help="a run folder (runs/x) or checkpoint folder")
    sp.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    add_dataclass_args(sp, ServeConfig)
    sp.add_argument(
        "--no-prefix-cache",
        dest="prefix_cache",
        action="store_const",
        const="false",
        help="prefill every prompt in full (same as --prefix-cache false)",
    )
    sp.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """The full argparse tree, one ``add_*_verb(s)`` helper per verb (no heavy imports: no torch)."""
    p = argparse.ArgumentParser(prog="barkgpt", description="Train a small GPT from raw text, then sample and chat with it.")
    p.add_argument("--version", action="version", version=f"barkgpt {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add_verbs in (
        add_prepare_verb,
        add_train_verb,
        add_finetune_verb,
        add_dpo_verb,
        add_eval_verb,
        add_export_import_verbs,
        add_generation_verbs,
        add_serve_verb,
    ):
        add_verbs(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``barkgpt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # as given, for verbs that re-launch themselves
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        args.func(args)
    except BarkError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
