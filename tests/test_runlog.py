"""The run log: one reader of ``metrics.jsonl`` for ``train`` (strict: a torn last line is
dropped, a bad middle line is named) and the web page (lenient: a line being appended is
skipped), the rows' writers, and the plots drawn from them."""

import json
import math

import pytest

from barkgpt.common import BarkError
from barkgpt.runlog import append_row, finite_or_none, parse_rows, plot_run, read_rows, rewrite_rows

GOOD = '{"step": 1, "train_loss": 2.5}\n\n{"step": 2, "val_loss": 2.4}\n'


def test_strict_drops_a_torn_last_line_with_a_warning(capsys):
    rows = parse_rows(GOOD + '{"step": 3, "tra', "m.jsonl")
    assert rows == [{"step": 1, "train_loss": 2.5}, {"step": 2, "val_loss": 2.4}]
    assert "m.jsonl line 4 is torn" in capsys.readouterr().err  # blank lines count in the numbering


@pytest.mark.parametrize("bad", ["{oops", "[1, 2]", '{"train_loss": 1.0}', '{"step": "3"}'])
def test_strict_names_a_bad_line_before_the_last(bad):
    with pytest.raises(BarkError, match=r"^m\.jsonl line 2 is not a JSON row with a step; fix or delete that line$"):
        parse_rows(GOOD.replace("\n", f"\n{bad}\n", 1), "m.jsonl")


@pytest.mark.parametrize("bad", ["{oops", "[1, 2]", '{"train_loss": 1.0}', '{"step": "3"}', '{"step": 3, "tra'])
def test_lenient_skips_every_line_that_is_not_a_row_anywhere(bad, capsys):
    text = GOOD.replace("\n", f"\n{bad}\n", 1) + bad
    assert parse_rows(text, strict=False) == [{"step": 1, "train_loss": 2.5}, {"step": 2, "val_loss": 2.4}]
    assert capsys.readouterr().err == ""


def test_read_rows_of_a_missing_file(tmp_path):
    assert read_rows(tmp_path / "none.jsonl", strict=False) == []
    with pytest.raises(OSError):
        read_rows(tmp_path / "none.jsonl")


def test_written_rows_read_back_and_non_finite_numbers_become_none(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_row(path, {"step": 1, "train_loss": float("nan"), "lr": 1e-3})
    append_row(path, {"step": 2, "train_loss": float("inf"), "expert_share": [0.5, 0.5]})
    rows = read_rows(path)
    assert rows[0]["step"] == 1 and math.isnan(rows[0]["train_loss"])
    assert [finite_or_none(r) for r in rows] == [
        {"step": 1, "train_loss": None, "lr": 1e-3},
        {"step": 2, "train_loss": None, "expert_share": [0.5, 0.5]},
    ]
    json.dumps([finite_or_none(r) for r in rows], allow_nan=False)  # what the page sends is valid JSON
    rewrite_rows(path, rows[1:])
    assert [r["step"] for r in read_rows(path)] == [2]
    assert not [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]  # the rewrite left no temporary file


def test_plot_run_draws_the_losses_and_the_experts_only_for_a_moe_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "train_loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 6)] + [{"step": 5, "val_loss": 2.6}]
    rewrite_rows(run / "metrics.jsonl", rows)
    plot_run(run)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run / "experts.png").exists()  # a dense run: no expert plot
    rewrite_rows(run / "metrics.jsonl", [{**r, "expert_share": [0.7, 0.3]} for r in rows[:5]])
    plot_run(run)
    assert (run / "experts.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_reads_metrics_with_the_same_parser_as_train(tmp_path):
    """A JSON line that is not a row (no step) is no row for the page either, and the page keeps
    its tolerance of a torn line anywhere and its non-finite numbers as None."""
    pytest.importorskip("fastapi")
    from barkgpt.server.runfiles import read_jsonl, read_metrics

    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "train_loss": NaN}\n{"note": "no step"}\n{torn\n{"step": 2, "val_loss": 2.4}\n[3]\n'
    )
    assert read_metrics(tmp_path) == [{"step": 1, "train_loss": None}, {"step": 2, "val_loss": 2.4}]
    (tmp_path / "samples.jsonl").write_text('{"step": 1, "text": "a"}\n{"text": "no step"}\n{"step": 2, "te')
    assert read_jsonl(tmp_path / "samples.jsonl") == [{"step": 1, "text": "a"}]
