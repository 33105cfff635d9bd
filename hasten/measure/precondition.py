"""Adam preconditioning for the noise scale: measure P⊙g with P = 1/(√v̂ + ε) instead of the raw gradient g.

McCandlish et al. 2018 (arXiv:1812.06162, §2.2 and App. A) measure the noise scale of the update direction an
adaptive optimizer actually takes; they found preconditioning gave mixed results, so it is an option, not the default.
"""
from __future__ import annotations

import torch

from hasten.errors import HastenError


def adam_preconditioner(exp_avg_sq: torch.Tensor, step, beta2: float, eps: float) -> torch.Tensor:
    """P = 1/(√v̂ + ε) with v̂ = v/(1 − β2^t): Adam's denominator (Kingma & Ba 2015, Algorithm 1)."""
    bias_correction = 1.0 - beta2**step
    return (exp_avg_sq / bias_correction).sqrt_().add_(eps).reciprocal_()


class AdamPreconditioner:
    """Reads P for each parameter from an Adam/AdamW optimizer's state, as left by its last step."""

    def __init__(self, optimizer: torch.optim.Optimizer, params):
        self.optimizer = optimizer
        self._group = {}
        for group in optimizer.param_groups:
            if "betas" not in group or "eps" not in group:
                raise HastenError(
                    f"precondition= needs an Adam-like optimizer (betas, eps, exp_avg_sq); "
                    f"got {type(optimizer).__name__}: pass torch.optim.Adam/AdamW or leave precondition unset"
                )
            for p in group["params"]:
                self._group[id(p)] = group
        missing = [i for i, p in enumerate(params) if id(p) not in self._group]
        if missing:
            raise HastenError(
                f"{len(missing)} trainable parameters are not in the optimizer passed as precondition=: "
                "pass the optimizer that updates this model"
            )

    def __call__(self, param: torch.Tensor) -> torch.Tensor | None:
        """P for ``param``, or None while the optimizer has not stepped yet (its state is empty)."""
        state = self.optimizer.state.get(param)
        if not state or "exp_avg_sq" not in state:
            return None
        group = self._group[id(param)]
        v = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
        step = state["step"]
        if isinstance(step, torch.Tensor):
            step = step.to(v.device, torch.float64)
        return adam_preconditioner(v, step, group["betas"][1], group["eps"])
