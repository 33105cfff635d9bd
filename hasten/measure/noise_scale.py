"""The gradient noise scale B_simple = tr(Σ)/|G|² as a streaming estimator.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162.

Each step gives two squared gradient norms measured at the *same parameters*: |G_small|² from batches of
B_small examples and |G_big|² from B_big examples. Eq. A.2 turns them into unbiased per-step estimates

    |G|²  ≈ (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)
    tr(Σ) ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)

which are often negative on their own: that is expected and they are kept. The two series are smoothed
*separately* (running mean, or an EMA whose horizon is counted in examples so it means the same when B changes)
and divided only at :meth:`NoiseScale.compute`; a mean of per-step ratios is biased and can even have the wrong sign.

Units: tr(Σ) and |G|² are those of the gradient of the mean loss over the examples (per example; per token for
language models only if the loss is a per-token mean and the batch size is counted in tokens).

State is additive (weighted sums), so two estimators merge by adding their state (`merge`), e.g. across processes.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

_SUMS = ("weight", "weight_sq", "g", "s", "gg", "ss", "gs")


def unbiased_grad_sq(sq_small: float, b_small: float, sq_big: float, b_big: float) -> float:
    """|G|² from the two batch sizes (McCandlish et al. 2018, eq. A.2)."""
    return (b_big * sq_big - b_small * sq_small) / (b_big - b_small)


def unbiased_trace_cov(sq_small: float, b_small: float, sq_big: float, b_big: float) -> float:
    """tr(Σ) from the two batch sizes (McCandlish et al. 2018, eq. A.2)."""
    return (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """B_simple = tr(Σ)/|G|² (eq. 2.9) with the smoothed parts and a delta-method standard error.

    ``b_simple_se`` is the standard error of the ratio of means over ``n_eff`` effective steps (nan until two steps);
    ``interval`` is the ±1.96·se normal interval. ``b_simple`` is nan while the smoothed |G|² is not positive.
    """

    b_simple: float
    b_simple_se: float
    grad_sq: float
    trace_cov: float
    n_steps: int
    n_skipped: int
    n_eff: float
    examples: float

    @property
    def interval(self) -> tuple[float, float]:
        return (self.b_simple - 1.96 * self.b_simple_se, self.b_simple + 1.96 * self.b_simple_se)

    def as_dict(self) -> dict:
        return asdict(self)


class NoiseScale:
    """Streaming estimator of the gradient noise scale: ``update()`` / ``compute()`` / ``reset()``.

    Args:
        horizon: EMA horizon in *examples* (the weight of a step decays as exp(−examples since/horizon));
            ``None`` keeps a plain running mean over all steps.
        dataset_size: D, when batches are drawn without replacement from D examples. Then E|G_B|² =
            |G|² + (1/B − 1/D)·tr(Σ) (eq. A.1 with the finite-population term), and |G|² gets +tr(Σ)/D back.

    >>> ns = NoiseScale()
    >>> ns.update(sq_small=5.0, b_small=1, sq_big=4.25, b_big=4)   # per-example norm² vs batch-of-4 norm²
    True
    >>> ns.compute().b_simple
    0.25
    """

    def __init__(self, horizon: float | None = None, dataset_size: int | None = None):
        if horizon is not None and not horizon > 0:
            raise ValueError(f"horizon must be a positive number of examples, got {horizon}")
        self.horizon = horizon
        self.dataset_size = dataset_size
        self.reset()

    def reset(self) -> None:
        for name in _SUMS:
            setattr(self, name, 0.0)
        self.n_steps = 0
        self.n_skipped = 0
        self.examples = 0.0

    def update(self, sq_small: float, b_small: float, sq_big: float, b_big: float) -> bool:
        """Add one step's pair of squared norms. Returns False (and counts a skip) if any value is non-finite."""
        sq_small, sq_big = float(sq_small), float(sq_big)
        if not (b_big > b_small > 0):
            raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
        if not (math.isfinite(sq_small) and math.isfinite(sq_big)):
            self.n_skipped += 1
            return False
        g = unbiased_grad_sq(sq_small, b_small, sq_big, b_big)
        s = unbiased_trace_cov(sq_small, b_small, sq_big, b_big)
        if self.dataset_size:
            g += s / self.dataset_size  # finite-population correction (sampling without replacement)
        decay = math.exp(-b_big / self.horizon) if self.horizon else 1.0
        self.weight, self.weight_sq = decay * self.weight + 1.0, decay**2 * self.weight_sq + 1.0
        self.g, self.s = decay * self.g + g, decay * self.s + s
        self.gg, self.ss, self.gs = decay * self.gg + g * g, decay * self.ss + s * s, decay * self.gs + g * s
        self.n_steps += 1
        self.examples += b_big
        return True

    def compute(self) -> NoiseScaleEstimate:
        nan = float("nan")
        if self.weight == 0:
            return NoiseScaleEstimate(nan, nan, nan, nan, self.n_steps, self.n_skipped, 0.0, self.examples)
        # Weighted means are the bias-corrected EMA (divide by the total weight, not by 1/(1-decay)).
        g, s = self.g / self.weight, self.s / self.weight
        n_eff = self.weight**2 / self.weight_sq
        b = s / g if g > 0 else nan
        se = nan
        if n_eff > 1.0 and g > 0:
            # Delta method for the ratio of two means: var(s/g) ≈ (var_s − 2b·cov + b²·var_g) / (n_eff·g²).
            var_g = max(self.gg / self.weight - g * g, 0.0)
            var_s = max(self.ss / self.weight - s * s, 0.0)
            cov = self.gs / self.weight - g * s
            correction = n_eff / (n_eff - 1.0)  # Bessel's correction with effective sample size
            var_b = max(var_s - 2 * b * cov + b * b * var_g, 0.0) * correction / (n_eff * g * g)
            se = math.sqrt(var_b)
        return NoiseScaleEstimate(b, se, g, s, self.n_steps, self.n_skipped, n_eff, self.examples)

    def merge(self, other: "NoiseScale") -> "NoiseScale":
        """Add another estimator's state (e.g. from another process measuring the same parameters)."""
        for name in _SUMS + ("n_steps", "n_skipped", "examples"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def state_dict(self) -> dict:
        state = {name: getattr(self, name) for name in _SUMS + ("n_steps", "n_skipped", "examples")}
        state.update(horizon=self.horizon, dataset_size=self.dataset_size)
        return state

    def load_state_dict(self, state: dict) -> None:
        missing = [k for k in _SUMS if k not in state]
        if missing:
            raise ValueError(f"noise-scale state lacks {', '.join(missing)}: not a NoiseScale.state_dict()")
        for name, value in state.items():
            setattr(self, name, value)

    def __repr__(self) -> str:
        e = self.compute()
        return f"NoiseScale(b_simple={e.b_simple:.4g} ± {e.b_simple_se:.2g}, steps={e.n_steps}, skipped={e.n_skipped})"


def meter_state(noise: NoiseScale, steps: int) -> dict:
    """A meter's checkpoint: its estimator's state plus the steps it has seen (the phase of its ``every``)."""
    return {**noise.state_dict(), "steps": steps}


def load_meter_state(noise: NoiseScale, state: dict) -> int:
    """Load :func:`meter_state`'s dict (or a bare ``NoiseScale.state_dict()``) into ``noise``; the steps seen."""
    state = dict(state)
    steps = state.pop("steps", 0)
    noise.load_state_dict(state)
    return steps


def as_float(x: torch.Tensor | float) -> float:
    return float(x.detach().double().item()) if isinstance(x, torch.Tensor) else float(x)
