"""Methods on gradients and weights: SAM, gradient clipping, exponential moving average of the weights.

>>> g = [torch.tensor([3.0]), torch.tensor([4.0])]
>>> [e.item() for e in sam_perturbation(g, rho=0.5)]   # ρ·g/‖g‖ with ‖g‖ = 5
[0.30000001192092896, 0.4000000059604645]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from hasten.errors import HastenError
from hasten.methods.registry import Method, register


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """‖(t₁, …, t_n)‖₂ over all entries of all tensors, in float32 or better."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))


# ---- SAM (Foret, Kleiner, Mobahi, Neyshabur 2021, Sharpness-Aware Minimization) -------------------------------


def sam_perturbation(grads: Sequence[torch.Tensor], rho: float, eps: float = 1e-12) -> list[torch.Tensor]:
    """ε̂ = ρ·g/‖g‖₂ (Foret et al. 2021, eq. 2 with p = 2), ‖·‖ over all parameters together."""
    scale = rho / (global_norm(grads) + eps)
    return [g * scale.to(g.dtype) for g in grads]


@register("sam", stage=100, domain="any",
          summary="step with the gradient at the worst nearby weights w + ρ·g/‖g‖ (two backward passes)",
          citation="Foret, Kleiner, Mobahi, Neyshabur 2021, Sharpness-Aware Minimization (ICLR)",
          effect="flatter minima, better generalization at ~2× compute per step (interval>1 amortizes it)")
@dataclass
class SAM(Method):
    noise_bias = "steps with the gradient at w + ε̂ while the noise meter reads the one at w"
    rho: float = 0.05  # radius of the neighbourhood
    interval: int = 1  # take a SAM step every `interval` steps (Composer); others are plain steps

    def on_before_optimizer_step(self, state) -> None:
        if state.step % max(self.interval, 1):
            return
        if getattr(state, "closure", None) is None:
            raise HastenError("sam needs a loop that can recompute the loss (state.closure): use hasten's fit")
        params = [p for p in state.model.parameters() if p.grad is not None]
        perturbation = sam_perturbation([p.grad for p in params], self.rho)
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.add_(e)
        for p in params:
            p.grad = None
        state.closure()  # forward + backward at w + ε̂: .grad becomes ∇L(w + ε̂)
        with torch.no_grad():
            for p, e in zip(params, perturbation):
                p.sub_(e)


# ---- gradient clipping ----------------------------------------------------------------------------------------


def clip_coefficient(norm: torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """min(1, max_norm/‖g‖): the factor that brings a gradient of norm ``norm`` within ``max_norm``."""
    return torch.clamp(max_norm / (norm + eps), max=1.0)


def adaptive_clip_coefficients(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor], clip: float,
                               eps: float = 1e-3) -> list[torch.Tensor]:
    """Per-unit factors of adaptive gradient clipping (Brock et al. 2021, eq. 3): a unit (a row of a weight, the
    whole of a vector) with ‖G_i‖/max(‖W_i‖, ε) > λ is scaled by λ·max(‖W_i‖, ε)/‖G_i‖."""
    out = []
    for g, w in zip(grads, params):
        dims = tuple(range(1, g.dim())) if g.dim() > 1 else None
        g_norm = torch.linalg.vector_norm(g.float(), dim=dims, keepdim=True)
        w_norm = torch.linalg.vector_norm(w.float(), dim=dims, keepdim=True).clamp(min=eps)
        out.append(torch.where(g_norm > clip * w_norm, clip * w_norm / g_norm.clamp(min=1e-12), 1.0))
    return out


@register("gradient_clipping", stage=110, domain="any",
          summary="rescale the gradient when its global norm (or a unit's norm relative to its weights) is large",
          citation="Pascanu, Mikolov, Bengio 2013 (norm); Brock, De, Smith, Simonyan 2021, NFNets (adaptive)",
          effect="stability at high learning rates; no speedup by itself")
@dataclass
class GradientClipping(Method):
    kind: str = "norm"  # norm: global-norm clipping | adaptive: AGC | value: clamp each entry
    threshold: float = 1.0  # max norm (norm), λ (adaptive) or max |entry| (value)

    def applies_to(self, task, model):
        return None if self.kind in ("norm", "adaptive", "value") else f"kind={self.kind!r} is not norm, adaptive or value"

    def on_before_optimizer_step(self, state) -> None:
        params = [p for p in state.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        with torch.no_grad():
            if self.kind == "norm":
                coefficient = clip_coefficient(global_norm(grads), self.threshold)
                for g in grads:
                    g.mul_(coefficient.to(g.dtype))
            elif self.kind == "adaptive":
                for g, c in zip(grads, adaptive_clip_coefficients(grads, params, self.threshold)):
                    g.mul_(c.to(g.dtype))
            else:
                for g in grads:
                    g.clamp_(-self.threshold, self.threshold)


# ---- EMA of the weights (Polyak & Juditsky 1992; Izmailov et al. 2018) ---------------------------------------


def ema_update(average: Sequence[torch.Tensor], values: Sequence[torch.Tensor], decay: float) -> None:
    """In place: a ← decay·a + (1 − decay)·v, for each pair."""
    for a, v in zip(average, values):
        a.lerp_(v, 1.0 - decay)


def _averaged(model: nn.Module) -> list[torch.Tensor]:
    """What EMA averages: every parameter and every floating-point buffer (e.g. BatchNorm running statistics)."""
    return [p for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]


@register("ema", stage=120, domain="any",
          summary="keep an exponential moving average of the weights; evaluate and finish with the average",
          citation="Polyak & Juditsky 1992; Izmailov et al. 2018 (SWA); MosaicML Composer EMA",
          effect="better accuracy for the same steps, mostly with constant or high learning rates; one extra "
                 "copy of the weights")
@dataclass
class EMA(Method):
    half_life: float = 100.0  # steps for an old weight's share to halve: decay = 0.5^(1/half_life)

    @property
    def decay(self) -> float:
        return 0.5 ** (1.0 / max(self.half_life, 1e-12))

    def on_fit_start(self, state) -> None:
        self.average = [t.detach().clone() for t in _averaged(state.model)]

    def on_batch_end(self, state) -> None:
        with torch.no_grad():
            ema_update(self.average, [t.detach() for t in _averaged(state.model)], self.decay)

    def swap(self, model: nn.Module) -> None:
        """Exchange the model's weights and the average in place (swapping twice restores both)."""
        with torch.no_grad():
            for live, average in zip(_averaged(model), self.average):
                kept = live.clone()
                live.copy_(average)
                average.copy_(kept)

    def on_before_evaluate(self, state) -> None:
        self.swap(state.model)  # evaluate the average ...

    def on_evaluate(self, state) -> None:
        self.swap(state.model)  # ... then train on with the live weights

    def on_fit_end(self, state) -> None:
        with torch.no_grad():  # the run's final model is the average (Composer's default)
            for live, average in zip(_averaged(state.model), self.average):
                live.copy_(average)

    def state_dict(self) -> dict:
        return {"average": [t.clone() for t in self.average]}

    def load_state_dict(self, state: dict) -> None:
        self.average = [a.to(device=t.device, dtype=t.dtype) for a, t in zip(state["average"], self.average)]
