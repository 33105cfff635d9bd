"""One statement of what B_simple predicts (hasten.measure.noise_scale.B_SIMPLE_PREDICTS), quoted verbatim by the
CLI, the run report, the study report, README.md and docs/architecture.md; and "not measurable yet" from the CLI."""
import html
import re
from pathlib import Path

import pytest
import torch

from hasten.cli.main import main as cli
from hasten.measure.noise_scale import B_SIMPLE_PREDICTS, NOT_MEASURABLE

ROOT = Path(__file__).resolve().parents[2]


def _words(text: str) -> str:
    return " ".join(text.split())  # Markdown wraps lines


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_docs_quote_the_statement(doc):
    assert _words(B_SIMPLE_PREDICTS) in _words((ROOT / doc).read_text())


def test_no_other_ratio_claims_in_the_code():
    """The ratios that used to disagree (CLI 0.1-0.5x, study 0.05 to 8) are gone; the statement is the one source."""
    for path in (ROOT / "hasten").rglob("*.py"):
        text = path.read_text()
        for old in ("0.1-0.5x", "0.05 to 8", "order-of-magnitude guide"):
            assert old not in text, (path, old)


def test_study_report_quotes_the_statement():
    from hasten.study.report import study_report

    per_batch = [{"batch_size": b, "seed": 0, "lr": 0.1, "momentum": 0.9, "steps": 800 // b, "examples": 800,
                  "time": 1.0, "reached": True} for b in (8, 16)]
    s = {"task": "digits", "goals": ["train loss 0.1"], "batch_sizes": [8, 16], "per_batch": per_batch, "fit": None,
         "environment": {}, "elapsed_s": 1.0,
         "notes": [], "prediction": {"batch_size": 8, "lr": 0.1, "noise_source": "micro", "noise_horizon": 1e4,
                                     "b_simple_at_target": 50.0, "b_simple_mean": 40.0, "b_simple_lo": 30.0,
                                     "b_simple_hi": 90.0, "trajectory": []}}
    page = study_report(s, []).render()
    assert html.escape(B_SIMPLE_PREDICTS) in page and "30 to 90" in page


def _run(tmp_path, capsys, steps):
    n = torch.get_num_threads()
    try:
        assert cli(["noise-scale", "digits", f"steps={steps}", "eval_every=0", "checkpoint_every=0",
                    "progress=false", "threads=1", f"run_dir={tmp_path}"]) == 0
    finally:
        torch.set_num_threads(n)
    return capsys.readouterr().out, (tmp_path / "report.html").read_text()


def test_cli_and_report_print_the_interval_and_the_statement(tmp_path, capsys):
    out, page = _run(tmp_path, capsys, steps=120)
    lo, hi = map(float, re.search(r"95% interval (\S+) to (\S+),", out).groups())
    assert 0 <= lo < hi < float("inf")
    assert B_SIMPLE_PREDICTS in out and html.escape(B_SIMPLE_PREDICTS) in page
    assert NOT_MEASURABLE not in out and "±" not in out


def test_cli_and_report_say_not_measurable_yet_after_three_steps(tmp_path, capsys):
    out, page = _run(tmp_path, capsys, steps=3)
    assert f"B_simple: {NOT_MEASURABLE}" in out
    assert "predicted critical batch size" not in out and B_SIMPLE_PREDICTS not in out
    assert html.escape(NOT_MEASURABLE) in page and "Predicted critical batch size" not in page
