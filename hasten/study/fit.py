"""The critical batch size fitted from steps-to-target at several batch sizes, and the regimes it implies.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162, §2.3.
Runs that reach the same target at batch size B take S steps and E = B·S examples, traded along

    (S/S_min − 1)(E/E_min − 1) = 1          (eq. 2.11)        B_crit = E_min/S_min          (eq. 2.12)

With E = B·S this multiplies out to S·(B·S − B·S_min − E_min) = 0, whose positive root is

    S(B) = S_min + E_min/B = S_min·(1 + B_crit/B),        E(B) = B·S(B) = E_min·(1 + B/B_crit),

so at B = B_crit a run takes 2·S_min steps and 2·E_min examples.

Fit: least squares in log space (steps-to-target errors are multiplicative), Σ (log S_i − log S(B_i))², over
(log S_min, log B_crit), which is (log S_min, log E_min) re-parametrized. For a fixed B_crit the best log S_min is
the mean of log S_i − log(1 + B_crit/B_i), so the fit is a 1-D search on log B_crit: a dense grid (global, needs
no starting guess, cannot diverge) refined by golden section, run for all bootstrap replicates at once.

Identified or not: the curve bends from S ∝ 1/B (B ≪ B_crit) to S ≈ S_min (B ≫ B_crit) over about two decades
around B_crit. With B_crit more than ``IDENTIFY_FACTOR`` = 10 above the largest batch (or below the smallest), every
point lies within 10% of one straight branch (all "perfect scaling", or all "plateau", in :func:`scaling_regimes`):
the steps cannot tell B_crit from infinity (or 0), and the least-squares B_crit is whatever the noise makes it, up
to e¹² × the largest batch. The same holds when the bootstrap interval reaches that far. The fit then says "B_crit not identified" with the reason, and no number.
Without a bootstrap (fewer than 4 points, or ``bootstrap=0``) only the point estimate decides, so noisy points
that barely bend can still pass.

Bootstrap: residual bootstrap. The batch sizes are a design chosen by the experimenter, so they stay fixed;
log-space residuals (inflated by √(n/(n−2)) for the two fitted parameters) are resampled with replacement onto the
fitted curve and the curve is refitted. This works with one trial per batch size as well as several, and never
draws a replicate that lacks the smallest or largest batch. Intervals are the 2.5/97.5 percentiles.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from hasten.errors import HastenError

_GRID_POINTS = 801
_GRID_MARGIN = 12.0  # nats beyond the tested batch range; further out the curve is flat (B_crit not identified)
_GOLDEN_ITERS = 64
_MIN_POINTS_FOR_CI = 4
IDENTIFY_FACTOR = 10.0  # B_crit beyond this factor outside the grid: the curve has not bent within it (see above)
REGIMES = ("perfect scaling", "diminishing returns", "plateau")


@dataclass(frozen=True)
class CriticalBatchFit:
    """S_min, E_min and B_crit = E_min/S_min fitted to steps-to-target (McCandlish et al. 2018, eqs. 2.11-2.12).

    ``ci`` maps "s_min", "e_min", "b_crit" to 95% residual-bootstrap intervals (None below 4 points or with
    ``bootstrap=0``). ``residual_rms`` is √(mean squared log residual): 0.1 means the curve misses by ~10%.

    When the batch sizes do not reach the bend of the curve, ``identified`` is False, ``b_crit`` is None and
    ``reason`` says so and which way to extend the grid; ``side`` is "above" (steps still fall as 1/B: B_crit above
    the grid, E_min still known), "below" (steps flat: B_crit below it, S_min still known) or "either" (the interval
    runs off both ways). ``curve`` is the least-squares (S_min, B_crit), which predicts steps inside the grid either
    way; ``predict_steps`` and ``predict_examples`` use it.
    """

    s_min: float | None
    e_min: float | None
    b_crit: float | None
    ci: dict[str, tuple[float, float]] | None
    residual_rms: float
    n_points: int
    identified: bool = True
    reason: str = ""  # "" when identified
    side: str = ""  # not identified: above | below | either
    curve: tuple[float, float] | None = None  # least-squares (S_min, B_crit); None = (s_min, b_crit)

    def _curve(self) -> tuple[float, float]:
        return self.curve or (self.s_min, self.b_crit)

    def predict_steps(self, b):
        """S(B) = S_min·(1 + B_crit/B): steps to the target at batch size B (float, or array for an array)."""
        s_min, b_crit = self._curve()
        out = s_min * (1.0 + b_crit / np.asarray(b, dtype=float))
        return float(out) if out.ndim == 0 else out

    def predict_examples(self, b):
        """E(B) = E_min·(1 + B/B_crit) = B·S(B): examples to the target at batch size B."""
        s_min, b_crit = self._curve()
        out = s_min * b_crit * (1.0 + np.asarray(b, dtype=float) / b_crit)
        return float(out) if out.ndim == 0 else out

    def as_dict(self) -> dict:
        return asdict(self)


def _positive_1d(name: str, x) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise HastenError(f"{name} must be a list of numbers, got {x!r}") from None
    if a.ndim != 1:
        raise HastenError(f"{name} must be a flat list of numbers, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise HastenError(f"{name} has NaN or infinite entries: drop batch sizes that never reached the target")
    if np.any(a <= 0):
        raise HastenError(f"{name} must all be positive, got {a[a <= 0].tolist()}")
    return a


def _log_curve(log_b_crit: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """log(1 + B_crit/B), broadcast over log_b_crit[..., None] and log_b."""
    return np.logaddexp(0.0, log_b_crit[..., None] - log_b)


def _profiled_rss(log_b_crit: np.ndarray, y: np.ndarray, log_b: np.ndarray) -> np.ndarray:
    """Σ residual² after the best log S_min for each log B_crit; shapes (R,) and (R, n) -> (R,)."""
    r = y - _log_curve(log_b_crit, log_b)
    r -= r.mean(axis=-1, keepdims=True)
    return np.einsum("rn,rn->r", r, r)


def _fit_log(y: np.ndarray, log_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares (log S_min, log B_crit) for each row of y = log S, shape (R, n): grid, then golden section."""
    grid = np.linspace(log_b.min() - _GRID_MARGIN, log_b.max() + _GRID_MARGIN, _GRID_POINTS)
    f = _log_curve(grid, log_b)  # (G, n)
    fc = f - f.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    # ‖yc − fc‖² expanded so the whole (R, G) table is one matrix product.
    rss = (yc * yc).sum(1)[:, None] - 2.0 * yc @ fc.T + (fc * fc).sum(1)[None, :]
    k = rss.argmin(axis=1)
    lo, hi = grid[np.maximum(k - 1, 0)], grid[np.minimum(k + 1, _GRID_POINTS - 1)]
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
    fc_, fd_ = _profiled_rss(c, y, log_b), _profiled_rss(d, y, log_b)
    for _ in range(_GOLDEN_ITERS):
        left = fc_ < fd_  # minimum lies in [lo, d]
        hi, lo = np.where(left, d, hi), np.where(left, lo, c)
        c_new, d_new = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
        f_new = _profiled_rss(np.where(left, c_new, d_new), y, log_b)
        fd_, fc_ = np.where(left, fc_, f_new), np.where(left, f_new, fd_)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
    log_b_crit = (lo + hi) / 2.0
    log_s_min = (y - _log_curve(log_b_crit, log_b)).mean(axis=1)
    return log_s_min, log_b_crit


def fit_critical_batch(batch_sizes, steps, *, bootstrap: int = 1000, seed: int = 0) -> CriticalBatchFit:
    """Fit S(B) = S_min + E_min/B (McCandlish et al. 2018, eqs. 2.11-2.12) in log space, with bootstrap intervals.

    ``batch_sizes`` and ``steps`` are paired per trial; repeated batch sizes (several trials) are fine. Use steps to
    the target of the fastest tuned run at each batch size (Shallue et al. 2018).

    >>> import numpy as np
    >>> b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048])
    >>> s = 1000 * (1 + 256 / b)                         # S_min = 1000 steps, B_crit = 256
    >>> fit = fit_critical_batch(b, s, bootstrap=0)
    >>> round(fit.s_min), round(fit.e_min), round(fit.b_crit)
    (1000, 256000, 256)
    >>> round(fit.predict_steps(256))                    # 2·S_min at B = B_crit
    2000
    >>> scaling_regimes(fit, [16, 256, 4096])
    ['perfect scaling', 'diminishing returns', 'plateau']
    """
    b = _positive_1d("batch_sizes", batch_sizes)
    s = _positive_1d("steps", steps)
    if b.shape != s.shape:
        raise HastenError(f"batch_sizes and steps differ in length ({b.size} vs {s.size}): one step count per trial")
    if np.unique(b).size < 2:
        raise HastenError("need steps-to-target at 2 or more distinct batch sizes to fit the critical batch")
    if int(bootstrap) != bootstrap or bootstrap < 0:
        raise HastenError(f"bootstrap must be a non-negative whole number of replicates, got {bootstrap}")
    log_b, y = np.log(b), np.log(s)
    log_s_min, log_b_crit = _fit_log(y[None, :], log_b)
    fitted = log_s_min[:, None] + _log_curve(log_b_crit, log_b)
    resid = (y - fitted)[0]
    ci = None
    n = b.size
    if n >= _MIN_POINTS_FOR_CI and bootstrap > 0:
        rng = np.random.default_rng(seed)
        pool = resid * math.sqrt(n / (n - 2))  # undo the shrinkage from fitting two parameters
        y_star = fitted + pool[rng.integers(0, n, size=(int(bootstrap), n))]
        bs_log_s, bs_log_bc = _fit_log(y_star, log_b)
        draws = {"s_min": bs_log_s, "e_min": bs_log_s + bs_log_bc, "b_crit": bs_log_bc}
        ci = {k: tuple(float(v) for v in np.exp(np.percentile(d, [2.5, 97.5]))) for k, d in draws.items()}
    s_min, b_crit = float(np.exp(log_s_min[0])), float(np.exp(log_b_crit[0]))
    side = _unidentified_side(b_crit, ci, b.min(), b.max())
    fields = dict(ci=ci, residual_rms=float(np.sqrt(np.mean(resid**2))), n_points=int(n))
    if not side:
        return CriticalBatchFit(s_min=s_min, e_min=s_min * b_crit, b_crit=b_crit, **fields)
    return CriticalBatchFit(s_min=s_min if side == "below" else None, e_min=s_min * b_crit if side == "above" else None,
                            b_crit=None, identified=False, reason=_not_identified(side, b, ci), side=side,
                            curve=(s_min, b_crit), **fields)


def _unidentified_side(b_crit: float, ci, b_lo: float, b_hi: float) -> str:
    """"" when B_crit is identified; else the side of the grid where it may lie (above, below or either)."""
    lo, hi = (ci or {}).get("b_crit", (b_crit, b_crit))
    above = max(b_crit, hi) > IDENTIFY_FACTOR * b_hi
    below = min(b_crit, lo) < b_lo / IDENTIFY_FACTOR
    return "either" if above and below else "above" if above else "below" if below else ""


def _not_identified(side: str, b: np.ndarray, ci) -> str:
    grid = f"B = {b.min():g} to {b.max():g}"
    detail = {"above": "steps still fall as 1/B, so B_crit lies above it",
              "below": "steps no longer fall with B, so B_crit lies below it",
              "either": "its 95% interval runs off the grid both ways"}[side]
    if ci:
        detail += f"; 95% interval {ci['b_crit'][0]:.3g} to {ci['b_crit'][1]:.3g}"
    direction = {"above": "upward", "below": "downward", "either": "both ways (or add seeds)"}[side]
    return (f"B_crit not identified (the curve has not bent within the grid, {grid}: {detail}): extend batch_sizes "
            f"{direction}")


def scaling_regimes(fit: CriticalBatchFit, batch_sizes, *, tolerance: float = 0.1) -> list[str]:
    """Label each batch size "perfect scaling", "diminishing returns" or "plateau" from the fitted curve.

    On S(B) = S_min·(1 + B_crit/B) the examples overhead is E/E_min − 1 = B/B_crit and the steps overhead is
    S/S_min − 1 = B_crit/B (eq. 2.11). With the default tolerance 0.1:

    - perfect scaling: B ≤ 0.1·B_crit — within 10% of the fewest examples; doubling B nearly halves the steps
      (the elasticity −dlog S/dlog B = 1/(1 + B/B_crit) is ≥ 0.91);
    - plateau: B ≥ 10·B_crit — within 10% of the fewest steps; a larger batch buys little (elasticity ≤ 0.09);
    - diminishing returns: in between.

    When B_crit is not identified every batch size gets the branch the grid shows ("perfect scaling" for
    side="above", "plateau" for side="below", None for "either").
    """
    if not 0 < tolerance < 1:
        raise HastenError(f"tolerance must be between 0 and 1, got {tolerance}")
    b = _positive_1d("batch_sizes", batch_sizes)
    if not fit.identified:  # what the grid shows: one branch of the curve (None where it shows nothing)
        label = {"above": REGIMES[0], "below": REGIMES[2]}.get(fit.side)
        return [label] * b.size
    ratio = b / fit.b_crit
    return [REGIMES[0] if r <= tolerance else REGIMES[2] if r >= 1.0 / tolerance else REGIMES[1] for r in ratio]


def wallclock_knee(batch_sizes, times, *, rtol: float = 0.05) -> float | None:
    """The smallest batch size that no larger batch size beats by more than ``rtol`` in wall-clock time to target.

    Each batch size counts with its fastest trial (as steps-to-result uses the first tuned trial to reach the goal).
    ``inf`` marks a trial that never reached the target. Returns None when the largest batch size is itself the
    knee (time was still improving at the end of the grid, or only one batch size) or when no trial got there.
    """
    b = _positive_1d("batch_sizes", batch_sizes)
    t = np.asarray(times, dtype=float)
    if t.shape != b.shape:
        raise HastenError(f"batch_sizes and times differ in length ({b.size} vs {t.size}): give one time per trial")
    if np.any(np.isnan(t)) or np.any(t <= 0):
        raise HastenError("times must be positive seconds (inf for a trial that never reached the target), no NaN")
    if not 0 <= rtol < 1:
        raise HastenError(f"rtol must be in [0, 1), got {rtol}")
    sizes = np.unique(b)
    best = np.array([t[b == size].min() for size in sizes])
    if not np.isfinite(best).any():
        return None
    for i in range(sizes.size - 1):
        if np.isfinite(best[i]) and not np.any(best[i + 1 :] < (1.0 - rtol) * best[i]):
            return float(sizes[i])
    return None
