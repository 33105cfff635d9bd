"""Methods that change the targets: label smoothing, MixUp, CutMix.

Mixed targets are class-probability vectors (B, K); the loss becomes :func:`soft_cross_entropy`, which takes
either integer classes or probabilities, so these methods compose in any combination (timm's recipe).

>>> smooth_labels(torch.tensor([2]), n_classes=4, alpha=0.1)
tensor([[0.0250, 0.0250, 0.9250, 0.0250]])
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hasten.methods.registry import Method, has_module, is_cross_entropy, last_linear, register, step_generator


def to_probs(targets: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Integer classes → one-hot float rows; probability rows pass through."""
    if targets.is_floating_point():
        return targets
    return F.one_hot(targets, n_classes).to(torch.float32)


def smooth_labels(targets: torch.Tensor, n_classes: int, alpha: float) -> torch.Tensor:
    """(1 − α)·y + α/K (Szegedy et al. 2016, §7, with u(k) = 1/K); ``targets`` classes or probabilities."""
    return to_probs(targets, n_classes) * (1.0 - alpha) + alpha / n_classes


def soft_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples (or tokens) of −Σ_k q_k log softmax(z)_k; ``targets`` classes or probabilities."""
    logits = outputs.reshape(-1, outputs.shape[-1])
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets.reshape(-1))
    return -(targets.reshape(logits.shape) * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def smoothed_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    return soft_cross_entropy(outputs, smooth_labels(targets, outputs.shape[-1], alpha))


def use_soft_targets(state) -> None:
    """Make the loss accept probability targets, unless another method already replaced the task's loss."""
    if state.loss_fn is state.task.loss:
        state.loss_fn = soft_cross_entropy


def mixup(x: torch.Tensor, y: torch.Tensor, lam: float, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̃ = λx + (1−λ)x[perm], ỹ = λy + (1−λ)y[perm] (Zhang et al. 2018, eq. 1); ``y`` are probability rows."""
    return x * lam + x[perm] * (1.0 - lam), y * lam + y[perm] * (1.0 - lam)


def cutmix_box(lam: float, height: int, width: int, cy: int, cx: int) -> tuple[int, int, int, int]:
    """The pasted box (y0, y1, x0, x1): side lengths H·√(1−λ) and W·√(1−λ) centred at (cy, cx), clipped to the
    image (Yun et al. 2019, §3.1)."""
    cut = math.sqrt(1.0 - lam)
    h, w = int(height * cut), int(width * cut)
    y0, y1 = max(cy - h // 2, 0), min(cy + h - h // 2, height)
    x0, x1 = max(cx - w // 2, 0), min(cx + w - w // 2, width)
    return y0, y1, x0, x1


def cutmix(x: torch.Tensor, y: torch.Tensor, box: tuple[int, int, int, int], perm: torch.Tensor):
    """Paste ``box`` of x[perm] into x; mix the targets by the kept area λ = 1 − box area / image area.

    Returns (x̃, ỹ, λ). ``x`` is (B, C, H, W); ``y`` probability rows.
    """
    y0, y1, x0, x1 = box
    lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, y * lam + y[perm] * (1.0 - lam), lam


def _classifier_reason(task, model) -> str | None:
    if not is_cross_entropy(task):
        return "it needs a cross-entropy classification loss"
    if model is not None and last_linear(model) is None:
        return "it needs a model that ends in a Linear classifier (to know the number of classes)"
    return None


@register("label_smoothing", stage=60, domain="any",
          summary="train on targets (1−α)·one-hot + α/K instead of one-hot",
          citation="Szegedy et al. 2016, Rethinking the Inception Architecture, §7",
          effect="small accuracy gain on classifiers, same cost per step; often none on small tasks")
@dataclass
class LabelSmoothing(Method):
    alpha: float = 0.1  # mass spread uniformly over the K classes

    def applies_to(self, task, model):
        return _classifier_reason(task, model)

    def on_fit_start(self, state) -> None:
        state.loss_fn = functools.partial(smoothed_cross_entropy, alpha=self.alpha)


@register("mixup", stage=61, domain="vision", conflicts=("cutmix",),
          summary="train on convex combinations λx_i + (1−λ)x_j of example pairs and of their targets",
          citation="Zhang, Cisse, Dauphin, Lopez-Paz 2018, mixup: Beyond Empirical Risk Minimization",
          effect="regularizes long runs; usually slower to converge in short runs (no speedup)")
@dataclass
class MixUp(Method):
    """The noise meter measures the mixed batch, which is what the gradient is for: each mixed row is one loss term,
    so per-example and micro-batch estimates hold (rows that share an example through the pairing are correlated, a
    relative O(1/B) effect). λ is shared by the whole batch: its variation between steps is not 1/B noise, and is
    left out, as it should be for the batch-size tradeoff."""

    alpha: float = 0.2  # λ ~ Beta(α, α)

    def applies_to(self, task, model):
        return _classifier_reason(task, model) or (
            "it mixes continuous inputs; text token ids cannot be mixed" if getattr(task, "kind", "") == "text"
            else None)

    def on_fit_start(self, state) -> None:
        self._classes = last_linear(state.model).out_features
        use_soft_targets(state)

    def on_batch_ready(self, state) -> None:
        x, y = state.batch[:2]
        g = step_generator(state, "mixup")
        lam = _beta(self.alpha, g)
        perm = torch.randperm(len(x), generator=g).to(x.device)
        state.batch = mixup(x, to_probs(y, self._classes), lam, perm)


@register("cutmix", stage=62, domain="vision", conflicts=("mixup",),
          summary="paste a random box from another image; targets mixed by the box's area",
          citation="Yun et al. 2019, CutMix: Regularization Strategy to Train Strong Classifiers",
          effect="regularizes long runs; usually slower to converge in short runs (no speedup)")
@dataclass
class CutMix(Method):
    """The noise meter measures the pasted batch (what the gradient is for), as for :class:`MixUp`."""

    alpha: float = 1.0  # λ ~ Beta(α, α): the kept area before clipping

    def applies_to(self, task, model):
        reason = _classifier_reason(task, model)
        if reason is None and not has_module(model, torch.nn.Conv2d):
            reason = "it pastes boxes of (C, H, W) images and the model has no Conv2d (inputs are not images)"
        return reason

    def on_fit_start(self, state) -> None:
        self._classes = last_linear(state.model).out_features
        use_soft_targets(state)

    def on_batch_ready(self, state) -> None:
        x, y = state.batch[:2]
        g = step_generator(state, "cutmix")
        lam = _beta(self.alpha, g)
        h, w = x.shape[-2:]
        cy, cx = (int(torch.randint(n, (1,), generator=g)) for n in (h, w))
        perm = torch.randperm(len(x), generator=g).to(x.device)
        x_mix, y_mix, _ = cutmix(x, to_probs(y, self._classes), cutmix_box(lam, h, w, cy, cx), perm)
        state.batch = (x_mix, y_mix)


def _beta(alpha: float, generator: torch.Generator) -> float:
    """λ ~ Beta(α, α), drawn from ``generator`` (torch.distributions takes no generator)."""
    seed = int(torch.randint(2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))
