"""LR and momentum rules for a batch change, against closed forms and brute-force expectations."""
import doctest
import itertools
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import hasten.schedules.scaling as scaling
from hasten.errors import HastenError
from hasten.schedules import (adascale_gain, adascale_gain_from_noise, adascale_progress, constant_noise_batch,
                              constant_noise_lr, constant_noise_momentum, linear_lr, rescale, sgd_noise, sqrt_lr)

batches = st.integers(1, 4096)


def test_doctests():
    assert doctest.testmod(scaling).failed == 0


@given(batches, batches, st.floats(1e-4, 10))
def test_linear_and_sqrt_closed_form(b, b2, lr):
    assert linear_lr(lr, b, b2) == pytest.approx(lr * b2 / b)
    assert sqrt_lr(lr, b, b2) ** 2 == pytest.approx(lr * lr * b2 / b)
    assert linear_lr(linear_lr(lr, b, b2), b2, b) == pytest.approx(lr)


def test_adascale_gain_equals_brute_force_expectation():
    """r = E|g_B0|²/E|g_B|² with minibatches drawn with replacement from a finite population (exact enumeration)."""
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(4, 3)) + np.array([0.5, -0.2, 0.1])
    mean = grads.mean(0)
    trace_cov = ((grads - mean) ** 2).sum(1).mean()  # population covariance (sampling with replacement)

    def expected_sq_norm(batch):
        draws = itertools.product(range(len(grads)), repeat=batch)
        return np.mean([np.sum(grads[list(d)].mean(0) ** 2) for d in draws])

    for b0, b in ((1, 2), (1, 4), (2, 4), (2, 3)):
        brute = expected_sq_norm(b0) / expected_sq_norm(b)
        assert adascale_gain(trace_cov, float(mean @ mean), b0, b) == pytest.approx(brute, rel=1e-10)


@given(st.floats(1e-6, 1e6), st.floats(1e-6, 1e3), batches, batches)
def test_adascale_bounds_and_noise_form(trace_cov, grad_sq, b0, b):
    r = adascale_gain(trace_cov, grad_sq, b0, b)
    s = b / b0
    assert min(1.0, s) * (1 - 1e-12) <= r <= max(1.0, s) * (1 + 1e-12)
    assert adascale_gain_from_noise(trace_cov / grad_sq, b0, b) == pytest.approx(r, rel=1e-9)


def test_adascale_limits():
    assert adascale_gain(5.0, 0.0, 32, 128) == pytest.approx(4.0)  # all noise: linear scaling
    assert adascale_gain(0.0, 2.0, 32, 128) == pytest.approx(1.0)  # no noise: a bigger batch buys nothing
    assert adascale_gain_from_noise(math.nan, 32, 128) == pytest.approx(4.0)
    assert adascale_gain_from_noise(-3.0, 32, 128) == 1.0
    assert adascale_progress(adascale_progress(0.0, 1.5), 2.0) == 3.5


def test_smith_le_noise_closed_form():
    # g = ε(N/B − 1)/(1 − m): 0.1·(50000/100 − 1)/(1 − 0.9) = 499
    assert sgd_noise(0.1, 100, 50_000, 0.9) == pytest.approx(499.0)
    # ε' = ε(N/B − 1)/(N/B' − 1) = 0.1·499/249
    assert constant_noise_lr(0.1, 100, 200, 50_000, 0.9) == pytest.approx(0.1 * 499 / 249)
    # 1 − m' = (1 − 0.9)·249/499
    assert constant_noise_momentum(0.9, 0.1, 100, 200, 50_000) == pytest.approx(1 - 0.1 * 249 / 499)
    # LR ÷5 at B = 100 → B' = N/(1 + 0.2·499) = 50000/100.8 at the full LR (B ≪ N: ≈ 5·100 = 500)
    assert constant_noise_batch(0.02, 100, 0.1, 50_000, 0.9) == pytest.approx(50_000 / 100.8)
    # near N the two differ: N = 1000, LR ÷10 at B = 100 → B' = 1000/1.9 = 526, not 1000
    assert constant_noise_batch(0.01, 100, 0.1, 1000) == pytest.approx(1000 / 1.9)
    assert constant_noise_batch(0.0, 100, 0.1, 1000) == 1000.0  # no noise to keep: the full batch


@given(st.integers(100, 100_000), st.floats(0.01, 0.99), st.floats(1e-3, 1.0), st.data())
def test_constant_noise_rules_keep_g(n, m, lr, data):
    b = data.draw(st.integers(1, n // 2))
    b2 = data.draw(st.integers(1, n - 1))
    g = sgd_noise(lr, b, n, m)
    assert sgd_noise(constant_noise_lr(lr, b, b2, n, m), b2, n, m) == pytest.approx(g, rel=1e-9)
    lr2 = data.draw(st.floats(lr, 10.0))  # a larger LR: a larger batch keeps g
    b3 = constant_noise_batch(lr, b, lr2, n, m)
    assert b <= b3 * (1 + 1e-9) and b3 < n and sgd_noise(lr2, b3, n, m) == pytest.approx(g, rel=1e-9)
    try:
        m2 = constant_noise_momentum(m, lr, b, b2, n)
    except HastenError:
        assert b2 < b  # only a smaller batch can need a negative momentum
        return
    assert sgd_noise(lr, b2, n, m2) == pytest.approx(g, rel=1e-6)
    if b2 != b:
        assert (m2 > m) == (b2 > b)


def test_rescale_dispatch_and_errors():
    assert rescale("none", 64, 256) == (1.0, None)
    assert rescale("linear", 64, 256) == (4.0, None)
    assert rescale("sqrt", 64, 256) == (2.0, None)
    assert rescale("adascale", 64, 256, b_simple=64.0)[0] == pytest.approx(2 / 1.25)
    assert rescale("noise_lr", 64, 256, dataset_size=1000)[0] == pytest.approx((1000 / 64 - 1) / (1000 / 256 - 1))
    lr_mult, m = rescale("noise_momentum", 64, 128, dataset_size=1000, momentum=0.5)
    assert lr_mult == 1.0 and sgd_noise(1.0, 128, 1000, m) == pytest.approx(sgd_noise(1.0, 64, 1000, 0.5))
    for call, words in [
        (lambda: rescale("cubic", 1, 2), "unknown lr rule"),
        (lambda: rescale("noise_lr", 1, 2), "dataset size"),
        (lambda: rescale("noise_momentum", 1, 2, dataset_size=10), "momentum"),
        (lambda: linear_lr(0.1, 0, 4), "positive"),
        (lambda: constant_noise_lr(0.1, 10, 100, 100), "whole dataset"),
        (lambda: constant_noise_momentum(0.0, 0.1, 10, 5, 100), "no momentum"),
        (lambda: sgd_noise(0.1, 10, 100, 1.0), "momentum"),
        (lambda: constant_noise_batch(0.1, 10, 0.0, 100), "new_lr"),
    ]:
        with pytest.raises(HastenError, match=words) as e:
            call()
        assert "\n" not in str(e.value)
