"""adaptive_batch_gain against closed forms and a brute-force schedule optimization (McCandlish et al. 2018, App. D)."""
import doctest

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hasten.study.gain as gain_module
from hasten.errors import HastenError
from hasten.study import adaptive_batch_gain

positive_trajectories = st.lists(st.floats(1e-3, 1e6, allow_nan=False), min_size=1, max_size=50)


def test_sqrt_progress_gives_24_over_25():
    s = (np.arange(10_000) + 0.5) / 10_000  # evenly spaced progress (midpoints)
    for c in (1.0, 37.0, 5e4):
        assert adaptive_batch_gain(c * np.sqrt(s)) == pytest.approx(24 / 25, rel=0.01)


def test_power_law_closed_form():
    """B_noise = s^p: E[s^(p/2)]²/E[s^p] = (1+p)/(1+p/2)²."""
    s = (np.arange(20_000) + 0.5) / 20_000
    for p in (0.25, 1.0, 2.0):
        assert adaptive_batch_gain(s**p) == pytest.approx((1 + p) / (1 + p / 2) ** 2, rel=1e-3)


def test_constant_is_one():
    assert adaptive_batch_gain([123.0] * 17) == pytest.approx(1.0)
    assert adaptive_batch_gain(np.full(4, 0.5)) == pytest.approx(1.0)


def test_two_values_by_hand():
    # E[√B] = (1 + 3)/2 = 2, E[B] = (1 + 9)/2 = 5: γ = 4/5.
    assert adaptive_batch_gain([1.0, 9.0]) == pytest.approx(0.8)
    assert adaptive_batch_gain([0.0, 4.0]) == pytest.approx(0.5)  # zeros are allowed


def test_matches_brute_force_schedule_optimization():
    """γ = min over B(s) of (Σ B_noise/B)(Σ B) relative to a fixed B (App. D; steps × examples overheads)."""
    minimize = pytest.importorskip("scipy.optimize").minimize
    rng = np.random.default_rng(0)
    b_noise = rng.lognormal(5.0, 1.0, size=12)

    def product(log_b):
        b = np.exp(log_b)
        return np.mean(b_noise / b) * np.mean(b)  # (S/S_min − 1)·(E − E_min)/S_min along the schedule

    best = minimize(product, np.zeros(b_noise.size), method="BFGS", options={"gtol": 1e-10}).fun
    fixed = product(np.zeros(b_noise.size))  # any constant B gives E[B_noise]
    assert fixed == pytest.approx(b_noise.mean())
    assert adaptive_batch_gain(b_noise) == pytest.approx(best / fixed, rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(positive_trajectories)
def test_gain_at_most_one(b_noise):
    g = adaptive_batch_gain(b_noise)
    assert 0.0 < g <= 1.0


@settings(max_examples=100, deadline=None)
@given(positive_trajectories, st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_scale_and_order_invariant(b_noise, c, rnd):
    shuffled = list(b_noise)
    rnd.shuffle(shuffled)
    g = adaptive_batch_gain(b_noise)
    assert adaptive_batch_gain(np.array(shuffled) * c) == pytest.approx(g, rel=1e-9)


@pytest.mark.parametrize(
    "b,msg",
    [([], "empty"), ([1.0, -2.0], "negative"), ([1.0, float("nan")], "NaN"), ([float("inf")], "NaN"),
     ([0.0, 0.0], "zeros"), (["x"], "numbers")],
)
def test_bad_input_raises(b, msg):
    with pytest.raises(HastenError, match=msg):
        adaptive_batch_gain(b)


def test_docstring_examples_run():
    assert doctest.testmod(gain_module).failed == 0
