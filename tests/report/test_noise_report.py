"""The noise-scale report (hasten/report/noise.py): what it says is computed from the run's rows and summary."""
import html
import math

import numpy as np
import pytest

from hasten.measure.noise_scale import B_SIMPLE_PREDICTS, NOT_MEASURABLE
from hasten.report.noise import b_simple_figure, b_simple_trend, noise_report, spearman


def planted_rows(b_simple, steps=200, seed=0, loss=None):
    """metrics.jsonl rows of a run whose loss falls from 2 to 0.2 (unless given) and whose B_simple is b_simple(step),
    with a 95% interval of ±20% around it."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, steps + 1):
        train_loss = loss(s) if loss else 2.0 - 1.8 * s / steps + 0.05 * rng.standard_normal()
        b = float(b_simple(s))
        rows.append({"step": s, "examples": 32 * s, "batch_size": 32, "lr": 0.1, "train/loss": train_loss,
                     "noise/b_simple": b, "noise/b_simple_se": 0.1 * b, "noise/b_simple_lo": 0.8 * b,
                     "noise/b_simple_hi": 1.2 * b, "noise/grad_sq": 1.0, "noise/trace_cov": b})
    return rows


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [5, 5, 5, 5]) == 0.0  # a constant has no order (not ranks 0..n−1 by position)


def test_growing_b_simple_is_reported_as_growing():
    sentence = b_simple_trend(planted_rows(lambda s: 50 + 2 * s))
    assert sentence.startswith("B_simple grew as the loss fell"), sentence
    assert "McCandlish et al. 2018 found" in sentence


@pytest.mark.parametrize("b_simple, expect", [
    (lambda s: 500 - 2 * s, "B_simple fell as the loss fell"),   # planted: B_simple shrinks while the loss falls
    (lambda s: 300.0, "no clear trend"),                         # planted: flat
    (lambda s: 300 + 30 * math.sin(s), "no clear trend"),        # planted: noise, no trend
])
def test_b_simple_that_does_not_grow_is_not_said_to_grow(b_simple, expect):
    rows = planted_rows(b_simple)
    sentence = b_simple_trend(rows)
    assert "grew" not in sentence and expect in sentence, sentence
    page = noise_report("t", rows, {"b_simple": 300.0, "b_simple_lo": 240.0, "b_simple_hi": 360.0,
                                    "measurable": True}).render()
    assert "grew" not in page and "grows as the loss falls" not in page.replace("who found that it grows", "")


def test_flat_loss_or_too_few_steps_say_so():
    flat = b_simple_trend(planted_rows(lambda s: 50 + 2 * s, loss=lambda s: 1.0 + 0.01 * math.sin(s)))
    assert "did not move clearly" in flat and "grew" not in flat
    few = planted_rows(lambda s: 50 + 2 * s, steps=12)
    assert b_simple_trend(few).startswith("Too few steps")
    # Steps where B_simple was not measurable (upper bound None in metrics.jsonl) do not count.
    unmeasured = [{**r, "noise/b_simple_hi": None} if r["step"] > 100 else r for r in planted_rows(lambda s: 50 + 2 * s)]
    assert b_simple_trend(unmeasured).startswith("Too few steps")


def test_band_is_drawn_from_the_logged_bounds():
    rows = planted_rows(lambda s: 50 + 2 * s, steps=40)
    for r in rows[:10]:  # not measurable yet: no upper bound, no point, no band
        r["noise/b_simple_hi"] = None
    fig = b_simple_figure(rows)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), np.arange(11, 41))
    (band,) = ax.collections
    ys = np.concatenate([p.vertices[:, 1] for p in band.get_paths()])
    b = 50 + 2 * np.arange(11, 41)
    assert ys.min() == pytest.approx(0.8 * b.min()) and ys.max() == pytest.approx(1.2 * b.max())
    assert b_simple_figure([{**r, "noise/b_simple_hi": None} for r in rows]) is None


def test_measurable_run_shows_interval_and_the_statement():
    rows = planted_rows(lambda s: 50 + 2 * s)
    page = noise_report("t", rows, {"b_simple": 450.0, "b_simple_lo": 380.0, "b_simple_hi": 560.0,
                                    "measurable": True}).render()
    assert "B_simple = 450 (95% interval 380 to 560)" in page
    assert html.escape(B_SIMPLE_PREDICTS) in page and "±" not in page
    assert html.escape(b_simple_trend(rows)) in page


def test_not_measurable_run_says_so_and_predicts_nothing():
    rows = planted_rows(lambda s: 50 + 2 * s, steps=30)
    for r in rows:
        r["noise/b_simple_hi"] = None
    page = noise_report("t", rows, {"b_simple": 80.0, "b_simple_lo": 0.0, "b_simple_hi": math.inf,
                                    "measurable": False}).render()
    assert html.escape(NOT_MEASURABLE) in page and "not measurable yet" in page
    assert "Predicted critical batch size" not in page and html.escape(B_SIMPLE_PREDICTS) not in page
    assert "B_simple = 80" not in page
    # A positive lower bound (the gradient mostly noise, as near convergence) is said as such, not "train longer".
    page = noise_report("t", rows, {"b_simple": 80.0, "b_simple_lo": 3.0, "b_simple_hi": math.inf,
                                    "measurable": False}).render()
    assert "at least 3 (95% lower bound" in page and "not measurable yet" not in page
    assert "Predicted critical batch size" not in page and "B_simple = 80" not in page
