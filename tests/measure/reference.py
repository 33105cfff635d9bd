"""A softmax-regression problem whose per-example gradients are known in closed form (brute-force reference)."""
from dataclasses import dataclass

import torch
from torch.utils.data import TensorDataset

from hasten.measure import NoiseScale

D, D_IN, N_CLASSES = 12_000, 40, 5


@dataclass
class Problem:
    model: torch.nn.Linear
    dataset: TensorDataset
    b_simple: float  # tr(Σ)/|G|² over the whole dataset, Σ with Bessel's correction (eq. A.1 without replacement)


def closed_form_grads(model: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy gradients of y = Wx + b: ∂ℓ/∂W = (softmax − onehot)·xᵀ, ∂ℓ/∂b = softmax − onehot."""
    W, b = model.weight.detach().double(), model.bias.detach().double()
    r = torch.softmax(x.double() @ W.T + b, 1) - torch.nn.functional.one_hot(y, W.shape[0]).double()
    return torch.cat([(r[:, :, None] * x.double()[:, None, :]).flatten(1), r], 1)


def brute_force_b_simple(model, x, y) -> float:
    g = closed_form_grads(model, x, y)
    mean = g.mean(0)
    trace_cov = ((g - mean) ** 2).sum() / (len(g) - 1)
    return float(trace_cov / mean.square().sum())


def make_problem() -> Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(D, D_IN, generator=gen)
    logits = x @ torch.randn(D_IN, N_CLASSES, generator=gen) * 0.4
    y = torch.multinomial(torch.softmax(logits, 1), 1, generator=gen).squeeze(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, N_CLASSES)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for i in range(0, 1000, 100):  # a few steps away from the initialization
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 100]), y[i : i + 100]).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return Problem(model, TensorDataset(x, y), brute_force_b_simple(model, x, y))


class RecordingNoiseScale(NoiseScale):
    """A NoiseScale that also records every pair it is given (to compare a source with a hand computation)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def update(self, sq_small, b_small, sq_big, b_big):
        self.calls.append((float(sq_small), float(b_small), float(sq_big), float(b_big)))
        return super().update(sq_small, b_small, sq_big, b_big)
