"""The noise-scale report: B_simple over training and against the loss, |G|² and tr(Σ), the training curves.

Every sentence it states about the run is computed from the run's data (the summary and metrics.jsonl rows): the
estimate or "not measurable yet", and how B_simple moved with the loss (:func:`b_simple_trend`). What B_simple
predicts is the one statement of :data:`hasten.measure.noise_scale.B_SIMPLE_PREDICTS`.
"""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from hasten.measure.noise_scale import B_SIMPLE_PREDICTS, NOT_MEASURABLE, lower_bound_only
from hasten.report.html import Report
from hasten.report.schedule import add_schedule_section, finite

TREND_RHO = 0.5  # |Spearman ρ| needed before the report says that two series move together
TREND_MIN_STEPS = 10  # measured steps in the second half needed before it says anything about the trend


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and finite(r[key])]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pts)
    return np.asarray(steps, float), np.asarray(values, float)


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` points (for the noisy per-step training loss)."""
    if len(values) == 0:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n−1, ties sharing their mean rank (a constant series has no order)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + ends - 1) / 2.0)[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation; 0 when either series is constant."""
    rx, ry = _ranks(np.asarray(x, float)), _ranks(np.asarray(y, float))
    if rx.std() == 0 or ry.std() == 0:
        return 0.0
    return float(np.corrcoef(rx, ry)[0, 1])


def _measured(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Steps and B_simple where it was measurable: finite, and a finite upper bound where the rows log one."""
    pts = [(r["step"], r["noise/b_simple"]) for r in rows if finite(r.get("noise/b_simple"))
           and ("noise/b_simple_hi" not in r or finite(r["noise/b_simple_hi"]))]
    return (np.asarray([p[0] for p in pts], float), np.asarray([p[1] for p in pts], float))


def b_simple_trend(rows: list[dict]) -> str:
    """One sentence on how B_simple moved with the training loss over the second half of the run, from the rows.

    Over the logged steps past half the run where B_simple was measurable, the Spearman rank correlation of the
    smoothed training loss with the step says whether the loss moved (|ρ| ≥ TREND_RHO), and its correlation with
    B_simple whether B_simple followed. Whatever the data show is what the sentence says.
    """
    steps, bs = _measured(rows)
    lsteps, loss = _series(rows, "train/loss")
    smooth = dict(zip(lsteps, _smooth(loss, max(1, len(loss) // 50))))
    last = max((r["step"] for r in rows if "step" in r), default=0)
    keep = [(s, smooth[s], b) for s, b in zip(steps, bs) if s > last / 2 and s in smooth]
    n = len(keep)
    if n < TREND_MIN_STEPS:
        return (f"Too few steps with a measurable B_simple in the second half of training ({n}, fewer than "
                f"{TREND_MIN_STEPS}) to say how B_simple moves with the loss.")
    s, lo, b = map(np.asarray, zip(*keep))
    rho_loss = spearman(s, lo)
    if abs(rho_loss) < TREND_RHO:
        return (f"The smoothed training loss did not move clearly over the second half of training (Spearman "
                f"ρ = {rho_loss:.2f} against the step, |ρ| < {TREND_RHO}), so this run does not show how B_simple "
                "follows the loss.")
    loss_dir = "fell" if rho_loss < 0 else "rose"
    rho = spearman(lo, b)
    where = f"(Spearman ρ = {rho:.2f} between the smoothed loss and B_simple over {n} measured steps"
    if abs(rho) < TREND_RHO:
        return (f"B_simple showed no clear trend as the loss {loss_dir} over the second half of training "
                f"{where}, |ρ| < {TREND_RHO}).")
    b_dir = "grew" if (rho < 0) == (loss_dir == "fell") else "fell"
    paper = ("as McCandlish et al. 2018 found" if (b_dir, loss_dir) == ("grew", "fell") else
             "unlike McCandlish et al. 2018, who found that it grows as the loss falls")
    return f"B_simple {b_dir} as the loss {loss_dir} over the second half of training {where}), {paper}."


def meter_schedule(rows: list[dict]) -> str | None:
    """One sentence on which steps the meter measured (``noise/measured``, ``noise/every``) and, under noise_budget,
    its timed cost (``noise/cost``); None when the rows do not log them."""
    logged = [r for r in rows if "noise/every" in r]
    if not logged:
        return None
    measured = sum(1 for r in logged if r.get("noise/measured"))
    every = [r["noise/every"] for r in logged]
    n = f"N = {every[0]}" if min(every) == max(every) else f"N from {min(every)} to {max(every)}"
    text = f"The meter measured {measured} of {len(logged)} steps (one in N, {n})"
    costs = [r["noise/cost"] for r in logged if finite(r.get("noise/cost"))]
    if costs:  # each measured step's extra time, as the meter estimated it then, over the steps
        share = sum(r["noise/cost"] for r in logged if r.get("noise/measured") and finite(r.get("noise/cost")))
        text += (f"; N follows noise_budget: by its own timing a measured step took {100 * costs[-1]:.0f}% longer "
                 f"than a plain one at the end, and the meter about {100 * share / len(logged):.1f}% of the steps' "
                 "time over the run")
    return text + "."


def headline(summary: dict[str, Any]) -> str | None:
    """The estimate with its 95% interval, or "not measurable yet"; None for a run without a meter."""
    if "b_simple" not in summary:
        return None
    if not summary.get("measurable"):
        lo = summary.get("b_simple_lo") or 0.0
        return f"Gradient noise scale B_simple: {lower_bound_only(lo) if lo > 0 else NOT_MEASURABLE}"
    return (f"Gradient noise scale B_simple = {summary['b_simple']:.4g} (95% interval "
            f"{summary['b_simple_lo']:.4g} to {summary['b_simple_hi']:.4g})")


def b_simple_figure(rows: list[dict]) -> plt.Figure | None:
    """B_simple over the steps where it was measurable, its 95% interval shaded from the rows' ``noise/b_simple_lo``
    and ``noise/b_simple_hi``, and B_simple against the smoothed training loss; None if it never was measurable."""
    steps, bs = _measured(rows)
    if not len(steps):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    ax = axes[0]
    ax.plot(steps, bs, color="C0", label="B_simple (smoothed |G|² and tr Σ, then divided)")
    log = bool((bs > 0).all())
    lo_at, hi_at = (dict(zip(*_series(rows, key))) for key in ("noise/b_simple_lo", "noise/b_simple_hi"))
    band = np.asarray([s in lo_at and s in hi_at for s in steps])
    if band.any():
        lo = np.asarray([lo_at.get(s, np.nan) for s in steps])
        if log:  # log axis: show the part of the interval above zero (its lower end may be 0)
            lo = np.maximum(lo, bs.min() / 10)
        hi = np.asarray([hi_at.get(s, np.nan) for s in steps])
        ax.fill_between(steps, np.where(band, lo, bs), np.where(band, hi, bs), where=band, color="C0", alpha=0.2,
                        label="95% interval (Fieller)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("B_simple (examples)")
    ax.set_yscale("log" if log else "linear")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    lsteps, loss = _series(rows, "train/loss")
    ax = axes[1]
    if len(lsteps):
        smooth = dict(zip(lsteps, _smooth(loss, max(1, len(loss) // 50))))
        pairs = [(smooth[s], v) for s, v in zip(steps, bs) if s in smooth]
        if pairs:
            x, y = zip(*pairs)
            ax.plot(x, y, ".-", color="C1", ms=3)
            ax.invert_xaxis()
    ax.set_xlabel("training loss (smoothed; decreasing →)")
    ax.set_ylabel("B_simple (examples)")
    ax.set_yscale("log" if log else "linear")
    ax.grid(alpha=0.3)
    return fig


def noise_report(title: str, rows: list[dict], summary: dict[str, Any], notes: list[str] = ()) -> Report:
    """Build the report from the run's metrics rows (metrics.jsonl) and a summary dict shown as a table.

    ``summary`` holds, for a measured run, the final estimate's ``b_simple``, ``b_simple_lo``, ``b_simple_hi``
    and ``measurable`` (:class:`~hasten.measure.noise_scale.NoiseScaleEstimate`)."""
    rep = Report(title)
    top = headline(summary)
    if top:
        rep.text(top, cls="big")
        if summary.get("measurable"):
            rep.text(f"Predicted critical batch size: of the order of {summary['b_simple']:.3g} examples. "
                     f"{B_SIMPLE_PREDICTS}")
        rep.text(b_simple_trend(rows))
        if meter_schedule(rows):
            rep.text(meter_schedule(rows))
    for note in notes:
        rep.text(note, cls="note")
    rep.table([{"quantity": k, "value": v} for k, v in summary.items()])
    add_schedule_section(rep, rows)  # batch size, LR and B_simple, when the batch changed or B_simple was measured

    fig = b_simple_figure(rows)
    if fig is not None:
        rep.heading("B_simple over training")
        logged = sum(1 for r in rows if "noise/b_simple" in r)
        rep.figure(fig, f"B_simple at the {len(_measured(rows)[0])} of {logged} logged steps where it was measurable "
                        "(|G|² significantly above zero); shaded: its 95% interval (Fieller).")

    if len(_series(rows, "noise/grad_sq")[0]):
        rep.heading("|G|² and tr(Σ)")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for ax, key, label in ((axes[0], "noise/grad_sq", "|G|² (squared norm of the true gradient)"),
                               (axes[1], "noise/trace_cov", "tr(Σ) (per-example gradient variance)")):
            s, v = _series(rows, key)
            ax.plot(s, v)
            if len(v) and (v > 0).all():
                ax.set_yscale("log")
            ax.set_title(label, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        rep.figure(fig, "Each is smoothed separately from unbiased per-step estimates (eq. A.2); B_simple = tr(Σ)/|G|².")

    lsteps, loss = _series(rows, "train/loss")
    if len(lsteps):
        rep.heading("Training")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
        axes[0].plot(lsteps, loss, color="0.8", lw=0.7, label="per step")
        axes[0].plot(lsteps, _smooth(loss, max(1, len(loss) // 50)), color="C0", label="smoothed")
        esteps, eloss = _series(rows, "eval/loss")
        if len(esteps):
            axes[0].plot(esteps, eloss, "o-", color="C3", ms=3, label="test")
        axes[0].set_ylabel("loss")
        axes[0].legend(fontsize=8)
        metric = next((k for r in rows for k in r if k.startswith("eval/") and k != "eval/loss"), None)
        if metric:
            s, v = _series(rows, metric)
            axes[1].plot(s, v, "o-", color="C2", ms=3)
            axes[1].set_ylabel(metric)
        for ax in axes:
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        rep.figure(fig)
    return rep
