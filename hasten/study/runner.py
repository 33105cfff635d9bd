"""`hasten study batch-size TASK target=... [key=value ...]`: plan the trials, run the unfinished ones in parallel
(or on Ray Tune), then fit, check and report.

Layout of the study dir (``run_dir=``, default ``runs/study-<task>-<hash>``)::

    results.jsonl      one line per finished trial (appended, fsync'ed): a rerun skips the trials listed here
    trials/<id>/       each trial's own run dir (metrics.jsonl, checkpoint, train.log, attempts.jsonl)
    results.csv        the trials of this plan as a table
    study.json         the summary: steps to result per batch size, the fit, B_simple, Smith & Le, γ
    report.html        plots and tables

Resuming: run the same command again. Finished trials are read back from results.jsonl; an unfinished trial
resumes from its own checkpoint. Growing the grids (more batch sizes, LRs or seeds) keeps the finished trials.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import os
import time
from pathlib import Path

from hasten.errors import HastenError
from hasten.study.options import StudyOptions, TrialSpec, geometric_grid, noise_spec, parse_target, plan_trials
from hasten.study.options import scaled_lr, study_key, validate
from hasten.study.trials import BOUNDS, RESULTS, ResultsLog, run_trial, watch_parent
from hasten.tasks import task_origin
from hasten.train.checkpoint import write_atomic
from hasten.train.config import TrainConfig
from hasten.train.rundir import lock_run_dir


def configure(task_name: str, overrides) -> tuple[StudyOptions, TrainConfig, object]:
    """(study options, the training config the trials start from, the task) from ``key=value`` arguments."""
    from hasten.config import apply_overrides
    from hasten.tasks import get_task
    from hasten.train.config import task_config

    task = get_task(task_name)
    items = [_split(o) for o in overrides] if not isinstance(overrides, dict) else list(overrides.items())
    study_keys = {f.name for f in dataclasses.fields(StudyOptions)}
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    for key, _ in items:
        if key not in study_keys | train_keys:
            close = difflib.get_close_matches(key, sorted(study_keys | train_keys), n=1)
            hint = f" (did you mean {close[0]}?)" if close else "; see `hasten config TASK` and the study keys"
            raise HastenError(f"unknown key {key!r}{hint}")
    opts = apply_overrides(StudyOptions(), {k: v for k, v in items if k in study_keys})
    train = {k: v for k, v in items if k in train_keys}
    if "schedule" not in train:  # a decaying schedule would tie steps-to-target to the step budget
        train["schedule"] = "constant"
    cfg = task_config(task.name, train)
    _check_training(cfg)
    return opts, cfg, task


def _check_training(cfg: TrainConfig) -> None:
    """Settings every trial shares fail here, in one line, rather than inside a worker."""
    import torch

    from hasten.train.loop import make_optimizer, resolve_device
    from hasten.train.schedule import make_schedule

    make_schedule(cfg.schedule, max(cfg.steps, cfg.warmup), cfg.warmup)
    make_optimizer(cfg, [torch.zeros(1, requires_grad=True)])
    resolve_device(cfg.device)


def _split(arg: str) -> tuple[str, str]:
    key, sep, value = str(arg).partition("=")
    if not sep or not key.strip():
        raise HastenError(f"expected key=value, got {arg!r}")
    return key.strip(), value.strip()


def run_study(task_name: str, overrides) -> dict:
    """Run (or resume) the study; write results.jsonl/csv, study.json and report.html; return the summary."""
    from hasten.study.analysis import analyze, environment
    from hasten.study.report import study_report, write_csv

    opts, cfg, task = configure(task_name, overrides)
    train, _ = task.load(cfg.data or None)
    validate(opts, len(train))
    goals = parse_target(opts.target, task.metric_name)
    batch_sizes = opts.batch_sizes or geometric_grid(cfg.batch_size, len(train))
    if len(set(batch_sizes)) < 2:
        raise HastenError(f"{task.name}'s training set ({len(train)}) leaves fewer than 2 batch sizes: set batch_sizes")
    study_dir = Path(cfg.run_dir or f"runs/study-{task.name}-{study_key(cfg, goals, opts)}").resolve()
    base = dataclasses.replace(cfg, run_dir="", progress=False, eval_every=0)
    specs = plan_trials(base, opts, goals, batch_sizes, len(train), study_dir)
    env = environment()
    started = time.perf_counter()
    with lock_run_dir(study_dir):  # two studies writing the same trials would corrupt them
        log = ResultsLog(study_dir / RESULTS)
        print(f"study dir: {study_dir}")
        execute(specs, log, opts)
        noise = None
        if opts.noise_run:
            b, lr, momentum, examples = noise_point(cfg, opts, specs, log)
            noise = noise_spec(dataclasses.replace(base, momentum=momentum), opts, goals, b, lr, examples, study_dir)
            execute([noise], log, opts, label="noise-scale run")
        ids = [s.trial_id for s in specs] + ([noise.trial_id] if noise else [])
        records = [log.records[i] for i in ids]
        summary = analyze(records, opts, cfg, task, goals, batch_sizes, len(train))
        summary.update({"task": task.name, "study_dir": str(study_dir), "options": dataclasses.asdict(opts),
                        "config": dataclasses.asdict(base), "environment": {**env, "end_loadavg": os.getloadavg()},
                        "elapsed_s": time.perf_counter() - started})
        write_csv(records, study_dir / "results.csv")
        _write_json(study_dir / "study.json", summary)
        report = study_report(summary, records).write(study_dir / "report.html")
    print_summary(summary)
    print(f"report: {report}")
    return summary


def noise_point(cfg: TrainConfig, opts: StudyOptions, specs: list[TrialSpec], log: ResultsLog):
    """(batch, LR, momentum, examples to target) for the noise run: the grid batch nearest the task's batch size, at the
    LR of its fastest trial ("meaningful only in a reasonably tuned run"), else the task's LR."""
    sizes = sorted({s.cfg.batch_size for s in specs if s.kind == "target"})
    b = min(sizes, key=lambda x: (abs(math.log(x / cfg.batch_size)), x))
    done = [log.records[s.trial_id] for s in specs if s.kind == "target" and s.cfg.batch_size == b]
    reached = [r for r in done if r.get("steps")]
    if not reached:
        return b, scaled_lr(cfg.lr, cfg.batch_size, b, opts.lr_rule), cfg.momentum, None
    best = min(reached, key=lambda r: r["steps"])
    return b, best["lr"], best["momentum"], best["examples"]


def execute(specs: list[TrialSpec], log: ResultsLog, opts: StudyOptions, label: str = "trials") -> None:
    """Run the specs not yet in ``log``: in this process (workers=1), in spawned processes, or on Ray Tune."""
    todo = [s for s in specs if s.trial_id not in log.records]
    print(f"{label}: {len(todo)} to run, {len(specs) - len(todo)} already finished")
    if not todo:
        return
    cores = os.cpu_count() or 1
    workers = min(opts.workers or cores, len(todo))
    modules = task_modules(todo[0].cfg.task) if workers > 1 and opts.backend != "ray" else ()
    if not todo[0].cfg.threads:  # split the cores between the workers asked for (threads=N overrides)
        threads = max(1, cores // (opts.workers or cores))
        todo = [dataclasses.replace(s, cfg=dataclasses.replace(s.cfg, threads=threads)) for s in todo]
    count = iter(range(1, len(todo) + 1))
    bounds_path = Path(specs[0].cfg.run_dir).parents[1] / BOUNDS
    bounds: dict[str, int] = {}

    def bound(record: dict) -> None:  # trials still running at this batch size and seed stop once past it
        key = f"{record['batch_size']}-{record['seed']}"
        if record["kind"] == "target" and record.get("steps") and record["steps"] < bounds.get(key, math.inf):
            bounds[key] = record["steps"]

    def finished(record: dict) -> None:
        log.append(record)
        print(f"[{next(count)}/{len(todo)}] {describe(record)}", flush=True)
        bound(record)
        write_atomic(bounds_path, json.dumps(bounds).encode())

    for spec in specs:  # bounds from the finished trials of this plan only
        if spec.trial_id in log.records:
            bound(log.records[spec.trial_id])
    write_atomic(bounds_path, json.dumps(bounds).encode())

    if opts.backend == "ray":
        from hasten.study.ray_backend import run_trials_ray

        run_trials_ray(todo, workers, finished)
    elif workers == 1:
        for spec in todo:
            finished(run_trial(spec))
    else:
        _run_pool(todo, workers, finished, modules)


def task_modules(task_name: str) -> tuple[str, ...]:
    """Modules a spawned worker must import to know ``task_name``: the one that registered it, unless it is hasten's
    own. A task registered in the script being run (``__main__``) cannot be imported: a clear error."""
    origin = task_origin(task_name)
    if origin == "__main__":
        raise HastenError(
            f"task {task_name!r} is registered in the script you ran: study workers are separate processes and cannot "
            f"import it. Register it in a module on the Python path (e.g. my_tasks.py, imported by your script) "
            f"or run the study with workers=1"
        )
    return () if not origin or origin.startswith("hasten.") else (origin,)


def start_worker(parent_pid: int, modules: tuple[str, ...]) -> None:
    """Process-pool initializer: re-register the user's tasks (importing their modules), then watch the parent."""
    for module in modules:
        importlib.import_module(module)
    watch_parent(parent_pid)


def _run_pool(todo: list[TrialSpec], workers: int, finished, modules: tuple[str, ...] = ()) -> None:
    """A spawn process pool (no fork: torch's threads do not survive it); records come back to this process,
    the only writer of results.jsonl. Workers exit on their own if this process is killed (watch_parent)."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker,
                               initargs=(os.getpid(), modules))
    try:
        pending = {pool.submit(run_trial, spec) for spec in todo}  # submitted in order: small B first
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                finished(future.result())  # a trial's exception stops the study here
    except BaseException:  # don't wait for running trials: they resume from their checkpoints next time
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def describe(r: dict) -> str:
    head = f"{r['kind']} B={r['batch_size']} lr={r['lr']:.4g} m={r['momentum']:g} seed={r['seed']}"
    if r["kind"] == "smith_le":
        return f"{head}: {r.get('steps_run')} steps, final {_fmt_final(r)}"
    if r.get("steps"):
        tail = f"goal at step {r['steps']} ({r['examples']} examples, {r['time']:.2f} s training)"
        if r["kind"] == "noise" and r.get("b_simple_at_target") is not None:
            tail += f", B_simple {r['b_simple_at_target']:.4g}"
        return f"{head}: {tail}"
    return f"{head}: {r['status']} after {r.get('steps_run')} steps" + (f" ({r['error']})" if r.get("error") else "")


def _fmt_final(r: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in (r.get("final") or {}).items() if isinstance(v, (int, float)))


def print_summary(s: dict) -> None:
    print("batch  best_lr  steps  examples  time_s  regime")
    for row in s["per_batch"]:
        steps = row["steps"] if row["steps"] is not None else "not reached"
        time_s = f"{row['time']:.2f}" if row["time"] is not None else "-"
        print(f"{row['batch_size']:>5}  {row['lr'] or 0:<7.4g}  {steps!s:>5}  {row['examples'] or '-'!s:>8}  "
              f"{time_s:>6}  {row.get('regime') or ''}")
    fit = s.get("fit")
    if fit and not fit.get("b_crit"):
        print(fit["reason"])  # not identified: the reason, and no number
    elif fit:
        ci = fit.get("ci") or {}
        interval = f" (95% {ci['b_crit'][0]:.4g} to {ci['b_crit'][1]:.4g})" if "b_crit" in ci else ""
        print(f"critical batch B_crit = {fit['b_crit']:.4g}{interval}; S_min = {fit['s_min']:.4g} steps, "
              f"E_min = {fit['e_min']:.4g} examples")
    for line in s.get("notes", []):
        if not fit or line != fit.get("reason"):
            print(f"note: {line}")
    pred = s.get("prediction") or {}
    if pred.get("b_simple_at_target") is not None:
        print(f"one-run prediction: B_simple = {pred['b_simple_at_target']:.4g} at the goal, "
              f"{pred['b_simple_mean'] or float('nan'):.4g} averaged over training; "
              f"B_crit/B_simple = {pred.get('ratio_at_target') or float('nan'):.3g}")
    if s.get("wallclock_knee"):
        print(f"wall-clock time stops improving beyond B = {s['wallclock_knee']:g} on this machine")


def _write_json(path: Path, obj) -> None:
    import json

    from hasten.study.trials import clean
    from hasten.train.checkpoint import write_atomic

    write_atomic(path, (json.dumps(clean(obj), indent=1, default=str) + "\n").encode())
