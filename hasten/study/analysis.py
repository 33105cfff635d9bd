"""From trial records to the study's findings: steps to result per batch size, the critical batch, the regimes,
the wall-clock knee, the one-run B_simple beside B_crit, the Smith & Le check and the adaptive-batch gain."""
from __future__ import annotations

import math
import os
import platform
import subprocess
from pathlib import Path

import numpy as np

from hasten.study.fit import fit_critical_batch, scaling_regimes, wallclock_knee


def steps_to_result(records: list[dict], batch_sizes, seeds) -> list[dict]:
    """Per (batch size, seed): the fastest trial that reached the goal (Shallue et al. 2018), its LR and momentum,
    and how many of the trials there got to the goal."""
    rows = []
    for b in sorted(batch_sizes):
        for seed in seeds:
            trials = [r for r in records if r["batch_size"] == b and r["seed"] == seed]
            reached = [r for r in trials if r.get("steps")]
            best = min(reached, key=lambda r: (r["steps"], r["time"] or 0.0)) if reached else None
            lrs = sorted({r["lr"] for r in trials})
            edge = bool(best) and len(lrs) > 1 and best["lr"] in (lrs[0], lrs[-1])
            rows.append({"batch_size": b, "seed": seed, "steps": best and best["steps"],
                         "examples": best and best["examples"], "time": best and best["time"],
                         "lr": best and best["lr"], "momentum": best and best["momentum"],
                         "reached": f"{len(reached)}/{len(trials)}", "lr_at_grid_edge": edge})
    return rows


def smith_le(records: list[dict], metric_key: str) -> dict | None:
    """At each fixed LR: final test metric against batch size and the best batch B_opt (Smith & Le 2017: at fixed
    ε, B_opt ∝ εN/(1 − m)). B_opt is refined by a parabola in log B through the best grid point and its
    neighbours. With two LRs, B_opt's ratio is set beside ε's ratio."""
    by_lr: dict[float, list] = {}
    for r in records:
        value = (r.get("final") or {}).get(metric_key)
        by_lr.setdefault(r["lr"], []).append((r["batch_size"], value if value is not None else math.nan))
    if not by_lr:
        return None
    curves = []
    for lr, points in sorted(by_lr.items(), reverse=True):
        points.sort()
        b = np.array([p[0] for p in points], float)
        y = np.array([p[1] for p in points], float)
        curves.append({"lr": lr, "batch_sizes": b.tolist(), "metric": y.tolist(), "b_opt": _argmax_log(b, y)})
    out = {"metric": metric_key, "curves": curves}
    if len(curves) >= 2 and all(c["b_opt"] for c in curves[:2]):
        hi, lo = curves[0], curves[1]
        out.update({"lr_ratio": hi["lr"] / lo["lr"], "b_opt_ratio": hi["b_opt"] / lo["b_opt"]})
    return out


def _argmax_log(b: np.ndarray, y: np.ndarray) -> float | None:
    if not np.isfinite(y).any():
        return None
    k = int(np.nanargmax(y))
    if 0 < k < len(b) - 1 and np.isfinite(y[k - 1 : k + 2]).all():
        x = np.log(b[k - 1 : k + 2])
        a, c, _ = np.polyfit(x, y[k - 1 : k + 2], 2)
        if a < 0:
            return float(np.exp(np.clip(-c / (2 * a), x[0], x[2])))
    return float(b[k])


def analyze(records: list[dict], opts, cfg, task, goals, batch_sizes, train_size: int) -> dict:
    """The summary written to study.json and shown in the report."""
    target = [r for r in records if r["kind"] == "target"]
    notes = []
    per_batch = steps_to_result(target, batch_sizes, opts.seeds)
    points = [(r["batch_size"], r["steps"]) for r in per_batch if r["steps"]]
    fit = None
    if len({b for b, _ in points}) >= 2:
        fit = fit_critical_batch([b for b, _ in points], [s for _, s in points], bootstrap=opts.bootstrap)
        if not fit.identified:
            notes.append(fit.reason)  # "B_crit not identified (...): extend batch_sizes ..."
        regimes = dict(zip(batch_sizes, scaling_regimes(fit, batch_sizes)))
        for row in per_batch:
            row["regime"] = regimes[row["batch_size"]]
            row["fitted_steps"] = fit.predict_steps(row["batch_size"])
    else:
        notes.append("fewer than 2 batch sizes reached the goal: no critical batch fitted (ease the target or "
                     "raise max_steps)")
    missed = sorted({r["batch_size"] for r in per_batch if not r["steps"]})
    if missed:
        notes.append(f"no trial reached the goal at batch sizes {missed} within the step budget: left out of the fit")
    edge = sorted({r["batch_size"] for r in per_batch if r["lr_at_grid_edge"]})
    if edge:
        notes.append(f"the fastest LR is at the edge of the LR grid at batch sizes {edge}: widen lr_factors, or "
                     "steps to result there may be overestimated")
    early = sorted(r["batch_size"] for r in per_batch if r["examples"] and train_size < r["examples"] <= 2 * train_size)
    if early and any(g.name == "loss" for g in goals):
        notes.append(f"the training-loss goal was reached early in the second epoch at batch sizes {early}: the batch "
                     "loss drops as examples come round again, which can bunch steps to result at the epoch "
                     "boundary; a test goal (eval_loss: or the metric) avoids this")
    times = [r["time"] if r.get("time") else math.inf for r in target]
    knee = wallclock_knee([r["batch_size"] for r in target], times) if target else None
    summary = {"goals": [g.label(task.metric_name) for g in goals], "batch_sizes": list(batch_sizes),
               "per_batch": per_batch, "fit": fit.as_dict() if fit else None, "wallclock_knee": knee,
               "train_size": train_size, "notes": notes}
    noise = next((r for r in records if r["kind"] == "noise"), None)
    if noise is not None:
        summary["prediction"] = prediction(noise, fit)
    sl = [r for r in records if r["kind"] == "smith_le"]
    summary["smith_le"] = smith_le(sl, f"eval/{task.metric_name}") if sl else None
    if summary["smith_le"]:
        summary["smith_le"]["epochs"] = sl[0]["budget"] * sl[0]["batch_size"] / train_size
    return summary


def prediction(noise: dict, fit) -> dict:
    """B_simple from the one run, beside B_crit and their ratio. How far apart to expect them is the one statement
    :data:`hasten.measure.noise_scale.B_SIMPLE_PREDICTS` (the study report prints it)."""
    at, mean = noise.get("b_simple_at_target"), noise.get("b_simple_mean")
    out = {k: noise.get(k) for k in ("batch_size", "lr", "status", "steps", "b_simple_se", "b_simple_lo",
                                      "b_simple_hi", "trajectory",
                                      "trajectory_dropped", "adaptive_gain", "noise_source", "noise_horizon")}
    out.update({"b_simple_at_target": at, "b_simple_mean": mean, "b_crit": fit.b_crit if fit else None})
    if fit and fit.b_crit:  # None when not identified: no ratio to give
        out["ratio_at_target"] = fit.b_crit / at if at and at > 0 else None
        out["ratio_mean"] = fit.b_crit / mean if mean and mean > 0 else None
    return out


def environment() -> dict:
    """Code version, libraries, hardware and load: a timing means little without them."""
    import torch

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", ""
    return {"commit": (commit or "unknown") + ("+uncommitted" if dirty else ""), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
            "start_loadavg": os.getloadavg()}
