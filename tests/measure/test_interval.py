"""The 95% interval on B_simple (Fieller) and `measurable`: coverage on a problem with a known answer.

Per-example gradients g_i ~ N(G, diag(sd²)) in 4 dimensions, so B_simple = tr(Σ)/|G|² = Σ sd² / |G|² exactly. Each
step draws a batch of B examples and feeds the meter the pair it sees in training: B_small = 1 (the mean of the
per-example squared norms) and B_big = B (the squared norm of the batch mean).
"""
import math

import numpy as np
import pytest

from hasten.measure import NoiseScale
from hasten.measure.noise_scale import NOT_MEASURABLE, fieller_interval, student_t975

SD = np.array([1.0, 1.0, 0.5, 0.5])


def measure(g_mean, reps=400, steps=30, batch=16, horizon=None, seed=0):
    """`reps` independent short runs of the meter; returns (their estimates, the true B_simple)."""
    rng = np.random.default_rng(seed)
    g = np.asarray(g_mean) + SD * rng.standard_normal((reps, steps, batch, len(SD)))
    sq_small, sq_big = (g**2).sum(-1).mean(-1), (g.mean(2) ** 2).sum(-1)
    estimates = []
    for small_run, big_run in zip(sq_small.tolist(), sq_big.tolist()):
        noise = NoiseScale(horizon=horizon)
        for small, big in zip(small_run, big_run):
            noise.update(sq_small=small, b_small=1, sq_big=big, b_big=batch)
        estimates.append(noise.compute())
    with np.errstate(divide="ignore"):
        return estimates, float((SD**2).sum() / (np.asarray(g_mean) ** 2).sum())


@pytest.mark.parametrize("g_mean, kwargs", [
    ([0.5, 0.3, 0.2, 0.1], dict(steps=30)),                          # B_simple = 6.4, always measurable
    ([0.5, 0.3, 0.2, 0.1], dict(steps=60, horizon=16 * 20.0)),       # EMA weights: n_eff ≈ 37 of 60 steps
    ([0.25, 0.15, 0.1, 0.05], dict(steps=30, seed=1)),               # B_simple = 26: a fifth not measurable
])
def test_95_percent_intervals_cover_the_truth_and_never_go_below_zero(g_mean, kwargs):
    estimates, truth = measure(g_mean, **kwargs)
    lo = np.array([e.b_simple_lo for e in estimates])
    hi = np.array([e.b_simple_hi for e in estimates])
    assert np.array_equal(np.stack([lo, hi], 1), np.array([e.interval for e in estimates]))
    coverage = np.mean((lo <= truth) & (truth <= hi))
    assert 0.92 <= coverage <= 0.98, coverage
    assert lo.min() >= 0.0  # the delta method's b ± 1.96·se went below zero in 20% of the weak-signal runs
    measurable = np.array([e.measurable for e in estimates])
    assert np.all(np.isfinite(hi) == measurable)  # bounded exactly when |G|² is significantly above zero
    assert np.all((lo <= [e.b_simple for e in estimates]) | ~measurable)
    assert np.all(hi[measurable] >= [e.b_simple for e in estimates if e.measurable])


def test_interval_is_narrow_and_close_to_the_delta_method_with_a_strong_signal():
    estimates, truth = measure([1.0, 0.5, 0.5, 0.2], reps=20, steps=400)
    for e in estimates:
        assert e.measurable
        delta = (e.b_simple - 1.96 * e.b_simple_se, e.b_simple + 1.96 * e.b_simple_se)
        assert e.interval == pytest.approx(delta, rel=0.02)
        assert e.b_simple_hi - e.b_simple_lo < 0.3 * truth


def test_zero_gradient_is_not_measurable_and_says_so():
    estimates, truth = measure([0.0, 0.0, 0.0, 0.0], reps=200, steps=40)
    assert truth == math.inf
    assert np.mean([e.measurable for e in estimates]) <= 0.05  # a 95% test: false alarms at most ~2.5%
    for e in estimates:
        if not e.measurable:
            assert e.b_simple_hi == math.inf and e.b_simple_lo >= 0.0
            # No prediction: "not measurable yet", or, where tr Σ is clearly positive, only a lower bound (true here:
            # the truth is inf); never a two-sided interval.
            assert (NOT_MEASURABLE if e.b_simple_lo == 0 else f"at least {e.b_simple_lo:.4g}") in str(e)
            assert "interval" not in str(e)
    assert any(e.b_simple_lo == 0 for e in estimates)  # both texts occur over the 200 runs
    assert any(not e.measurable and e.b_simple_lo > 0 for e in estimates)
    assert NOT_MEASURABLE == "not measurable yet: train longer (|G|² is not significantly above zero)"


def test_too_few_steps_is_not_measurable():
    noise = NoiseScale()
    assert not noise.compute().measurable  # no steps
    noise.update(sq_small=5.0, b_small=1, sq_big=4.25, b_big=4)
    one = noise.compute()
    assert one.b_simple == 0.25 and not one.measurable and one.interval == (0.0, math.inf)  # no variance yet
    assert NOT_MEASURABLE in str(one) and NOT_MEASURABLE in repr(noise)
    noise.update(sq_small=6.0, b_small=1, sq_big=2.0, b_big=4)  # |G|² per step: 4 then 2/3
    two = noise.compute()
    assert two.b_simple > 0 and not two.measurable  # t with 1 degree of freedom is 12.7, not 1.96


def test_measured_estimate_prints_its_interval():
    estimates, _ = measure([0.5, 0.3, 0.2, 0.1], reps=1, steps=30)
    e = estimates[0]
    assert e.measurable and f"{e.b_simple_lo:.4g} to {e.b_simple_hi:.4g}" in str(e) and NOT_MEASURABLE not in str(e)
    assert e.as_dict()["measurable"] is True and e.as_dict()["b_simple_hi"] == e.b_simple_hi


def test_fieller_cases():
    # Bounded, and skewed to the right of b = s/g (the ratio's distribution is).
    lo, hi, ok = fieller_interval(4.0, 1.0, 0.01, 0.01, 0.0, t=1.96)
    assert ok and lo < 0.25 < hi and hi - 0.25 > 0.25 - lo
    # s̄ − b·ḡ is exactly t standard errors from zero at both ends.
    for b in (lo, hi):
        assert (1.0 - b * 4.0) ** 2 == pytest.approx(1.96**2 * (0.01 + b * b * 0.01))
    # tr Σ not significant: the lower end is clamped at 0, not negative.
    assert fieller_interval(4.0, 0.01, 0.01, 0.01, 0.0)[0] == 0.0
    # ḡ not significant but s̄ clearly positive: an informative lower bound, no upper bound.
    lo, hi, ok = fieller_interval(0.1, 5.0, 0.01, 0.01, 0.0)
    assert not ok and hi == math.inf and lo > 0 and (5.0 - lo * 0.1) ** 2 == pytest.approx(
        1.959963984540054**2 * (0.01 + lo * lo * 0.01))
    # ḡ negative: not measurable whatever its standard error.
    assert fieller_interval(-4.0, 1.0, 1e-6, 1e-6, 0.0) == (0.0, math.inf, False)


def test_student_t_quantile_is_close_and_never_below_the_exact_one():
    from scipy.stats import t

    for df in (1, 1.5, 2, 3, 4, 5, 9.5, 20, 50, 200, 1e4):
        exact = t.ppf(0.975, df)
        assert student_t975(df) >= exact
        if df >= 4:
            assert student_t975(df) == pytest.approx(exact, rel=0.005)
