"""SAM, gradient clipping and EMA against closed forms."""
import math

import pytest
import torch
from torch import nn

from hasten.methods.weights import (
    EMA, SAM, GradientClipping, adaptive_clip_coefficients, clip_coefficient, ema_update, global_norm,
    sam_perturbation,
)

from .helpers import make_state


def test_sam_perturbation_is_rho_times_unit_gradient():
    e = sam_perturbation([torch.tensor([3.0]), torch.tensor([[4.0]])], rho=0.5)
    assert torch.allclose(e[0], torch.tensor([0.3])) and torch.allclose(e[1], torch.tensor([[0.4]]))
    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]
    assert global_norm(sam_perturbation(grads, 0.05)) == pytest.approx(0.05, rel=1e-5)


class Quadratic(nn.Module):
    """L(w) = ½ Σ a_i w_i²: gradient a ⊙ w, so the SAM gradient ∇L(w + ε̂) has a closed form."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, 1.0]))
        self.a = torch.tensor([1.0, 2.0])

    def loss(self):
        return 0.5 * (self.a * self.w**2).sum()


def test_sam_step_uses_the_gradient_at_the_perturbed_weights():
    model = Quadratic()
    state = make_state(model, (torch.zeros(1), torch.zeros(1)))

    def closure():
        loss = model.loss()
        loss.backward()
        return loss.item()

    state.closure = closure
    closure()  # g = a ⊙ w = (1, 2)
    SAM(rho=0.1).on_before_optimizer_step(state)
    eps = 0.1 * torch.tensor([1.0, 2.0]) / math.sqrt(5)
    assert torch.allclose(model.w.grad, model.a * (torch.tensor([1.0, 1.0]) + eps))
    assert torch.equal(model.w.data, torch.tensor([1.0, 1.0]))  # weights restored after the second pass


def test_clip_by_global_norm():
    assert clip_coefficient(torch.tensor(5.0), 1.0) == pytest.approx(0.2, rel=1e-5)
    assert clip_coefficient(torch.tensor(0.5), 1.0) == 1.0
    model = nn.Linear(1, 1)
    model.weight.grad, model.bias.grad = torch.tensor([[3.0]]), torch.tensor([4.0])
    GradientClipping(kind="norm", threshold=1.0).on_before_optimizer_step(make_state(model, (torch.zeros(1),)))
    assert torch.allclose(model.weight.grad, torch.tensor([[0.6]]), atol=1e-5)
    assert torch.allclose(model.bias.grad, torch.tensor([0.8]), atol=1e-5)


def test_adaptive_clipping_per_unit():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # row norms 5 and 1
    g = torch.tensor([[30.0, 40.0], [0.01, 0.0]])  # row norms 50 (ratio 10) and 0.01 (ratio 0.01)
    (c,) = adaptive_clip_coefficients([g], [w], clip=0.1)
    clipped = g * c
    assert torch.allclose(clipped[0], torch.tensor([0.3, 0.4]))  # scaled to 0.1·‖W_0‖ = 0.5
    assert torch.equal(clipped[1], g[1])  # under the threshold: unchanged


def test_value_clipping():
    model = nn.Linear(2, 1, bias=False)
    model.weight.grad = torch.tensor([[-3.0, 0.5]])
    GradientClipping(kind="value", threshold=1.0).on_before_optimizer_step(make_state(model, (torch.zeros(1),)))
    assert torch.equal(model.weight.grad, torch.tensor([[-1.0, 0.5]]))


def test_ema_closed_form():
    # With a constant target v, after n updates a_n = v + d^n (a_0 − v).
    a, v, d = [torch.tensor([2.0, -1.0])], [torch.tensor([0.5, 3.0])], 0.9
    for _ in range(7):
        ema_update(a, v, d)
    assert torch.allclose(a[0], v[0] + d**7 * (torch.tensor([2.0, -1.0]) - v[0]))


def test_ema_method_tracks_swaps_and_round_trips():
    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.fill_(1.0), model.bias.fill_(0.0)
    state = make_state(model, (torch.zeros(1, 2),))
    ema = EMA(half_life=1.0)  # decay 0.5
    ema.on_fit_start(state)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.on_batch_end(state)  # 0.5·1 + 0.5·3 = 2
    ema.on_batch_end(state)  # 0.5·2 + 0.5·3 = 2.5
    assert torch.allclose(ema.average[0], torch.full((1, 2), 2.5))
    ema.on_before_evaluate(state)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.5))  # evaluation sees the average
    ema.on_evaluate(state)
    assert torch.allclose(model.weight, torch.full((1, 2), 3.0)) and torch.allclose(ema.average[0], torch.full((1, 2), 2.5))
    restored = EMA(half_life=1.0)
    restored.on_fit_start(state)
    restored.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.average, ema.average))
    restored.on_fit_end(state)
    assert torch.allclose(model.weight, torch.full((1, 2), 2.5))
