"""The shape of the code (issue 14, item 5): no function in ``barkgpt/`` over 80 lines, checked
with ``ast`` (from its ``def`` line to the end of its body; methods and nested functions each
count on their own)."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "barkgpt"
MAX_FUNCTION_LINES = 80
# Functions over the limit when the rule came in, each to be split; none may be added, and one
# that is split (or shrinks under the limit) must leave this table.
KNOWN_LONG: set[tuple[str, str]] = set()  # empty since issue 14 split build_parser and create_app


def function_lengths(source: str) -> dict[str, int]:
    """Each function's qualified name (``Class.method``, ``outer.inner``) -> its lines, ``def`` to end."""
    out = {}

    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out[prefix + child.name] = child.end_lineno - child.lineno + 1
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(ast.parse(source), "")
    return out


def long_functions() -> set[tuple[str, str]]:
    found = set()
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        for name, n in function_lengths(path.read_text(encoding="utf-8")).items():
            if n > MAX_FUNCTION_LINES:
                found.add((rel, name))
    return found


def test_no_function_in_the_package_is_over_80_lines():
    new = sorted(long_functions() - KNOWN_LONG)
    assert not new, f"functions over {MAX_FUNCTION_LINES} lines (split them into short named steps): {new}"


def test_the_known_long_functions_are_still_long():
    gone = sorted(KNOWN_LONG - long_functions())
    assert not gone, f"{gone} are now within {MAX_FUNCTION_LINES} lines (or gone): remove them from KNOWN_LONG"


def test_the_count_runs_from_def_to_the_end_of_the_body_and_sees_methods_and_nested_functions():
    body = "\n".join(f"    x{i} = {i}" for i in range(80))
    source = (
        f"@decorator\ndef long():\n{body}\n\n\nclass A:\n    def m(self):\n        def inner():\n"
        f"            pass\n        return inner\n"
    )
    lengths = function_lengths(source)
    assert lengths == {"long": 81, "A.m": 4, "A.m.inner": 2}


def test_the_training_loop_shares_no_state_through_closures():
    """Training state lives in ``checkpoint.TrainState`` and the ``Trainer``'s attributes."""
    for name in ("train.py", "checkpoint.py", "runlog.py"):
        tree = ast.parse((PKG / name).read_text(encoding="utf-8"))
        assert not [n.lineno for n in ast.walk(tree) if isinstance(n, (ast.Nonlocal, ast.Global))], name


MAX_SERVER_MODULE_LINES = 400  # issue 14: the server splits by concern, each module under 400 lines


def test_each_server_module_is_under_400_lines():
    long = {
        p.name: n
        for p in PKG.glob("server/*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) >= MAX_SERVER_MODULE_LINES
    }
    assert not long, f"server modules of {MAX_SERVER_MODULE_LINES}+ lines (split them by concern): {long}"
