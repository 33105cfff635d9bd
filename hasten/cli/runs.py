"""`hasten train` and `hasten noise-scale`: configure, train (resumably), summarize, write the report.

Under torchrun every rank trains; rank 0 alone prints and writes summary.json and report.html. The run directory
is locked for the whole command (rank 0): a second command on it stops with one line."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from hasten.errors import HastenError
from hasten.measure.noise_scale import B_SIMPLE_PREDICTS, NOT_MEASURABLE, lower_bound_only
from hasten.train.config import TrainConfig, default_run_dir, task_config
from hasten.train.distributed import is_main, world_size
from hasten.train.rundir import lock_run_dir


def _prepare(task_name: str, overrides: list[str], kind: str) -> tuple[TrainConfig, object]:
    from hasten.tasks import get_task

    task = get_task(task_name)
    cfg = task_config(task.name, overrides)
    if not cfg.run_dir:
        cfg = dataclasses.replace(cfg, run_dir=default_run_dir(cfg, kind))
    return cfg, task


def run_train(task_name: str, overrides: list[str]):
    """Train; print the final metrics; write summary.json and report.html (rank 0 only under torchrun)."""
    from hasten.train import fit

    cfg, task = _prepare(task_name, overrides, "train")
    with lock_run_dir(cfg.run_dir):  # held from training to the report (fit takes it again: re-entrant)
        result = fit(task, cfg, run_dir=cfg.run_dir)
        if is_main():
            _print_metrics(result)
            _write_report("train", cfg, task, result)
    return result


def run_noise_scale(task_name: str, overrides: list[str]):
    """Train while measuring; print B_simple with its uncertainty; write report.html (rank 0 only)."""
    from hasten.train import fit

    # Measuring is the point here: every step (noise_every) unless the command gives noise_budget=.
    cfg, task = _prepare(task_name, ["noise_budget=0", *overrides], "noise")
    if cfg.noise == "off":
        raise HastenError("noise=off measures nothing: use noise=micro, per_example or ddp (or `hasten train`)")
    with lock_run_dir(cfg.run_dir):  # held from training to the report
        result = fit(task, cfg, run_dir=cfg.run_dir)
        if is_main():
            _report_noise(cfg, task, result)
    return result


def _report_noise(cfg: TrainConfig, task, result) -> None:
    est = result.noise
    _print_metrics(result)
    if est is not None and not est.measurable and est.b_simple_lo > 0:
        print(f"gradient noise scale B_simple: {lower_bound_only(est.b_simple_lo)} ({est.n_steps} steps)")
    elif est is None or not est.measurable:
        print(f"gradient noise scale B_simple: {NOT_MEASURABLE}"
              + (f" ({est.n_steps} steps, {est.n_skipped} skipped; noise_horizon=-1 averages the whole run)"
                 if est is not None else ""))
    else:
        lo, hi = est.interval
        print(f"gradient noise scale B_simple = {est.b_simple:.4g}  (95% interval {lo:.4g} to {hi:.4g}, "
              f"{est.n_steps} steps, {est.n_skipped} skipped)")
        print(f"predicted critical batch size: of the order of {est.b_simple:.3g} examples. {B_SIMPLE_PREDICTS}")
    _write_report("noise-scale", cfg, task, result)


def _write_report(command: str, cfg: TrainConfig, task, result) -> Path:
    """summary.json and report.html in the run directory, from the result and metrics.jsonl."""
    from hasten.report.html import read_jsonl
    from hasten.report.noise import noise_report

    est, run_dir = result.noise, Path(result.run_dir)
    summary = {"task": cfg.task, "model": cfg.model or next(iter(task.models)), "batch_size": cfg.batch_size,
               "batch schedule": cfg.batch, "micro_batch_size": result.micro_batch_size,
               "noise source": result.noise_source,
               "processes": world_size(), "steps": result.steps, "examples": result.examples}
    if est is not None:
        summary.update({k: getattr(est, k) for k in ("b_simple", "b_simple_lo", "b_simple_hi", "measurable",
                                                      "b_simple_se", "grad_sq", "trace_cov", "n_steps",
                                                      "n_skipped", "n_eff")})
    summary.update(result.metrics)
    notes = [f"Run directory: {run_dir}. Configuration: {json.dumps(dataclasses.asdict(cfg))}"]
    if est is not None:
        notes.append("B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, eq. 2.9) from two batch sizes measured at the "
                     "same parameters each step (eq. A.2), |G|² and tr(Σ) smoothed separately before dividing; "
                     "95% interval by Fieller's theorem on that ratio.")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    path = noise_report(f"hasten {command}: {cfg.task}", rows, summary, notes).write(run_dir / "report.html")
    print(f"report: {path}")
    return path


def _print_metrics(result) -> None:
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
    print(f"{result.steps} steps, {result.examples} examples in {result.wall_time:.1f}s: {shown}")
