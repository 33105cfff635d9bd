"""Methods that change which parts of the model compute: layer freezing, stochastic depth, Swish activations.

>>> survival_probabilities(4, final=0.5)   # linear decay rule, Huang et al. 2016 eq. (4)
[0.875, 0.75, 0.625, 0.5]
>>> frozen_count(0.75, n_layers=8, start=0.5, level=1.0)
4
"""
from __future__ import annotations

import math
import types
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from hasten.methods.registry import Method, progress, register, step_generator, swap_modules


# ---- layer freezing (Brock, Lim, Ritchie, Weston 2017, FreezeOut; Raghu et al. 2017, SVCCA) -------------------


def frozen_count(progress: float, n_layers: int, start: float = 0.5, level: float = 1.0) -> int:
    """How many of the first layers are frozen: none before ``start`` of the run, then linearly more up to
    ``level`` × ``n_layers`` at the end (MosaicML Composer's freeze schedule)."""
    ramp = min(max((progress - start) / max(1.0 - start, 1e-12), 0.0), 1.0)
    return int(math.floor(n_layers * level * ramp + 1e-9))


def layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in order: modules that hold parameters of their own."""
    return [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]


@register("layer_freezing", stage=95, domain="any",
          summary="progressively stop training the earliest layers (no weight gradients for them)",
          citation="Brock et al. 2017, FreezeOut; Raghu et al. 2017, SVCCA; MosaicML Composer",
          effect="cheaper backward passes late in training; accuracy often drops: measure")
@dataclass
class LayerFreezing(Method):
    start: float = 0.5  # fraction of the run before any layer freezes
    level: float = 0.5  # fraction of the layers frozen by the end

    def on_batch_start(self, state) -> None:
        stack = layers(state.model)
        k = frozen_count(progress(state), len(stack), self.start, self.level)
        for i, layer in enumerate(stack):
            for p in layer.parameters(recurse=False):
                p.requires_grad_(i >= k)
                if i < k:
                    p.grad = None  # the optimizer skips parameters without a gradient (no momentum drift)

    def on_fit_end(self, state) -> None:
        for p in state.model.parameters():
            p.requires_grad_(True)


# ---- stochastic depth (Huang, Sun, Liu, Sedra, Weinberger 2016, Deep Networks with Stochastic Depth) ----------


def survival_probabilities(n_blocks: int, final: float) -> list[float]:
    """p_l = 1 − (l/L)(1 − p_L) for blocks l = 1..L (Huang et al. 2016, eq. 4, "linear decay rule")."""
    return [1.0 - (l / n_blocks) * (1.0 - final) for l in range(1, n_blocks + 1)]


def stochastic_depth(x: torch.Tensor, residual: Callable[[torch.Tensor], torch.Tensor], survival: float,
                     keep: bool, training: bool) -> torch.Tensor:
    """A residual block x + f(x) that is skipped when dropped (f is not computed) and scaled by 1/p when kept, so
    evaluation uses x + f(x) unchanged (inverted form of Huang et al. 2016, eq. 2-3)."""
    if not training:
        return x + residual(x)
    if not keep:
        return x
    return x + residual(x) / survival


def residual_blocks(model: nn.Module | None) -> list[nn.Module]:
    """Blocks that map x to x + f(x): the entries of a ``blocks`` ModuleList (hasten's transformers)."""
    blocks = getattr(model, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


@register("stochastic_depth", stage=92, domain="any",
          summary="skip whole residual blocks at random during training (deeper blocks more often)",
          citation="Huang, Sun, Liu, Sedra, Weinberger 2016, Deep Networks with Stochastic Depth (ECCV)",
          effect="cheaper steps (skipped blocks cost nothing) and regularization in deep nets; shallow nets: "
                 "little")
@dataclass
class StochasticDepth(Method):
    final: float = 0.8  # survival probability of the last block (p_L)

    def applies_to(self, task, model):
        if model is not None and not residual_blocks(model):
            return "it skips residual blocks and the model has no `blocks` list of residual blocks"
        return None

    def prepare_model(self, model: nn.Module) -> None:
        # Each block's forward is wrapped on the instance: parameter names and the state_dict are unchanged.
        self._generator = torch.Generator().manual_seed(0)
        blocks = residual_blocks(model)
        for block, p in zip(blocks, survival_probabilities(len(blocks), self.final)):
            block.forward = types.MethodType(_dropping_forward(type(block).forward, p, self), block)

    def on_batch_start(self, state) -> None:
        self._generator = step_generator(state, "stochastic_depth")

    def on_fit_end(self, state) -> None:
        for block in residual_blocks(state.model):
            block.__dict__.pop("forward", None)


def _dropping_forward(forward: Callable, survival: float, method: StochasticDepth) -> Callable:
    def dropping(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        keep = bool(torch.rand((), generator=method._generator) < survival) if self.training else True
        return stochastic_depth(x, lambda z: forward(self, z) - z, survival, keep, self.training)

    return dropping


# ---- Swish (Ramachandran, Zoph, Le 2017, Searching for Activation Functions) ----------------------------------


def swish(x: torch.Tensor, beta: torch.Tensor | float = 1.0) -> torch.Tensor:
    """f(x) = x·sigmoid(βx) (Ramachandran et al. 2017, eq. 1); β = 1 is SiLU."""
    return x * torch.sigmoid(beta * x)


class Swish(nn.Module):
    """x·sigmoid(βx) with β a trainable scalar parameter or a fixed number."""

    def __init__(self, beta: float = 1.0, learnable: bool = False):
        super().__init__()
        self.learnable = learnable
        self.beta = nn.Parameter(torch.tensor(float(beta))) if learnable else float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swish(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={'learnable' if self.learnable else self.beta}"


SWAPPABLE = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU)


@register("swish", stage=91, domain="any",
          summary="replace ReLU/GELU activation modules by Swish x·sigmoid(βx), β fixed or learned",
          citation="Ramachandran, Zoph, Le 2017, Searching for Activation Functions",
          effect="small accuracy gains on deep nets at a little more compute per activation; often none")
@dataclass
class SwishSwap(Method):
    beta: float = 1.0  # initial (or fixed) β
    learn_beta: bool = False  # a trainable β per activation module

    def applies_to(self, task, model):
        if model is not None and not any(isinstance(m, SWAPPABLE) for m in model.modules()):
            return "the model has no activation modules (ReLU/GELU/...) to swap; functional calls cannot be swapped"
        return None

    def prepare_model(self, model: nn.Module) -> None:
        device = next(model.parameters()).device
        swap_modules(model, lambda m: isinstance(m, SWAPPABLE), lambda m: Swish(self.beta, self.learn_beta).to(device))
