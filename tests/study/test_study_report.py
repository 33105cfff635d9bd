"""The study's summary, report.html and printed summary when B_crit is not identified: the reason, never a number.
Built from synthetic trial records through the same analysis the study runs (no training)."""
import math

import pytest

from hasten.study.analysis import analyze
from hasten.study.options import StudyOptions, parse_target
from hasten.study.report import study_report
from hasten.study.runner import print_summary
from hasten.tasks import get_task
from hasten.train.config import task_config

BATCHES = (8, 16, 32, 64, 128, 256)


def records(steps_at):
    out = [{"trial_id": f"t{b}", "kind": "target", "batch_size": b, "lr": 0.1, "momentum": 0.9, "seed": 0,
            "status": "reached", "steps": steps_at(b), "examples": b * steps_at(b), "time": steps_at(b) / 100}
           for b in BATCHES]
    noise = {"trial_id": "n", "kind": "noise", "batch_size": 64, "lr": 0.1, "momentum": 0.9, "seed": 0,
             "status": "reached", "steps": steps_at(64), "examples": 64 * steps_at(64), "time": 1.0,
             "b_simple_at_target": 120.0, "b_simple_mean": 80.0, "trajectory": [[1, 50.0], [2, 120.0]],
             "adaptive_gain": 0.97, "noise_source": "micro", "noise_horizon": 100.0}
    return out + [noise]


def summarize(recs):
    task = get_task("digits")
    opts = StudyOptions(target="loss:0.1", bootstrap=200)
    s = analyze(recs, opts, task_config("digits", {}), task, parse_target(opts.target, task.metric_name), BATCHES,
                1437)
    return {**s, "task": "digits", "environment": {"commit": "test"}, "elapsed_s": 1.0}


def test_not_identified_shows_the_reason_instead_of_a_number(capsys):
    recs = records(lambda b: round(2e5 / b))  # S ∝ 1/B throughout: B_crit lies above the grid
    s = summarize(recs)
    fit = s["fit"]
    assert not fit["identified"] and fit["b_crit"] is None and fit["reason"] in s["notes"]
    assert "extend batch_sizes upward" in fit["reason"]
    assert {row["regime"] for row in s["per_batch"]} == {"perfect scaling"}
    pred = s["prediction"]
    assert pred["b_crit"] is None and "ratio_at_target" not in pred  # no ratio to a number that is not there
    text = "".join(study_report(s, recs).parts)
    assert "B_crit not identified (the curve has not bent within the grid" in text
    assert "Critical batch B_crit =" not in text and text.count("B_crit not identified (") == 1
    assert "not identified" in text.split("One-run prediction")[1]
    print_summary(s)
    out = capsys.readouterr().out
    assert "B_crit not identified" in out and "critical batch B_crit =" not in out
    assert out.count("B_crit not identified") == 1


def test_identified_shows_the_number(capsys):
    recs = records(lambda b: round(300 * (1 + 64 / b)))  # B_crit = 64, inside the grid
    s = summarize(recs)
    assert s["fit"]["identified"] and s["fit"]["b_crit"] == pytest.approx(64, rel=0.02)
    assert not any("not identified" in n for n in s["notes"])
    assert s["prediction"]["ratio_at_target"] == pytest.approx(s["fit"]["b_crit"] / 120.0)
    text = "".join(study_report(s, recs).parts)
    assert "Critical batch B_crit = 6" in text and "not identified" not in text
    print_summary(s)
    out = capsys.readouterr().out
    assert "critical batch B_crit = 6" in out and math.isfinite(s["fit"]["s_min"])
