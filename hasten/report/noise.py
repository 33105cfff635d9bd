"""The noise-scale report: B_simple over training and against the loss, |G|² and tr(Σ), the training curves."""
from __future__ import annotations

from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from hasten.report.html import Report
from hasten.report.schedule import add_schedule_section, finite


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


def noise_report(title: str, rows: list[dict], summary: dict[str, Any], notes: list[str] = ()) -> Report:
    """Build the report from the run's metrics rows (metrics.jsonl) and a summary dict shown as a table."""
    rep = Report(title)
    b = summary.get("b_simple")
    se = summary.get("b_simple_se")
    if finite(b):
        rep.text(f"Gradient noise scale B_simple = {b:.4g} ± {1.96 * se:.2g} (95% interval)"
                 if finite(se) else f"Gradient noise scale B_simple = {b:.4g}", cls="big")
    for note in notes:
        rep.text(note, cls="note")
    rep.table([{"quantity": k, "value": v} for k, v in summary.items()])
    add_schedule_section(rep, rows)  # batch size, LR and B_simple, when the batch changed or B_simple was measured

    steps, bs = _series(rows, "noise/b_simple")
    _, bse = _series(rows, "noise/b_simple_se")
    if len(steps):
        rep.heading("B_simple over training")
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        ax = axes[0]
        ax.plot(steps, bs, color="C0", label="B_simple (smoothed |G|² and tr Σ, then divided)")
        if len(bse) == len(bs):
            lo = bs - 1.96 * bse
            if (bs > 0).all():  # log axis: show the part of the interval above zero
                lo = np.maximum(lo, bs.min() / 10)
            ax.fill_between(steps, lo, bs + 1.96 * bse, color="C0", alpha=0.2, label="95% interval")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("B_simple (examples)")
        ax.set_yscale("log" if (bs > 0).all() else "linear")
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
        ax.set_yscale("log" if (bs > 0).all() else "linear")
        ax.grid(alpha=0.3)
        rep.figure(fig, "B_simple grows as the loss falls: larger batches pay later in training (McCandlish et al. 2018, §3).")

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
