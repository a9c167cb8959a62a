"""The import rules of STYLE.md section 3, checked with ``ast``; and light imports."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "barkgpt"

SERVER = {"server", "engine", "checkpoint", "model", "tokenizer", "config", "common", "generate"}
ALLOWED = {
    "__init__": {"generate"},
    "__main__": {"cli"},
    "config": {"common"},
    "common": set(),
    "tokenizer": {"common"},
    "cpu_attention": set(),
    "model": {"config", "cpu_attention"},
    "data": {"tokenizer", "config", "common"},
    "engine": {"model", "common"},
    "checkpoint": {"model", "tokenizer", "config", "common"},
    "generate": {"engine", "checkpoint", "model", "tokenizer", "config", "common"},
    "conversations": {"tokenizer", "common"},
    "train": {"model", "data", "conversations", "engine", "checkpoint", "config", "common", "tokenizer", "optim", "distributed", "cpu_attention"},
    "evaluate": {"checkpoint", "common", "conversations", "data", "generate", "model", "tokenizer"},
    "optim": {"model", "config", "common"},
    "distributed": {"common"},
    "cli": None,  # anything, inside the subcommand's function
    **{f"server.{m}": SERVER for m in ("__init__", "protocol", "errors", "scheduler", "security", "web", "app")},
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
    for path in [*PKG.glob("*.py"), *PKG.glob("server/*.py"), *PKG.glob("export/*.py")]:
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
