"""measure_noise_scale against the brute-force tr(Σ)/|G|² from all per-example gradients (acceptance)."""
import math

import pytest
import torch

from hasten.measure import measure_noise_scale, per_example_sq_norms
from .reference import closed_form_grads

loss_fn = torch.nn.functional.cross_entropy


def test_reference_is_in_range(problem):
    assert 30 < problem.b_simple < 1000


@pytest.mark.parametrize(
    "source, steps", [(dict(micro_batch_size=64), 400), (dict(per_example=True), 200)], ids=["micro", "per_example"]
)
def test_measure_matches_brute_force(problem, source, steps):
    est = measure_noise_scale(problem.model, loss_fn, problem.dataset, batch_size=256, steps=steps, seed=1, **source)
    assert est.n_steps == steps and est.n_skipped == 0
    assert est.b_simple_se < 0.015 * est.b_simple  # precise enough for the 5% check to mean something
    assert abs(est.b_simple - problem.b_simple) < 0.05 * problem.b_simple
    assert abs(est.b_simple - problem.b_simple) < 4 * est.b_simple_se  # the reported uncertainty is honest


def test_standard_error_matches_spread_over_seeds(problem):
    runs = [
        measure_noise_scale(problem.model, loss_fn, problem.dataset, batch_size=128, per_example=True, steps=50, seed=s)
        for s in range(12)
    ]
    values = torch.tensor([r.b_simple for r in runs], dtype=torch.float64)
    mean_se = sum(r.b_simple_se for r in runs) / len(runs)
    spread = float(values.std())
    assert 0.5 < spread / mean_se < 2.0
    assert abs(float(values.mean()) - problem.b_simple) < 4 * spread / math.sqrt(len(runs))


def test_per_example_sq_norms_match_closed_form(problem):
    x, y = problem.dataset.tensors[0][:300], problem.dataset.tensors[1][:300]
    sq_norms, mean_sq = per_example_sq_norms(problem.model, loss_fn, x, y, chunk_size=64)
    g = closed_form_grads(problem.model, x, y)
    torch.testing.assert_close(sq_norms.double(), g.square().sum(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean_sq.double(), g.mean(0).square().sum(), rtol=1e-5, atol=1e-8)
