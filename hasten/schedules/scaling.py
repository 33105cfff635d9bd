"""What to do with the learning rate (and momentum) when the batch size changes: small pure functions.

Every function takes the old setting and returns the new one; none keeps state. ``rescale`` picks one by name.

>>> linear_lr(0.1, 128, 512)
0.4
>>> sqrt_lr(0.1, 128, 512)
0.2
>>> adascale_gain_from_noise(b_simple=1000.0, base_batch=100, batch=100)
1.0
"""
from __future__ import annotations

import math

from hasten.errors import HastenError

RULES = ("none", "linear", "sqrt", "adascale", "noise_lr", "noise_momentum")


def _check_batches(batch: float, new_batch: float) -> None:
    if not (batch > 0 and new_batch > 0):
        raise HastenError(f"batch sizes must be positive, got {batch} and {new_batch}")


def linear_lr(lr: float, batch: float, new_batch: float) -> float:
    """ε·B'/B: the linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD", §2.1; use warmup)."""
    _check_batches(batch, new_batch)
    return lr * new_batch / batch


def sqrt_lr(lr: float, batch: float, new_batch: float) -> float:
    """ε·√(B'/B): the square-root rule (Krizhevsky 2014, "One weird trick"; Hoffer et al. 2017), which keeps the
    variance of the update constant; the usual choice for Adam-like optimizers (Malladi et al. 2022)."""
    _check_batches(batch, new_batch)
    return lr * math.sqrt(new_batch / batch)


def adascale_gain(trace_cov: float, grad_sq: float, base_batch: float, batch: float) -> float:
    """AdaScale's gain ratio r = (σ² + |G|²)/(σ²/s + |G|²) for scale s = B/B₀ (Johnson, Agrawal, Gu & Guestrin
    2020, "AdaScale SGD"). σ² = tr(Σ)/B₀ is the variance of a base-batch gradient; ``trace_cov`` is the per-example
    tr(Σ) that :class:`hasten.measure.noise_scale.NoiseScale` reports, hence the division by B₀ here.

    1 ≤ r ≤ s: r → s when noise dominates (|G|² → 0), r → 1 when the gradient does (tr Σ → 0). Use ε·r as the LR
    and count progress as τ += r per step (:func:`adascale_progress`). Negative (noisy) estimates are clamped to 0.
    """
    _check_batches(base_batch, batch)
    s = batch / base_batch
    sigma_sq, grad_sq = max(trace_cov, 0.0) / base_batch, max(grad_sq, 0.0)
    if sigma_sq + grad_sq == 0:
        return 1.0
    return (sigma_sq + grad_sq) / (sigma_sq / s + grad_sq)


def adascale_gain_from_noise(b_simple: float, base_batch: float, batch: float) -> float:
    """:func:`adascale_gain` written with B_simple = tr(Σ)/|G|²: r = (1 + B_simple/B₀)/(1 + B_simple/B).
    A NaN or infinite B_simple (|G|² ≤ 0: all noise) gives r = s; a negative one gives r = 1."""
    _check_batches(base_batch, batch)
    if math.isnan(b_simple) or math.isinf(b_simple):
        return batch / base_batch
    b = max(b_simple, 0.0)
    return (1.0 + b / base_batch) / (1.0 + b / batch)


def adascale_progress(progress: float, gain: float) -> float:
    """AdaScale's scale-invariant iteration count: τ ← τ + r after each step at gain r (Johnson et al. 2020, Alg. 1).
    Evaluate the LR schedule at τ (in base-batch steps) instead of the step count."""
    return progress + gain


def _check_noise_args(batch: float, dataset_size: float, momentum: float) -> None:
    if not 0 < batch <= dataset_size:
        raise HastenError(f"batch={batch} must be between 1 and the dataset size {dataset_size}")
    if not 0 <= momentum < 1:
        raise HastenError(f"momentum={momentum} must be in [0, 1)")


def sgd_noise(lr: float, batch: float, dataset_size: float, momentum: float = 0.0) -> float:
    """SGD's noise scale g = ε(N/B − 1)/(1 − m) (Smith & Le 2017, "A Bayesian Perspective on Generalization and
    SGD", §5; with momentum: Smith, Kindermans, Ying & Le 2017, "Don't Decay the Learning Rate, Increase the Batch
    Size", §2). Keeping g constant means B ∝ ε and B ∝ 1/(1 − m) while B ≪ N; exactly, :func:`constant_noise_lr`,
    :func:`constant_noise_batch` and :func:`constant_noise_momentum` each solve g for one of ε, B, m."""
    _check_noise_args(batch, dataset_size, momentum)
    return lr * (dataset_size / batch - 1.0) / (1.0 - momentum)


def constant_noise_lr(lr: float, batch: float, new_batch: float, dataset_size: float, momentum: float = 0.0) -> float:
    """The LR that keeps g = ε(N/B − 1)/(1 − m) unchanged when B → B' (Smith & Le 2017): ε' = ε(N/B − 1)/(N/B' − 1).
    Nearly linear while B' ≪ N; B' = N leaves no noise to keep."""
    g = sgd_noise(lr, batch, dataset_size, momentum)
    _check_noise_args(new_batch, dataset_size, momentum)
    if new_batch >= dataset_size:
        raise HastenError(f"batch={new_batch} is the whole dataset: full-batch SGD has no noise to keep constant")
    return g * (1.0 - momentum) / (dataset_size / new_batch - 1.0)


def constant_noise_batch(lr: float, batch: float, new_lr: float, dataset_size: float, momentum: float = 0.0) -> float:
    """The batch that keeps g = ε(N/B − 1)/(1 − m) unchanged when ε → ε' (Smith, Kindermans, Ying & Le 2017:
    increase the batch instead of decaying the LR): solving g = ε'(N/B' − 1)/(1 − m) gives
    B' = N/(1 + g(1 − m)/ε') = N/(1 + (ε/ε')(N/B − 1)). A real number (round it, then let :func:`constant_noise_lr`
    absorb the rounding); below N for any ε > 0, N itself for ε = 0 (no noise to keep)."""
    if not new_lr > 0:
        raise HastenError(f"new_lr={new_lr} must be positive: at LR 0 no batch gives SGD noise")
    if not lr >= 0:
        raise HastenError(f"lr={lr} must be ≥ 0")
    g = sgd_noise(lr, batch, dataset_size, momentum)
    return dataset_size / (1.0 + g * (1.0 - momentum) / new_lr)


def constant_noise_momentum(momentum: float, lr: float, batch: float, new_batch: float, dataset_size: float) -> float:
    """The momentum that keeps g unchanged at a fixed LR when B → B' (Smith et al. 2017, B ∝ 1/(1 − m)):
    1 − m' = (1 − m)(N/B' − 1)/(N/B − 1). Raises when no momentum in [0, 1) does it."""
    _check_noise_args(batch, dataset_size, momentum)
    _check_noise_args(new_batch, dataset_size, 0.0)
    if batch >= dataset_size:
        raise HastenError(f"batch={batch} is the whole dataset: full-batch SGD has no noise to keep constant")
    m = 1.0 - (1.0 - momentum) * (dataset_size / new_batch - 1.0) / (dataset_size / batch - 1.0)
    if not 0 <= m < 1:
        raise HastenError(f"no momentum in [0, 1) keeps the SGD noise constant from batch {batch} (momentum "
                          f"{momentum}) to batch {new_batch}: use a rule that changes the LR instead")
    return m


def rescale(rule: str, base_batch: float, batch: float, *, b_simple: float = math.nan,
            dataset_size: float | None = None, momentum: float | None = None) -> tuple[float, float | None]:
    """(LR multiplier, momentum or None = unchanged) for training at ``batch`` with hyper-parameters tuned at
    ``base_batch``, by ``rule``: none | linear | sqrt | adascale (needs b_simple) | noise_lr (needs dataset_size) |
    noise_momentum (needs dataset_size and momentum; keeps the LR).

    >>> rescale("linear", 128, 256)
    (2.0, None)
    """
    if rule == "none":
        return 1.0, None
    if rule == "linear":
        return linear_lr(1.0, base_batch, batch), None
    if rule == "sqrt":
        return sqrt_lr(1.0, base_batch, batch), None
    if rule == "adascale":
        return adascale_gain_from_noise(b_simple, base_batch, batch), None
    if rule in ("noise_lr", "noise_momentum") and not dataset_size:
        raise HastenError(f"lr rule {rule!r} needs the dataset size (Smith & Le's noise scale depends on N)")
    if rule == "noise_lr":
        return constant_noise_lr(1.0, base_batch, batch, dataset_size, momentum or 0.0), None
    if rule == "noise_momentum":
        if momentum is None:
            raise HastenError("lr rule 'noise_momentum' needs the base momentum (SGD momentum)")
        return 1.0, constant_noise_momentum(momentum, 1.0, base_batch, batch, dataset_size)
    raise HastenError(f"unknown lr rule {rule!r}: choose one of {', '.join(RULES)}")
