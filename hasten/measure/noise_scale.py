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
The same seven sums give the uncertainty: the weighted (co)variances of the per-step |G|² and tr(Σ) estimates, hence
the 95% interval on the ratio by Fieller's theorem (:func:`fieller_interval`), and whether |G|² is significantly above
zero at all (:attr:`NoiseScaleEstimate.measurable`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

_SUMS = ("weight", "weight_sq", "g", "s", "gg", "ss", "gs")
_Z975 = 1.959963984540054  # the standard normal's 97.5% quantile

NOT_MEASURABLE = "not measurable yet: train longer (|G|² is not significantly above zero)"


def lower_bound_only(lo: float) -> str:
    """What to say when |G|² is not significantly above zero but the interval's lower bound is: B_simple is large
    (the gradient is mostly noise, e.g. near convergence), known only from below."""
    return (f"at least {lo:.4g} (95% lower bound; no upper bound: |G|² is not significantly above zero, the gradient "
            "is mostly noise as near convergence; a shorter noise_horizon or more steps narrow it)")

# What B_simple predicts, in one place: the CLI, the run report, the study report, README.md and
# docs/architecture.md all quote this text (tests/report/test_b_simple_statement.py checks that they do).
B_SIMPLE_PREDICTS = (
    "B_simple predicts the critical batch size B_crit (past it, a larger batch saves few steps) only to within an "
    "order of magnitude. McCandlish et al. 2018 expect B_crit ≈ B_noise = tr(HΣ)/(GᵀHG) (eq. 2.8), which equals "
    "B_simple only when the Hessian H is a multiple of the identity (eq. 2.9); in their Table 1 the image "
    "classifiers had B_crit 2-8× below B_simple (MNIST 200 vs 900, ImageNet 15k vs 30k). hasten's own studies "
    "measured B_crit 2.6-3× above B_simple on the digits and fashion MLPs with SGD, momentum 0.9 (BENCHMARKS.md: "
    "`hasten study batch-size digits target=loss:0.1` and "
    "`hasten study batch-size fashion target=eval_loss:0.4 smith_le_epochs=0`). "
    "To know B_crit for your task, measure it: `hasten study batch-size TASK target=...`."
)


def unbiased_grad_sq(sq_small: float, b_small: float, sq_big: float, b_big: float) -> float:
    """|G|² from the two batch sizes (McCandlish et al. 2018, eq. A.2)."""
    return (b_big * sq_big - b_small * sq_small) / (b_big - b_small)


def unbiased_trace_cov(sq_small: float, b_small: float, sq_big: float, b_big: float) -> float:
    """tr(Σ) from the two batch sizes (McCandlish et al. 2018, eq. A.2)."""
    return (sq_small - sq_big) / (1.0 / b_small - 1.0 / b_big)


def student_t975(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (real df > 0), never below the exact one.

    t ≈ √(df·(exp(a²/df) − 1)) with a = z·(8df + 3)/(8df + 1): within 0.5% of the exact quantile for df ≥ 4 and
    above it (conservative) for every df, z = 1.96 as df → ∞ (checked against scipy in tests/measure/test_interval.py).
    No scipy at run time: hasten does not depend on it.

    >>> round(student_t975(10), 3), round(student_t975(1e9), 3)   # exact: 2.228, 1.960
    (2.229, 1.96)
    """
    a = _Z975 * (8 * df + 3) / (8 * df + 1)
    return math.sqrt(df * math.expm1(a * a / df))


def fieller_interval(grad_sq: float, trace_cov: float, var_g: float, var_s: float, cov_gs: float,
                     t: float = _Z975) -> tuple[float, float, bool]:
    """Confidence interval for B = tr(Σ)/|G|² from the two means and their (co)variances (Fieller 1954).

    ``grad_sq`` = ḡ and ``trace_cov`` = s̄ are the smoothed means; ``var_g``, ``var_s``, ``cov_gs`` the variances
    and covariance *of those means*; ``t`` the two-sided quantile. The interval holds every b for which s̄ − b·ḡ
    (mean zero at the true b) is within t standard errors of zero:

        (s̄ − b·ḡ)² ≤ t²·(var_s − 2b·cov_gs + b²·var_g)  ⇔  a·b² − 2c·b + d ≤ 0,
        a = ḡ² − t²·var_g,   c = s̄·ḡ − t²·cov_gs,   d = s̄² − t²·var_s.

    If ḡ > 0 and a > 0 (ḡ is more than t standard errors above zero) the set is the bounded interval
    (c ∓ √(c² − a·d))/a. Otherwise |G|² may be zero, so the ratio may be unbounded: the upper bound is inf and the
    third value (measurable) is False.

    The set is then intersected with [0, ∞): tr(Σ) ≥ 0 and |G|² ≥ 0, so B_simple ≥ 0, and removing impossible values
    cannot make the interval miss the truth more often. A lower bound below zero only says that tr(Σ) is not
    significantly above zero; 0 says the same without a negative batch size.

    Why Fieller: the per-step estimates are sums over many examples and the means are over many steps, so (ḡ, s̄)
    is close to jointly normal, and for a ratio of jointly normal means Fieller's set is exact (with known
    variances; Student's t covers estimating them). It is the one usual choice that goes unbounded exactly when the
    denominator is consistent with zero, and it is skewed to the right as the ratio is. The delta method (b ± t·se,
    still reported as ``b_simple_se``) is symmetric and went below zero (`hasten noise-scale digits` printed
    97.33, interval −6.898 to 201.6). The delta method on log B needs ḡ > 0 and s̄ > 0 and, like b ± t·se, stays
    bounded as ḡ nears zero, where the data cannot rule out any large B. A bootstrap needs the per-step series,
    which additive sums (merge across processes, a few floats in a checkpoint) do not keep. Fieller needs only the
    seven sums. Steps are treated as independent: each draws a fresh batch, and drift of the true values within
    the horizon only widens the interval.

    >>> lo, hi, ok = fieller_interval(4.0, 1.0, 0.01, 0.01, 0.0, t=1.96)
    >>> ok, round(lo, 3), round(hi, 3)
    (True, 0.2, 0.301)
    >>> fieller_interval(0.1, 1.0, 0.01, 0.01, 0.0, t=1.96)[1:]   # ḡ = 1 se above zero: unbounded
    (inf, False)
    """
    a = grad_sq * grad_sq - t * t * var_g
    c = trace_cov * grad_sq - t * t * cov_gs
    d = trace_cov * trace_cov - t * t * var_s
    root = math.sqrt(max(c * c - a * d, 0.0))
    if grad_sq > 0 and a > 0:
        return max((c - root) / a, 0.0), max((c + root) / a, 0.0), True
    if d > 0 and a < 0:  # b = 0 is outside, the set is (−∞, r1] ∪ [r2, ∞) with r1 < 0 < r2: keep [r2, ∞)
        return max((c - root) / a, 0.0), math.inf, False
    if d > 0 and a == 0 and c > 0:  # the quadratic is linear: −2c·b + d ≤ 0
        return d / (2 * c), math.inf, False
    return 0.0, math.inf, False


@dataclass(frozen=True)
class NoiseScaleEstimate:
    """B_simple = tr(Σ)/|G|² (eq. 2.9) with the smoothed parts and its uncertainty.

    ``b_simple`` is s̄/ḡ (nan while the smoothed |G|² is not positive). ``interval`` = (``b_simple_lo``,
    ``b_simple_hi``) is the 95% interval by Fieller's theorem (:func:`fieller_interval`, Student's t with
    n_eff − 1 degrees of freedom): never below 0, and (lower bound, inf) while |G|² is not significantly above zero.
    ``measurable`` is True when it is (ḡ more than t standard errors above zero, the same condition that makes the
    interval bounded); until then a prediction from ``b_simple`` is noise, and ``str()`` says so. ``b_simple_se``
    is the delta-method standard error of the ratio over ``n_eff`` effective steps (nan until two steps).
    """

    b_simple: float
    b_simple_se: float
    grad_sq: float
    trace_cov: float
    n_steps: int
    n_skipped: int
    n_eff: float
    examples: float
    b_simple_lo: float = 0.0
    b_simple_hi: float = math.inf
    measurable: bool = False

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% interval (Fieller), (lower, upper); upper is inf while not measurable."""
        return (self.b_simple_lo, self.b_simple_hi)

    def as_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        if not self.measurable:
            what = lower_bound_only(self.b_simple_lo) if self.b_simple_lo > 0 else NOT_MEASURABLE
            return f"B_simple {what}; {self.n_steps} steps, {self.n_skipped} skipped"
        return (f"B_simple = {self.b_simple:.4g} (95% interval {self.b_simple_lo:.4g} to {self.b_simple_hi:.4g}, "
                f"{self.n_steps} steps, {self.n_skipped} skipped)")


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
        if not n_eff > 1.0:  # one step: no variance, no interval
            return NoiseScaleEstimate(b, nan, g, s, self.n_steps, self.n_skipped, n_eff, self.examples)
        # (Co)variances of the two weighted means: the weighted per-step (co)variance with Bessel's correction for
        # n_eff effective steps, n_eff/(n_eff − 1), divided by n_eff.
        k = 1.0 / (n_eff - 1.0)
        var_g = max(self.gg / self.weight - g * g, 0.0) * k
        var_s = max(self.ss / self.weight - s * s, 0.0) * k
        cov = (self.gs / self.weight - g * s) * k
        se = nan
        if g > 0:  # delta method for the ratio of two means: var(s/g) ≈ (var_s − 2b·cov + b²·var_g) / g²
            se = math.sqrt(max(var_s - 2 * b * cov + b * b * var_g, 0.0)) / g
        lo, hi, measurable = fieller_interval(g, s, var_g, var_s, cov, student_t975(n_eff - 1.0))
        return NoiseScaleEstimate(b, se, g, s, self.n_steps, self.n_skipped, n_eff, self.examples, lo, hi, measurable)

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
        return f"NoiseScale({self.compute()})"


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
