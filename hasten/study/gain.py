"""The gain of an adaptive batch size over the best fixed one (McCandlish et al. 2018, arXiv:1812.06162, App. D).

If the batch follows B(s) ∝ √B_noise(s) through training instead of staying fixed, the examples (or steps) saved
relative to the best fixed batch are governed by

    γ = E[√B_noise]² / E[B_noise]  ≤ 1       (Cauchy-Schwarz; = 1 only for a constant B_noise)

where E averages over training progress. γ near 1 means an adaptive batch buys little; B_noise = c·√s over evenly
spaced progress s gives γ = (4/5)²/(2/3) = 24/25.
"""
from __future__ import annotations

import numpy as np

from hasten.errors import HastenError


def adaptive_batch_gain(b_noise) -> float:
    """γ = E[√B_noise]²/E[B_noise] (McCandlish et al. 2018, App. D) from B_noise sampled evenly in progress.

    Pass the *smoothed* noise-scale trajectory (e.g. ``NoiseScale(horizon=...)`` read at even intervals, or the
    rows of a run's noise-scale log), one value per equal slice of progress. Negative values are rejected rather
    than clipped: they come from unsmoothed per-step estimates, and clipping them to 0 would bias γ downward.

    >>> adaptive_batch_gain([100.0, 100.0, 100.0])
    1.0
    >>> round(adaptive_batch_gain([1.0, 9.0]), 3)   # (1+3)²/4 / ((1+9)/2)
    0.8
    """
    try:
        b = np.asarray(b_noise, dtype=float).ravel()
    except (TypeError, ValueError):
        raise HastenError(f"b_noise must be a list of numbers, got {b_noise!r}") from None
    if b.size == 0:
        raise HastenError("b_noise is empty: pass the noise-scale trajectory measured over the run")
    if not np.all(np.isfinite(b)):
        raise HastenError("b_noise has NaN or infinite entries: drop steps where the noise scale was undefined")
    if np.any(b < 0):
        raise HastenError(
            f"b_noise has {int((b < 0).sum())} negative entries: pass the smoothed noise scale, not per-step estimates"
        )
    mean = b.mean()
    if mean == 0:
        raise HastenError("b_noise is all zeros: the noise scale was never measured")
    return float(min(np.sqrt(b).mean() ** 2 / mean, 1.0))
