"""The import rules of STYLE.md section 3, checked with ``ast``; the Bark toy kept at the edge;
and light imports."""

import ast
import re
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "barkgpt"

SERVER = {"server", "engine", "checkpoint", "model", "tokenizer", "config", "common", "generate", "runlog", "structured"}
# No module but the CLI imports bark: it is an edge that fills data's dataset hook on import.
ALLOWED = {
    "__init__": {"generate"},
    "__main__": {"cli"},
    "config": {"common"},
    "common": set(),
    "tokenizer": {"common"},
    "cpu_attention": set(),
    "model": {"config", "cpu_attention"},
    "data": {"tokenizer", "config", "common", "readers"},
    # The input formats (issue 17): text/jsonl byte streams (gzip, zstd), parquet and datasets tables.
    "readers": {"common"},
    # The run planner (issue 17): measures shapes with model/optim, prepares data; its StepClock
    # is the trainer's forecast and deadline, so train imports it (not the other way).
    "planner": {"common", "config", "data", "readers", "model", "optim", "cpu_attention"},
    # Experiment trackers beside metrics.jsonl (issue 17): TensorBoard, W&B offline.
    "trackers": {"common"},
    "engine": {"model", "common", "config"},  # config: SamplingParams, the one form of sampling settings (issue 14)
    "checkpoint": {"model", "tokenizer", "config", "common"},
    "generate": {"engine", "checkpoint", "model", "tokenizer", "config", "common", "structured"},
    # Constrained decoding (issue 15): grammars over a tokenizer, applied as engine row hooks; beside engine.
    "structured": {"tokenizer", "common"},
    "conversations": {"tokenizer", "common"},
    # The Bark toy (STYLE.md section 3): an edge over the core it needs, imported only by the CLI;
    # it registers its corpora with data.register_dataset instead of the core naming them.
    "bark": {"tokenizer", "data", "conversations", "common", "preferences"},
    # Preference pairs for DPO (issue 19): reading, OASST trees, packing; numpy only, beside conversations.
    "preferences": {"tokenizer", "conversations", "common"},
    # DPO (issue 19): a train.Trainer subclass with another objective, so it reuses the loop's
    # checkpoints and exact resume; like train, only the CLI imports it.
    "dpo": {"train", "preferences", "checkpoint", "config", "common", "conversations", "tokenizer"},
    # The chat REPL (issue 19): the CLI's `chat` verb over a local generator or an OpenAI client.
    "chat": {"generate", "config", "common", "numpy"},
    "train": {
        "model",
        "data",
        "conversations",
        "engine",
        "checkpoint",
        "config",
        "common",
        "tokenizer",
        "optim",
        "distributed",
        "cpu_attention",
        "runlog",
        "planner",
        "trackers",
    },
    "evaluate": {"checkpoint", "common", "conversations", "data", "generate", "model", "tokenizer"},
    "optim": {"model", "config", "common"},
    "distributed": {"common"},
    # runlog: metrics.jsonl and the plots, one reader and writer for train and the web page (engine/checkpoint layer)
    "runlog": {"common"},
    "cli": None,  # anything, inside the subcommand's function
    # The server, split by concern (issue 14): app (wiring only), serving + streaming (the OpenAI
    # routes and their responses), host (the model and its scheduler), metrics, security, errors,
    # protocol + native_protocol (schemas), web (the page and run routes), runs + runfiles (run folders), run_limits (size estimates).
    **{
        f"server.{m}": SERVER
        for m in (
            "__init__",
            "protocol",
            "native_protocol",
            "errors",
            "scheduler",
            "handoff",  # the worker -> event loop token hand-off (scheduler's mailboxes)
            "security",
            "app",
            "host",
            "metrics",
            "serving",
            "streaming",
            "web",
            "runfiles",
            "run_limits",
            "tools",
            "tool_protocol",
        )
    },
    # runs: data for the dataset hook's names (a run's data that is a generated corpus, not a path).
    "server.runs": SERVER | {"data"},
    # The NumPy backend (issue 16): the same GPT with hand-written backward passes; never torch.
    # It shares config, tokenizer, data, checkpoint names and runlog, and TextGenerator's text layer.
    **{
        f"numpy.{m}": {"common", "config", "tokenizer", "data", "conversations", "checkpoint", "runlog", "generate", "numpy"}
        for m in ("__init__", "layers", "model", "optim", "train", "generate")
    },
    "export.__init__": set(),
    "export.hf": {"checkpoint", "model", "tokenizer", "config", "common", "generate"},
    "export.gguf": {"export", "checkpoint", "model", "tokenizer", "config", "common", "generate"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("barkgpt"):
            parts = node.module.split(".")
            out.add(parts[1] if len(parts) > 1 else node.names[0].name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("barkgpt."):
                    out.add(a.name.split(".")[1])
    return out - {"__version__"}


def test_every_module_imports_only_what_the_table_allows():
    for path in sorted(PKG.rglob("*.py")):
        name = ".".join(path.relative_to(PKG).with_suffix("").parts)
        assert name in ALLOWED, f"{name}.py is not in the import table; add it to STYLE's table and this test"
        allowed = ALLOWED[name]
        if allowed is None:
            continue
        bad = imported_modules(path) - allowed - {name}
        assert not bad, f"barkgpt/{name}.py imports {sorted(bad)}, which the import table forbids"


def test_import_and_help_do_not_load_torch():
    code = "import sys, barkgpt, barkgpt.cli, barkgpt.config; barkgpt.cli.build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# The Bark toy's names in a case-insensitive regex: the word "bark" alone (``bark``, ``runs/bark``,
# ``Bark chat``), ``bark_...``/``..._bark`` identifiers and ``bark-chat``, but not the package
# (``barkgpt``, ``BarkGPT``), its error class (``BarkError``, ``_bark_error``) or the dataset
# hook's own words. The issue's literal ``grep -rli bark`` matches every module through
# ``barkgpt``/``BarkError``; this is what it means.
BARK_NAME = re.compile(r"(?<![a-z0-9])bark(?!gpt|error|_error)(?![a-z0-9])|bark_(?!error)|_bark\b|bark-chat", re.IGNORECASE)
EDGE = {"bark.py", "cli.py"}  # the Bark module and the CLI may name it (and server/static, the page's text)
# Lines outside the edge that may name it, each with its reason.
ALLOWED_LINES = {
    ("server/native_protocol.py", 'preset: str = "bark"'),  # the run form's default preset: a preset name (configs/bark.yaml)
}


def test_core_modules_never_name_the_bark_toy():
    found = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel in EDGE:
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if BARK_NAME.search(line) and not any(rel == f and text in line for f, text in ALLOWED_LINES):
                found.append(f"barkgpt/{rel}:{n}: {line.strip()}")
    assert not found, "core modules name the Bark toy (move it to barkgpt/bark.py or use the dataset hook):\n" + "\n".join(found)


def test_the_bark_pattern_tells_the_toy_from_the_package():
    for text in (
        "data == 'bark'",
        "runs/bark",
        "Bark chat",
        "prepare_bark",
        "Tokenizer.bark()",
        "bark-chat",
        "from barkgpt.bark import x",
        "BARK_VOCAB",
        "follows_bark_rule",
    ):
        assert BARK_NAME.search(text), text
    for text in ("import barkgpt", "BarkGPT", "raise BarkError(x)", "async def _bark_error(request, exc)", "barkgpt.data"):
        assert not BARK_NAME.search(text), text


def test_no_core_module_imports_the_bark_module():
    importers = sorted(name for name, allowed in ALLOWED.items() if allowed is not None and "bark" in allowed)
    assert importers == [], importers  # only the CLI (allowed=None) may; the table says so
