"""The NoiseScale estimator (hasten/measure/noise_scale.py): a toy with a known answer, state_dict and merge."""
import json
import math

import torch

from hasten.measure import NoiseScale
from hasten.measure.noise_scale import unbiased_grad_sq, unbiased_trace_cov


def toy_pairs(n_steps: int, seed: int = 0):
    """Per-example gradients i.i.d. uniform on {1, 3}: G = 2, tr(Σ) = 1, B_simple = 0.25.

    Each step draws two examples: B_small = 1 (the mean of their squares) and B_big = 2 (the square of their mean).
    """
    gen = torch.Generator().manual_seed(seed)
    g = 1.0 + 2.0 * torch.randint(0, 2, (n_steps, 2), generator=gen, dtype=torch.float64)
    return g.square().mean(1).tolist(), g.mean(1).square().tolist()


def test_toy_converges_where_mean_of_ratios_does_not():
    sq_small, sq_big = toy_pairs(100_000)
    noise = NoiseScale()
    ratios = []
    for small, big in zip(sq_small, sq_big):
        assert noise.update(sq_small=small, b_small=1, sq_big=big, b_big=2)
        ratios.append(unbiased_trace_cov(small, 1, big, 2) / unbiased_grad_sq(small, 1, big, 2))
    est = noise.compute()
    assert abs(est.b_simple - 0.25) < 0.02 * 0.25
    assert abs(est.b_simple - 0.25) < 4 * est.b_simple_se
    assert abs(est.grad_sq - 4.0) < 0.02 * 4 and abs(est.trace_cov - 1.0) < 0.02
    # Per step: (1,1) → 0/1, (3,3) → 0/9, (1,3) or (3,1) → 2/3, so E[ratio] = 1/3, a third too high.
    mean_ratio = sum(ratios) / len(ratios)
    assert abs(mean_ratio - 1 / 3) < 0.01
    assert abs(mean_ratio - 0.25) > 0.25 * 0.25


def test_non_finite_pairs_are_skipped():
    noise = NoiseScale()
    noise.update(sq_small=5.0, b_small=1, sq_big=4.25, b_big=4)
    assert not noise.update(sq_small=float("nan"), b_small=1, sq_big=1.0, b_big=4)
    assert not noise.update(sq_small=1.0, b_small=1, sq_big=float("inf"), b_big=4)
    est = noise.compute()
    assert (est.n_steps, est.n_skipped, est.b_simple) == (1, 2, 0.25)


def _random_pairs(seed, n=50):
    gen = torch.Generator().manual_seed(seed)
    big = torch.rand(n, generator=gen, dtype=torch.float64) + 1.0
    small = big + torch.rand(n, generator=gen, dtype=torch.float64) * 2.0
    return list(zip(small.tolist(), big.tolist()))


def _feed(noise, pairs, b_small=8, b_big=64):
    for small, big in pairs:
        noise.update(sq_small=small, b_small=b_small, sq_big=big, b_big=b_big)
    return noise


def test_state_dict_round_trip_through_json():
    for kwargs in (dict(), dict(horizon=500.0, dataset_size=10_000)):
        noise = _feed(NoiseScale(**kwargs), _random_pairs(0))
        restored = NoiseScale()
        restored.load_state_dict(json.loads(json.dumps(noise.state_dict())))
        assert restored.compute() == noise.compute()
        more = _random_pairs(1, 10)
        assert _feed(restored, more).compute() == _feed(noise, more).compute()


def test_merge_equals_one_estimator_fed_both_streams():
    a_pairs, b_pairs = _random_pairs(2), _random_pairs(3, 30)
    merged = _feed(NoiseScale(), a_pairs).merge(_feed(NoiseScale(), b_pairs))
    single = _feed(NoiseScale(), a_pairs + b_pairs)
    for field, value in single.compute().as_dict().items():
        assert math.isclose(getattr(merged.compute(), field), value, rel_tol=1e-12), field
