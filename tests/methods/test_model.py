"""Layer freezing, stochastic depth and Swish against hand-computed schedules, values and gradients."""
import math

import pytest
import torch
from torch import nn

from hasten.methods.model import (
    LayerFreezing, StochasticDepth, Swish, SwishSwap, frozen_count, layers, stochastic_depth, survival_probabilities,
    swish,
)
from hasten.tasks.models import CharTransformer, mlp

from .helpers import make_state


def test_frozen_count_schedule():
    # 8 layers, freezing from 50% of the run to all of them at the end.
    assert [frozen_count(p, 8, 0.5, 1.0) for p in (0.0, 0.5, 0.625, 0.75, 1.0)] == [0, 0, 2, 4, 8]
    assert frozen_count(1.0, 8, 0.5, 0.5) == 4


def test_layer_freezing_method_freezes_the_first_layers():
    model = mlp((4, 8, 8, 8, 2))  # 4 Linear layers
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    state = make_state(model, (torch.zeros(1, 4),), steps=100, step=100)
    LayerFreezing(start=0.5, level=0.5).on_batch_start(state)  # 2 of 4 frozen at the end
    flags = [layer.weight.requires_grad for layer in layers(model)]
    assert flags == [False, False, True, True]
    assert layers(model)[0].weight.grad is None and layers(model)[3].weight.grad is not None


def test_survival_probabilities_linear_decay():
    assert survival_probabilities(4, 0.5) == [0.875, 0.75, 0.625, 0.5]
    assert survival_probabilities(2, 1.0) == [1.0, 1.0]


def test_stochastic_depth_function_is_unbiased():
    x, f = torch.tensor([1.0]), lambda z: 3 * z
    kept = stochastic_depth(x, f, 0.25, keep=True, training=True)
    dropped = stochastic_depth(x, f, 0.25, keep=False, training=True)
    assert kept.item() == 1 + 3 / 0.25 and dropped.item() == 1.0
    assert 0.25 * kept + 0.75 * dropped == stochastic_depth(x, f, 0.25, keep=True, training=False)  # E = x + f(x)


class Stack(nn.Module):
    """x → block₂(block₁(x)) with cheap blocks (a hook inside each counts how often it really runs)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(3, 3)) for _ in range(2))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_stochastic_depth_skips_blocks_at_their_rates():
    torch.manual_seed(0)
    model, calls = Stack(), [0, 0]
    method = StochasticDepth(final=0.5)  # survival 0.75, 0.5
    method.prepare_model(model)
    for i, block in enumerate(model.blocks):
        block[0].register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randn(2, 3)
    n, state = 400, make_state(model, (x,))
    with torch.no_grad():
        for state.step in range(n):
            method.on_batch_start(state)
            model(x)
    # Binomial(400, p): standard deviations ≈ 8.7 and 10; allow 4 of them.
    assert abs(calls[0] - 0.75 * n) < 35 and abs(calls[1] - 0.5 * n) < 40


def test_stochastic_depth_keeps_names_and_evaluation_of_a_transformer():
    torch.manual_seed(0)
    model = CharTransformer(vocab=16, block_size=8, dim=16, heads=2, layers=2)
    reference = CharTransformer(vocab=16, block_size=8, dim=16, heads=2, layers=2)
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    method = StochasticDepth(final=0.5)
    assert method.applies_to(None, model) is None and method.applies_to(None, mlp((2, 2))) is not None
    method.prepare_model(model)
    assert list(model.state_dict()) == keys
    x = torch.randint(16, (2, 8))
    model.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-6)  # evaluation: every block, unscaled
    method.on_fit_end(make_state(model, (x,)))
    assert "forward" not in model.blocks[0].__dict__


def test_swish_values_and_beta_gradient():
    sig = lambda z: 1 / (1 + math.exp(-z))
    assert swish(torch.tensor(1.0)).item() == pytest.approx(sig(1.0))
    assert swish(torch.tensor(-1.0), 2.0).item() == pytest.approx(-sig(-2.0))
    act = Swish(beta=1.5, learnable=True)
    x = torch.tensor([0.7, -1.2, 2.0])
    act(x).sum().backward()
    s = torch.sigmoid(1.5 * x)
    assert act.beta.grad.item() == pytest.approx(float((x**2 * s * (1 - s)).sum()), rel=1e-5)  # d/dβ x·σ(βx)


def test_swish_swap_replaces_activation_modules():
    model = mlp((4, 8, 8, 2))
    method = SwishSwap(beta=1.0, learn_beta=True)
    assert method.applies_to(None, model) is None
    method.prepare_model(model)
    assert sum(isinstance(m, Swish) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert {"2.beta", "4.beta"} <= set(model.state_dict())
    fixed = mlp((4, 8, 2))
    SwishSwap(beta=2.0).prepare_model(fixed)
    x = torch.randn(3, 4)
    assert torch.allclose(fixed(x), fixed[3](swish(fixed[1](x), 2.0)))
    assert SwishSwap().applies_to(None, nn.Linear(2, 2)) is not None
