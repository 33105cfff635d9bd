"""Adversarial training: train on inputs perturbed to raise the loss, within an ℓ∞ or ℓ2 ball of radius ε.

ε is in the units of the task's inputs (hasten's image tasks are standardized, (x − mean)/std); the perturbed
inputs are not clipped to a pixel range.

>>> project(torch.tensor([[3.0, 4.0]]), eps=1.0, norm="l2")   # onto the ℓ2 ball: scaled to norm 1
tensor([[0.6000, 0.8000]])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hasten.methods.registry import Method, register, step_generator

NORMS = ("linf", "l2")


def _per_example_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖₂ for each example, shaped to broadcast against ``x``."""
    return torch.linalg.vector_norm(x.reshape(len(x), -1), dim=1).reshape(-1, *([1] * (x.dim() - 1)))


def project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """The closest point of the ε-ball to each example's ``delta``: clamp (ℓ∞) or rescale (ℓ2)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    return delta * torch.clamp(eps / _per_example_norm(delta).clamp(min=1e-12), max=1.0)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent unit step for the norm: sign(g) for ℓ∞, g/‖g‖₂ per example for ℓ2."""
    if norm == "linf":
        return grad.sign()
    return grad / _per_example_norm(grad).clamp(min=1e-12)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random point of the ε-ball per example: uniform in the cube (ℓ∞); uniform direction with radius
    ε·U^(1/d) (ℓ2, uniform in the ball)."""
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator) * 2 - 1).mul_(eps).to(x)
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=generator)
    radius = eps * torch.rand(len(x), generator=generator) ** (1.0 / d)
    return (direction / _per_example_norm(direction) * radius.reshape(-1, *([1] * (x.dim() - 1)))).to(x)


def pgd(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float,
        steps: int, norm: str = "linf", generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the loss (Madry et al. 2018, eq. 2): δ ← Π_ε(δ + α·direction(∇_δ L(x + δ))).

    Starts from a random point of the ball if ``generator`` is given, else from δ = 0. Only the input gets a
    gradient; the parameters' ``.grad`` are left alone. Returns x + δ with δ in the ε-ball.
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    delta = random_start(x, eps, norm, generator) if generator is not None else torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
        delta = project(delta.detach() + step_size * ascent_direction(grad, norm), eps, norm)
    return (x + delta).detach()


def fgsm(model: nn.Module, loss_fn: Callable, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x + ε·sign(∇_x L(x)) (Goodfellow, Shlens, Szegedy 2015, eq. 3): one ℓ∞ step from δ = 0."""
    return pgd(model, loss_fn, x, y, eps, step_size=eps, steps=1, norm="linf")


def _continuous_inputs(task) -> str | None:
    if getattr(task, "kind", "") == "text":
        return "it perturbs continuous inputs; token ids of a text task cannot be perturbed"
    return None


class _Adversarial(Method):
    def applies_to(self, task, model):
        if self.norm not in NORMS:
            return f"norm={self.norm!r} is not linf or l2"
        return _continuous_inputs(task)

    def on_batch_ready(self, state) -> None:
        x, y, *rest = state.batch
        g = step_generator(state, self.name) if self.random_start else None
        x_adv = pgd(state.model, state.loss_fn, x, y, self.eps, self.alpha * self.eps, self.steps, self.norm, g)
        state.batch = (x_adv, y, *rest)


@register("fgsm", stage=70, domain="any", conflicts=("pgd",),
          summary="train on x + one signed-gradient step (random start, step 1.25ε: 'fast' FGSM)",
          citation="Goodfellow, Shlens, Szegedy 2015; Wong, Rice, Kolter 2020, Fast is better than free",
          effect="robustness to small perturbations at ~2× compute per step; clean accuracy drops")
@dataclass
class FGSM(_Adversarial):
    eps: float = 0.1  # radius of the ball (input units)
    norm: str = "linf"  # linf | l2
    random_start: bool = True  # start from a random point of the ball (Wong et al. 2020)
    alpha: float = 1.25  # step size as a multiple of eps
    steps: int = 1


@register("pgd", stage=70, domain="any", conflicts=("fgsm",),
          summary="train on the worst input found by projected gradient ascent in an ℓ∞ or ℓ2 ball",
          citation="Madry, Makelov, Schmidt, Tsipras, Vladu 2018, Towards Deep Learning Models Resistant to "
                   "Adversarial Attacks (ICLR)",
          effect="robustness to perturbations at (steps+1)× compute per step; clean accuracy drops")
@dataclass
class PGD(_Adversarial):
    eps: float = 0.1  # radius of the ball (input units)
    norm: str = "linf"  # linf | l2
    steps: int = 3  # ascent steps
    alpha: float = 0.5  # step size as a multiple of eps (2.5·eps/steps in Madry et al.)
    random_start: bool = True  # start from a random point of the ball
