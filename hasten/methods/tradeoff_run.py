"""`hasten tradeoff TASK methods=...`: accuracy-vs-time curves from one cyclic-LR run per method combination,
checked against separately trained runs, with their Pareto frontier, written to report.html.

Keys: those of `hasten config TASK` (``steps`` is the length of the whole cyclic run) plus ``cycles``, ``t_mult``,
``separate`` and ``clock`` below; ``methods=a,b;c`` compares the combinations ``a,b`` and ``c`` with the baseline.
Every run lives in its own folder under the run directory and resumes if interrupted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

from hasten.errors import HastenError
from hasten.methods.tradeoff import CyclicLR, EvalPoints, cycle_ends, cycle_lengths, pareto_front


@dataclass(frozen=True)
class TradeoffConfig:
    cycles: int = 4  # cosine cycles in the one run (one point at the end of each)
    t_mult: float = 2.0  # each cycle is t_mult times longer than the one before (Portes et al. 2022)
    separate: bool = True  # also train a separate cosine run of each cycle-end length (baseline only)
    clock: str = "wall"  # time axis: wall (seconds) | cpu (process CPU seconds: steadier on a shared machine)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(tradeoff keys, training keys) of ``key=value`` arguments."""
    names = {f.name for f in dataclasses.fields(TradeoffConfig)}
    mine = [o for o in overrides if o.partition("=")[0].strip() in names]
    return mine, [o for o in overrides if o not in mine]


def environment() -> dict:
    """What a benchmark result must be stored with: code version, library versions, hardware."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                               cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} ×{len(names)}" if names else cpu
    return {"commit": (commit or "unknown") + ("+uncommitted" if dirty else ""), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpu": cpu,
            "threads": torch.get_num_threads(), "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}


def curve(task, cfg, lengths: list[int], run_dir: Path) -> list[dict]:
    """One cyclic run of sum(lengths) steps: a point per cycle end (training seconds exclude evaluations)."""
    from hasten.train import fit

    points = EvalPoints(cycle_ends(lengths))
    cfg = dataclasses.replace(cfg, steps=sum(lengths), eval_every=0, checkpoint_every=0, progress=False)
    fit(task, cfg, [CyclicLR(lengths, cfg.lr, cfg.warmup), points], run_dir=run_dir)
    return points.points


def separate_run(task, cfg, steps: int, run_dir: Path) -> dict:
    """A run of ``steps`` with the task's own (cosine) schedule: its final point."""
    from hasten.train import fit

    points = EvalPoints([steps])
    cfg = dataclasses.replace(cfg, steps=steps, eval_every=0, checkpoint_every=0, progress=False)
    fit(task, cfg, [points], run_dir=run_dir)
    return points.points[-1]


def run_tradeoff(task_name: str, overrides: list[str]) -> dict:
    """Train the curves, print a table, write ``report.html`` and ``tradeoff.json``; return the results."""
    from hasten.config import apply_overrides
    from hasten.train.config import default_run_dir, task_config
    from hasten.train.rundir import lock_run_dir

    mine, rest = split_overrides(overrides)
    tcfg = apply_overrides(TradeoffConfig(), mine)
    cfg = task_config(task_name, rest)
    if tcfg.clock not in ("wall", "cpu"):
        raise HastenError(f"clock={tcfg.clock!r}: choose wall or cpu")
    if cfg.schedule != "cosine":
        raise HastenError(f"tradeoff curves compare cosine runs: schedule={cfg.schedule} is not supported")
    from hasten.tasks import get_task

    task = get_task(cfg.task)
    lengths = cycle_lengths(cfg.steps, tcfg.cycles, tcfg.t_mult)
    base_dir = Path(cfg.run_dir or default_run_dir(cfg, "tradeoff"))
    with lock_run_dir(base_dir):  # the runs under it lock their own folders
        metric = f"eval/{task.metric_name}"
        combos = [""] + [c for c in cfg.methods.split(";") if c]  # several combinations: methods=a,b;c
        curves = {}
        for combo in combos:
            label = combo or "baseline"
            print(f"{label}: one cyclic run of {sum(lengths)} steps, cycles {lengths}")
            curves[label] = curve(task, dataclasses.replace(cfg, methods=combo), lengths, base_dir / _slug(label))
        separate = []
        if tcfg.separate:
            for end in cycle_ends(lengths):
                print(f"baseline: separate cosine run of {end} steps")
                baseline = dataclasses.replace(cfg, methods="")
                separate.append(separate_run(task, baseline, end, base_dir / f"separate-{end}"))
        result = {"task": cfg.task, "metric": metric, "lengths": lengths, "curves": curves, "separate": separate,
                  "cost_steps": {"one_run": sum(lengths), "separate_runs": sum(cycle_ends(lengths))},
                  "config": dataclasses.asdict(cfg), "tradeoff": dataclasses.asdict(tcfg),
                  "environment": environment()}
        if separate:
            for key in ("seconds", "cpu_seconds"):
                result[f"cost_{key}"] = {"one_run": curves["baseline"][-1][key],
                                         "separate_runs": sum(p[key] for p in separate)}
            result["max_gap"] = max(abs(a[metric] - b[metric]) for a, b in zip(curves["baseline"], separate))
        (base_dir / "tradeoff.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        time_key = "cpu_seconds" if tcfg.clock == "cpu" else "seconds"
        path = tradeoff_report(result, time_key).write(base_dir / "report.html")
        _print(result)
        print(f"report: {path}")
    return result


def _slug(label: str) -> str:
    return "cyclic-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in label)


def _print(result: dict) -> None:
    metric = result["metric"]
    for label, points in result["curves"].items():
        shown = ", ".join(f"{p['steps']} steps {p['seconds']:.1f}s {p[metric]:.4f}" for p in points)
        print(f"{label}: {shown}")
    for p in result["separate"]:
        print(f"separate {p['steps']} steps: {p['seconds']:.1f}s {p[metric]:.4f}")
    if "max_gap" in result:
        c = result["cost_steps"]
        print(f"largest gap one-run vs separate: {result['max_gap']:.4f}; cost {c['one_run']} vs "
              f"{c['separate_runs']} steps")


def tradeoff_report(result: dict, time_key: str = "seconds"):
    """The HTML report: curves and Pareto frontier (metric vs training time: wall ``seconds`` or, on a shared CPU
    machine, ``cpu_seconds``), points, costs, environment."""
    import matplotlib.pyplot as plt

    from hasten.report.html import Report

    metric = result["metric"]
    higher = "loss" not in metric
    rep = Report(f"hasten tradeoff: {result['task']}")
    rep.text("One point per cosine cycle of a single cyclic-LR run (Portes et al. 2022); cycle lengths "
             f"{result['lengths']}. Training seconds exclude evaluation and the first step.", cls="note")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    everything = []
    for label, points in result["curves"].items():
        xy = [(p[time_key], p[metric]) for p in points]
        everything += [(x, y, label) for x, y in xy]
        ax.plot(*zip(*xy), "o-", label=f"{label} (one run)")
    if result["separate"]:
        xy = [(p[time_key], p[metric]) for p in result["separate"]]
        everything += [(x, y, "baseline (separate)") for x, y in xy]
        ax.plot(*zip(*xy), "s--", label="baseline (separate runs)")
    front = [everything[i] for i in pareto_front([(x, y) for x, y, _ in everything], higher)]
    ax.step([x for x, _, _ in front], [y for _, y, _ in front], where="post", color="k", alpha=0.4,
            label="Pareto frontier")
    ax.set_xlabel(f"training {'CPU ' if time_key == 'cpu_seconds' else ''}seconds")
    ax.set_ylabel(metric)
    ax.legend()
    ax.grid(alpha=0.3)
    rep.figure(fig, f"{metric} against training time")
    rep.heading("Points")
    rows = [{"run": label, "steps": p["steps"], "seconds": p["seconds"], "CPU seconds": p.get("cpu_seconds"),
             metric: p[metric]} for label, points in result["curves"].items() for p in points]
    rows += [{"run": "baseline (separate)", "steps": p["steps"], "seconds": p["seconds"],
              "CPU seconds": p.get("cpu_seconds"), metric: p[metric]} for p in result["separate"]]
    rep.table(rows)
    rep.heading("Pareto frontier")
    rep.table([{"run": label, time_key: x, metric: y} for x, y, label in front])
    if "max_gap" in result:
        c, s, cpu = result["cost_steps"], result["cost_seconds"], result.get("cost_cpu_seconds", {})
        rep.heading("Cost")
        rep.text(f"One cyclic run: {c['one_run']} steps ({s['one_run']:.1f} s, {cpu.get('one_run', math.nan):.1f} "
                 f"CPU s); separate runs of the same lengths: {c['separate_runs']} steps ({s['separate_runs']:.1f} "
                 f"s, {cpu.get('separate_runs', math.nan):.1f} CPU s). Largest gap between a one-run point and the "
                 f"separate run of the same length: {result['max_gap']:.4f}.")
    rep.heading("Environment")
    rep.table([{"key": k, "value": str(v)} for k, v in result["environment"].items()])
    return rep
