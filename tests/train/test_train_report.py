"""`hasten train` writes report.html; with a batch schedule it plots batch size, LR and B_simple from metrics.jsonl."""
import json

import numpy as np
import torch

from hasten.cli.main import main as cli
from hasten.report.schedule import changes_batch_or_measures, schedule_figure, schedule_series


def test_batch_increase_run_plots_batch_lr_and_b_simple_from_its_metrics(tmp_path):
    n = torch.get_num_threads()
    args = ["train", "digits", "batch=increase", "schedule=step", "steps=40", "batch_size=16", "eval_every=0",
            "checkpoint_every=0", "progress=false", "threads=1", "noise_budget=0", f"run_dir={tmp_path}"]
    try:
        assert cli(args) == 0
    finally:
        torch.set_num_threads(n)
    html = (tmp_path / "report.html").read_text()
    assert "Batch size, learning rate and B_simple" in html and html.count("data:image/png;base64,") >= 4
    assert "http://" not in html and "https://" not in html  # opens offline

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    series = schedule_series(rows)
    for name, key in (("step", "step"), ("examples", "examples"), ("batch_size", "batch_size"), ("lr", "lr")):
        np.testing.assert_array_equal(series[name], [r[key] for r in rows])
    b = [np.nan if r.get("noise/b_simple") is None else r["noise/b_simple"] for r in rows]
    np.testing.assert_array_equal(series["b_simple"], b)
    assert len(set(series["batch_size"])) > 1 and changes_batch_or_measures(rows)

    fig = schedule_figure(rows)  # what is drawn: top row against examples, bottom row against steps
    (batch_ax, lr_ax, noise_ax), (batch_by_step, _, _) = fig.axes[:3], fig.axes[3:6]
    np.testing.assert_array_equal(batch_ax.lines[0].get_xdata(), series["examples"])
    np.testing.assert_array_equal(batch_ax.lines[0].get_ydata(), series["batch_size"])
    np.testing.assert_array_equal(lr_ax.lines[0].get_ydata(), series["lr"])
    np.testing.assert_array_equal(batch_by_step.lines[0].get_xdata(), series["step"])
    measured = np.isfinite(series["b_simple"])
    np.testing.assert_array_equal(noise_ax.lines[0].get_ydata(), series["b_simple"][measured])


def test_fixed_batch_without_meter_has_no_schedule_figure():
    rows = [{"step": s, "examples": 8 * s, "batch_size": 8, "lr": 0.1, "noise/b_simple": None} for s in (1, 2)]
    assert not changes_batch_or_measures(rows)
    assert changes_batch_or_measures([{**rows[0], "noise/b_simple": 12.0}])
    assert changes_batch_or_measures([{**rows[0], "batch/planned": 8}])


def test_the_report_says_which_steps_the_meter_measured():
    from hasten.report.noise import meter_schedule

    rows = [{"step": s, "noise/every": 4 if s < 8 else 5, "noise/measured": s % 4 == 0,
             "noise/cost": 0.5 if s > 4 else None} for s in range(1, 13)]
    text = meter_schedule(rows)
    assert text.startswith("The meter measured 3 of 12 steps (one in N, N from 4 to 5)")
    assert "50% longer" in text and "about 8.3% of the steps' time" in text  # 2 measured steps × 0.5 / 12
    assert meter_schedule([{"step": 1}]) is None
