"""The batch-size study's report.html (steps, examples and time against batch size with the fitted curve, B_simple
against B_crit, the Smith & Le curves, tables) and its results.csv."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from hasten.measure.noise_scale import B_SIMPLE_PREDICTS
from hasten.report.html import Report
from hasten.train.checkpoint import write_atomic

CSV_COLUMNS = ("trial_id", "kind", "batch_size", "lr", "momentum", "seed", "status", "steps", "examples", "time",
               "steps_run", "examples_run", "train_time", "budget")


def write_csv(records: list[dict], path: str | Path) -> Path:
    """One row per trial: the columns above plus its final evaluation (eval/*) and, for the noise run, B_simple."""
    extra = sorted({k for r in records for k in (r.get("final") or {})})
    noise = ("b_simple_at_target", "b_simple_mean", "adaptive_gain")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*CSV_COLUMNS, *extra, *noise])
    for r in records:
        final = r.get("final") or {}
        writer.writerow([_cell(r.get(c)) for c in CSV_COLUMNS] + [_cell(final.get(k)) for k in extra]
                        + [_cell(r.get(k)) for k in noise])
    write_atomic(path, buf.getvalue().encode())
    return Path(path)


def _cell(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _best(s: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = [(r["batch_size"], r[key]) for r in s["per_batch"] if r.get(key)]
    return (np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float)) if pts else (np.zeros(0),) * 2


def _axes(ax, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")


def _curve(fit: dict) -> tuple[float, float]:
    """(S_min, B_crit) of the fitted curve: the least-squares one also when B_crit is not identified."""
    return tuple(fit.get("curve") or (fit["s_min"], fit["b_crit"]))


def _vlines(ax, s: dict) -> None:
    fit, pred = s.get("fit"), s.get("prediction") or {}
    if fit and fit.get("b_crit"):
        ax.axvline(fit["b_crit"], color="C3", ls="--", label=f"B_crit = {fit['b_crit']:.3g}")
    if pred.get("b_simple_at_target"):
        ax.axvline(pred["b_simple_at_target"], color="C2", ls=":", label=f"B_simple = {pred['b_simple_at_target']:.3g}")


def _scaling_figures(rep: Report, s: dict, target: list[dict]) -> None:
    fit = s.get("fit")
    b_all = np.array(s["batch_sizes"], float)
    grid = np.geomspace(b_all.min() / 1.5, b_all.max() * 1.5, 200)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, key, label in zip(axes, ("steps", "examples", "time"),
                              ("steps to result", "examples to result", "training seconds to result")):
        tried = [(r["batch_size"], r[key]) for r in target if r.get(key)]
        if tried:
            ax.scatter(*zip(*tried), s=12, color="0.6", label="each trial that reached the goal")
        b, y = _best(s, key)
        ax.plot(b, y, "o", color="C0", ms=7, label="fastest trial per batch size")
        shown = " (B_crit not identified: least squares)" if fit and not fit.get("b_crit") else ""
        if fit and key == "steps":
            s_min, b_crit = _curve(fit)
            ax.plot(grid, s_min * (1 + b_crit / grid), color="C1", label="S = S_min(1 + B_crit/B)" + shown)
            if fit["s_min"]:
                ax.axhline(fit["s_min"], color="C1", alpha=0.4, ls=":", label=f"S_min = {fit['s_min']:.3g}")
        if fit and key == "examples":
            s_min, b_crit = _curve(fit)
            ax.plot(grid, s_min * (b_crit + grid), color="C1", label="E = E_min(1 + B/B_crit)" + shown)
            if fit["e_min"]:
                ax.axhline(fit["e_min"], color="C1", alpha=0.4, ls=":", label=f"E_min = {fit['e_min']:.3g}")
        if key == "time" and s.get("wallclock_knee"):
            ax.axvline(s["wallclock_knee"], color="C4", ls="-.", label=f"wall-clock knee B = {s['wallclock_knee']:g}")
        _vlines(ax, s)
        _axes(ax, label)
        ax.legend(fontsize=7, framealpha=0.7)
    rep.figure(fig, "Steps, examples and training time to the goal against batch size; the curves are the fit of "
                    "(S/S_min − 1)(E/E_min − 1) = 1 (McCandlish et al. 2018, eq. 2.11).")


def _prediction_figure(rep: Report, s: dict) -> None:
    pred, fit = s.get("prediction") or {}, s.get("fit")
    traj = [(step, b) for step, b in pred.get("trajectory") or [] if b is not None and math.isfinite(b) and b > 0]
    if not traj:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*traj), "o-", color="C2", label=f"B_simple during the run at B = {pred['batch_size']}")
    if fit and fit.get("b_crit"):
        ax.axhline(fit["b_crit"], color="C3", ls="--", label="B_crit fitted from the trials")
        ci = (fit.get("ci") or {}).get("b_crit")
        if ci:
            ax.axhspan(*ci, color="C3", alpha=0.15, label="B_crit 95% bootstrap interval")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step (up to the goal)")
    ax.set_ylabel("batch size (examples)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    rep.figure(fig, "The one-run prediction B_simple (eq. 2.9), sampled evenly over the run, against B_crit.")


def _smith_le_figure(rep: Report, sl: dict) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, c in enumerate(sl["curves"]):
        ax.plot(c["batch_sizes"], c["metric"], "o-", color=f"C{i}", label=f"lr = {c['lr']:.3g}")
        if c["b_opt"]:
            ax.axvline(c["b_opt"], color=f"C{i}", ls=":", alpha=0.7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size B")
    ax.set_ylabel(f"final test {sl['metric'].removeprefix('eval/')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    rep.figure(fig, f"Smith & Le 2017: final test metric after {sl['epochs']:.3g} epochs at fixed LR; dotted lines "
                    "mark B_opt (parabola in log B through the best point).")


def _interval(pred: dict) -> str:
    """The one-run B_simple's 95% interval at the goal; no upper bound (None in metrics.jsonl) = not measurable."""
    lo, hi = pred.get("b_simple_lo"), pred.get("b_simple_hi")
    if lo is None:
        return "-"  # a study recorded before the interval was logged
    return f"{lo:.3g} to {hi:.3g}" if hi is not None else "not measurable"


def study_report(s: dict, records: list[dict]) -> Report:
    """The report of a finished (or resumed and finished) study."""
    rep = Report(f"hasten study batch-size: {s['task']}")
    fit, pred = s.get("fit"), s.get("prediction") or {}
    if fit and fit.get("b_crit"):
        ci = (fit.get("ci") or {}).get("b_crit")
        span = f" (95% interval {ci[0]:.3g} to {ci[1]:.3g})" if ci else ""
        rep.text(f"Critical batch B_crit = {fit['b_crit']:.4g}{span}; S_min = {fit['s_min']:.4g} steps, "
                 f"E_min = {fit['e_min']:.4g} examples", cls="big")
    elif fit:  # not identified: the reason instead of a number (hasten.study.fit)
        rep.text(fit["reason"], cls="big")
    rep.text(f"Goal: {' and '.join(s['goals'])}. Steps to result at a batch size = the first step at which any "
             "of its tuned trials reached the goal (Shallue et al. 2018). Training seconds exclude evaluation; "
             "trials ran in parallel, so they share the machine.", cls="note")
    for note in s.get("notes", []):
        if not fit or note != fit.get("reason"):  # the unidentified B_crit's reason is shown above
            rep.text(f"Note: {note}", cls="note")
    target = [r for r in records if r["kind"] == "target"]
    _scaling_figures(rep, s, target)
    rep.heading("Steps to result per batch size")
    rep.table([{"batch size": r["batch_size"], "seed": r["seed"], "best lr": r["lr"], "momentum": r["momentum"],
                "steps": r["steps"], "fitted steps": r.get("fitted_steps"), "examples": r["examples"],
                "train s": r["time"], "reached": r["reached"], "regime": r.get("regime") or ""}
               for r in s["per_batch"]])
    if s.get("wallclock_knee"):
        rep.text(f"Wall-clock time to the goal stops improving (by more than 5%) beyond B = {s['wallclock_knee']:g} "
                 "on this machine.")
    if pred:
        rep.heading("One-run prediction: B_simple beside B_crit (McCandlish et al. 2018, Table 1)")
        b_crit = fit and (fit["b_crit"] or "not identified")
        rep.table([{"task": s["task"], "B_crit": b_crit, "B_simple at goal": pred["b_simple_at_target"],
                    "B_simple 95% interval (goal)": _interval(pred),
                    "B_simple mean over run": pred["b_simple_mean"],
                    "B_crit / B_simple (goal)": pred.get("ratio_at_target"),
                    "B_crit / B_simple (mean)": pred.get("ratio_mean"),
                    "adaptive gain γ": pred.get("adaptive_gain")}])
        rep.text(f"Measured in one run at B = {pred['batch_size']}, lr = {pred['lr']:.4g} (the fastest trial's), "
                 f"noise source {pred['noise_source']}, EMA horizon {pred['noise_horizon']:.4g} examples. "
                 f"{B_SIMPLE_PREDICTS} γ = E[√B_noise]²/E[B_noise] ≤ 1 (App. D, B_simple standing in for B_noise) "
                 "governs what a batch following B ∝ √B_noise saves over the best fixed batch: near 1, little.",
                 cls="note")
        _prediction_figure(rep, s)
    sl = s.get("smith_le")
    if sl:
        rep.heading("Smith & Le check: best batch at fixed learning rate")
        _smith_le_figure(rep, sl)
        rep.table([{"lr": c["lr"], "B_opt": c["b_opt"]} for c in sl["curves"]])
        if "lr_ratio" in sl:
            rep.text(f"ε ratio {sl['lr_ratio']:.3g}, B_opt ratio {sl['b_opt_ratio']:.3g}: B_opt ∝ εN/(1 − m) "
                     "predicts equal ratios (grid resolution: a factor of 2 in B).")
    rep.heading("All trials")
    cols = ("kind", "batch_size", "lr", "momentum", "seed", "status", "steps", "examples", "time", "steps_run")
    rep.table([{c: r.get(c) for c in cols} for r in records])
    rep.heading("Environment")
    rep.table([{"key": k, "value": str(v)} for k, v in {**s["environment"], "elapsed_s": s["elapsed_s"]}.items()])
    return rep
