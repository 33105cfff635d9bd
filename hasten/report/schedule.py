"""Batch size, learning rate and B_simple over a run, against examples seen and against optimizer steps.

The figure the `hasten train` and `hasten noise-scale` reports show when the batch changes (batch=increase,
adaptive, stages) or the noise scale is measured: an adaptive schedule's batch is read beside the B_simple it
follows (McCandlish et al. 2018: train near B ≈ B_simple), an increasing one beside the LR decay it replaces
(Smith et al. 2017).
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from hasten.report.html import Report

# Panel -> the metrics.jsonl key it plots.
KEYS = {"batch_size": "batch_size", "lr": "lr", "b_simple": "noise/b_simple"}


def finite(value) -> bool:
    """Whether a metrics value is a finite number (rows hold None, NaN or strings where nothing was measured)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _number(value) -> float:
    return float(value) if finite(value) else math.nan


def schedule_series(rows: list[dict]) -> dict[str, np.ndarray]:
    """One array per quantity over the logged steps of metrics.jsonl rows: ``step``, ``examples`` and those of
    :data:`KEYS` (NaN where a row lacks the value, e.g. B_simple before the first measurement)."""
    rows = [r for r in rows if "step" in r and "examples" in r]
    columns = {"step": "step", "examples": "examples", **KEYS}
    return {name: np.array([_number(r.get(key)) for r in rows], float) for name, key in columns.items()}


def changes_batch_or_measures(rows: list[dict]) -> bool:
    """True when a run followed a batch schedule (it logs ``batch/planned``) or measured B_simple."""
    return any("batch/planned" in r for r in rows) or bool(np.isfinite(schedule_series(rows)["b_simple"]).any())


def schedule_figure(rows: list[dict]) -> plt.Figure:
    """2×3 panels: batch size, LR, B_simple (batch size faint beside it); top against examples, bottom steps. A
    step's batch spans (examples before it, examples after it]."""
    s = schedule_series(rows)
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), sharex="row")
    for row, x_key, x_label in ((0, "examples", "examples seen"), (1, "step", "optimizer step")):
        x = s[x_key]
        ax_b, ax_lr, ax_n = axes[row]
        ax_b.step(x, s["batch_size"], where="pre", color="C0")
        ax_b.set_ylabel("batch size (examples)")
        ax_lr.plot(x, s["lr"], color="C1")
        ax_lr.set_ylabel("learning rate")
        measured = np.isfinite(s["b_simple"])
        ax_n.plot(x[measured], s["b_simple"][measured], color="C2", label="B_simple")
        ax_n.step(x, s["batch_size"], where="pre", color="C0", alpha=0.3, label="batch size")
        if measured.any() and (s["b_simple"][measured] > 0).all():
            ax_n.set_yscale("log")
        ax_n.set_ylabel("B_simple (examples)")
        ax_n.legend(fontsize=8)
        for ax in axes[row]:
            ax.set_xlabel(x_label)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def add_schedule_section(rep: Report, rows: list[dict]) -> bool:
    """Add the figure to ``rep`` when the run changed its batch or measured B_simple; returns whether it did."""
    if not rows or not changes_batch_or_measures(rows):
        return False
    rep.heading("Batch size, learning rate and B_simple")
    rep.figure(schedule_figure(rows), "Per optimizer step, from metrics.jsonl; top: against examples seen, bottom: "
               "against steps. The batch is the one drawn (an epoch's last batch may be smaller).")
    return True
