"""Batch-size schedules on Fashion-MNIST: increase the batch instead of decaying the LR; adaptive vs fixed batches.

    python benchmarks/bench_increase_batch.py increase   # fixed batch + step LR decay vs increase_batch, same epochs
    python benchmarks/bench_increase_batch.py timing     # the same two runs, alternated --repeats times: min, median
    python benchmarks/bench_increase_batch.py adaptive   # adaptive batch vs fixed batches: steps/examples to targets
    python benchmarks/bench_increase_batch.py all

``increase``: Smith, Kindermans, Ying & Le 2017 ("Don't Decay the Learning Rate, Increase the Batch Size"). The
baseline trains at batch 128 and divides the LR by 5 at 30%, 60% and 80% of the examples (their CIFAR-10 schedule);
``increase_batch`` multiplies the batch by 5 at the same points instead (``--rule approx``: ε/B held, as in the
tables of BENCHMARKS.md; ``--rule exact``: the batch with the baseline's noise ε(N/B − 1), 635, 3,044, 12,653).
Both see the same examples in the same order of epochs, with no noise meter (noise=off) so the wall-clock compares
training alone; evaluation happens once, at the end; wall-clock is the training loop's, CPU time the process's
(less sensitive to other load on a shared machine). ``--lrs`` picks the baseline's LR on the first seed (best test
accuracy); both arms then use it.

``adaptive``: McCandlish et al. 2018. Every run evaluates each ``--eval-examples`` examples and stops after
``--epochs`` epochs; steps- and examples-to-target are read off the first evaluation at or above each target.
Fixed batches use a constant LR: 128 tries 0.05 and 0.1, bigger batches the linear and the square-root rule from
128's choice (the better on the first seed); adaptive runs start at 128 with its LR and follow B_simple
(hasten.schedules.adaptive, AdaScale LR).

Results print as Markdown and are stored as JSON at ``--out``, with the command, date, machine and code version.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hasten.errors import HastenError  # noqa: E402
from hasten.schedules import increase_batch, stages  # noqa: E402
from hasten.tasks import get_task  # noqa: E402
from hasten.train import Callback, fit  # noqa: E402
from hasten.train.batch_callback import BatchScheduleCallback  # noqa: E402
from hasten.train.config import task_config  # noqa: E402
from hasten.train.schedule import constant  # noqa: E402

TRAIN = 60_000
BASE, LR = 128, 0.05  # the task's tuned batch and LR (hasten/tasks/fashion.py)
MILESTONES, FACTOR = (0.3, 0.6, 0.8), 5.0  # Smith et al. 2017's CIFAR-10 schedule, as fractions of the run
WORK = Path(tempfile.gettempdir()) / "hasten-bench-batch"


def config(seed: int, model: str, **keys):
    overrides = [f"seed={seed}", f"model={model}", "progress=false", "eval_every=0", "checkpoint_every=0",
                 *(f"{k}={v}" for k, v in keys.items())]
    return task_config("fashion", overrides)


class Curve(Callback):
    """Evaluates every ``every`` examples (``evaluate_now``), records (step, examples, accuracy), stops at ``limit``."""

    def __init__(self, every: int, limit: int):
        self.every, self.limit, self.points = every, limit, []

    def on_batch_end(self, state) -> None:
        if state.examples // self.every > (state.examples - state.metrics["batch_size"]) // self.every:
            state.evaluate_now = True
        if state.examples >= self.limit:
            state.should_stop = True

    def on_evaluate(self, state) -> None:
        self.points.append((state.step, state.examples, state.metrics["eval/accuracy"], state.metrics.get("lr"),
                            state.metrics["batch_size"], state.metrics.get("noise/b_simple")))


def run_increase(seed: int, arm: str, lr: float, epochs: float, model: str, max_batch: int | None = None,
                 rule: str = "approx") -> dict:
    steps = round(epochs * TRAIN / BASE)  # the run's length in steps of 128 examples
    ms = [m * steps * BASE for m in MILESTONES]
    if arm == "fixed":  # batch 128 throughout, LR ÷5 at each milestone
        plan = stages([(u, BASE, FACTOR**-i) for i, u in enumerate([*ms, math.inf])])
    elif arm == "increase":  # approx: batch ×5 at each milestone, LR unchanged (128·5³ = 16,000 fits); exact: the
        plan = increase_batch(BASE, ms, FACTOR, dataset_size=TRAIN, rule=rule)  # batch with the same ε(N/B − 1)
    else:  # hybrid: the same up to max_batch, then the LR decays instead (Smith et al. 2017, hybrid)
        plan = increase_batch(BASE, ms, FACTOR, max_batch=max_batch, dataset_size=TRAIN, rule=rule)
    cfg = config(seed, model, steps=steps, batch_size=BASE, lr=lr, schedule="constant", noise="off")
    cpu = time.process_time()
    result = fit(get_task("fashion"), cfg, [BatchScheduleCallback(plan, constant())], run_dir=WORK / f"inc-{arm}",
                 resume=False)
    return {"arm": arm, "rule": rule, "seed": seed, "lr": lr, "max_batch": max_batch,
            "accuracy": result.metrics["eval/accuracy"], "loss": result.metrics["eval/loss"], "steps": result.steps,
            "examples": result.examples, "seconds": result.wall_time, "cpu_seconds": time.process_time() - cpu}


def run_curve(seed: int, arm: str, epochs: float, every: int, model: str, lr: float = LR, size: int = BASE,
              **keys) -> dict:
    steps = math.ceil(epochs * TRAIN / size)
    cfg = config(seed, model, steps=steps, batch_size=size, lr=lr, schedule="constant", noise="micro", **keys)
    curve = Curve(every, int(epochs * TRAIN))
    try:
        result = fit(get_task("fashion"), cfg, [curve], run_dir=WORK / f"ada-{arm}", resume=False)
    except HastenError as e:  # diverged (non-finite loss): keep the curve so far
        print(f"{arm} seed {seed} lr {lr}: {e}", flush=True)
        return {"arm": arm, "seed": seed, "lr": lr, "batch": size, "keys": keys, "points": curve.points,
                "steps": None, "examples": None, "seconds": None, "diverged": True}
    return {"arm": arm, "seed": seed, "lr": lr, "batch": size, "keys": keys, "points": curve.points,
            "steps": result.steps, "examples": result.examples, "seconds": result.wall_time}


def to_target(points, target: float):
    """(steps, examples) at the first evaluation with accuracy ≥ target, or None."""
    return next(((s, e) for s, e, acc, *_ in points if acc >= target), None)


def spread(values, digits: int = 0) -> str:
    """mean ± sample standard deviation (n)."""
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):,.{digits}f} ± {sd:,.{digits}f} (n={len(values)})"


def increase(args) -> dict:
    lrs = args.lrs
    run_increase(args.seeds[0], "fixed", LR, 0.05, args.model)  # warm-up (threads, allocator, data): not timed
    tuning = [run_increase(args.seeds[0], "fixed", lr, args.epochs, args.model) for lr in lrs] if len(lrs) > 1 else []
    lr = max(tuning, key=lambda r: r["accuracy"])["lr"] if tuning else lrs[0]
    runs = [r for r in tuning if r["lr"] == lr]
    arms = args.arms or ["fixed", "increase"]
    for seed in args.seeds:
        for arm in arms[::-1] if seed % 2 else arms:  # alternate: spread machine load
            if not any(r["seed"] == seed and r["arm"] == arm for r in runs):
                runs.append(run_increase(seed, arm, lr, args.epochs, args.model, args.max_batch, args.rule))
                print(json.dumps(runs[-1]), flush=True)
    print(f"\n### fashion {args.model}: fixed batch 128 + step LR decay vs increase_batch ({args.epochs} epochs, "
          f"lr {lr}; LR tuning on seed {args.seeds[0]}: "
          + ", ".join(f"{r['lr']}: {r['accuracy']:.4f}" for r in tuning) + ")\n")
    print("| schedule | test accuracy (%) | optimizer steps | wall-clock (s) | CPU time (s) |\n|---|---|---|---|---|")
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        print(f"| {arm} | {spread([100 * r['accuracy'] for r in rs], 2)} | {spread([r['steps'] for r in rs])} | "
              f"{spread([r['seconds'] for r in rs], 1)} | {spread([r['cpu_seconds'] for r in rs], 1)} |")
    return {"lr": lr, "tuning": tuning, "runs": runs}


def timing(args) -> dict:
    """Both arms of ``increase`` again at LR ``--lrs[0]``, alternating, ``--repeats`` times: min and median time
    (robust to other load on a shared machine)."""
    lr = args.lrs[0]
    run_increase(args.seeds[0], "fixed", lr, 0.05, args.model)  # warm-up
    runs = [run_increase(args.seeds[0], arm, lr, args.epochs, args.model, rule=args.rule)
            for i in range(args.repeats) for arm in (("fixed", "increase") if i % 2 == 0 else ("increase", "fixed"))]
    print(f"\n### fashion {args.model}: time of the {args.epochs}-epoch runs (seed {args.seeds[0]}, lr {lr}, "
          f"{args.repeats} alternating repeats)\n")
    print("| schedule | steps | wall-clock min / median (s) | CPU time min / median (s) |\n|---|---|---|---|")
    for arm in ("fixed", "increase"):
        rs = [r for r in runs if r["arm"] == arm]
        wall, cpu = [r["seconds"] for r in rs], [r["cpu_seconds"] for r in rs]
        print(f"| {arm} | {rs[0]['steps']} | {min(wall):.1f} / {statistics.median(wall):.1f} | "
              f"{min(cpu):.1f} / {statistics.median(cpu):.1f} |")
    return {"lr": lr, "runs": runs}


def adaptive(args) -> dict:
    every, runs = args.eval_examples, []
    fixed_lrs = {}
    for b in sorted(args.fixed):  # LRs chosen on the first seed (final accuracy): 128: 0.05 or 0.1; bigger
        base_lr = fixed_lrs.get(BASE, LR)  # batches: the linear or the square-root rule from 128's choice
        options = [LR, 2 * LR] if b == BASE else sorted({base_lr * b / BASE, base_lr * math.sqrt(b / BASE)})
        trials = [run_curve(args.seeds[0], f"fixed-{b}", args.epochs, every, args.model, lr, b) for lr in options]
        best = max(trials, key=lambda r: (r["points"][-1][2] if r["points"] and not r.get("diverged") else 0))
        fixed_lrs[b] = best["lr"]
        runs += trials
        print(json.dumps({k: best[k] for k in ("arm", "lr", "steps")}), flush=True)
    lr = fixed_lrs.get(BASE, LR)  # adaptive runs start at 128 with its LR
    variants = {f"adaptive-{rule}": dict(batch="adaptive", batch_rule=rule, batch_scale=args.scale,
                                         batch_max=args.max_batch) for rule in ("linear", "sqrt")}
    for seed in args.seeds:
        for b in args.fixed:
            if seed != args.seeds[0]:
                runs.append(run_curve(seed, f"fixed-{b}", args.epochs, every, args.model, fixed_lrs[b], b))
        for name, keys in variants.items():
            runs.append(run_curve(seed, name, args.epochs, every, args.model, lr, **keys))
            print(json.dumps({k: runs[-1][k] for k in ("arm", "seed", "steps", "examples")}), flush=True)
    chosen = [r for r in runs if not r["arm"].startswith("fixed-") or r["lr"] == fixed_lrs[int(r["arm"][6:])]]
    print(f"\n### fashion {args.model}: adaptive batch vs fixed batches (constant LR, {args.epochs} epochs max, "
          f"evaluated every {every} examples)\n")
    header = "".join(f" steps to {t:.0%} | examples to {t:.0%} |" for t in args.targets)
    print(f"| run | lr |{header} final accuracy (%) |\n|---|---|" + "---|---|" * len(args.targets) + "---|")
    for arm in [f"fixed-{b}" for b in args.fixed] + list(variants):
        rs = [r for r in chosen if r["arm"] == arm]
        cells = []
        for t in args.targets:
            hits = [to_target(r["points"], t) for r in rs]
            reached = f"{sum(h is not None for h in hits)}/{len(hits)} reached; " if None in hits else ""
            cells += [reached + spread([h and h[0] for h in hits]), spread([h and h[1] for h in hits])]
        lr = f"{rs[0]['lr']:.3g}" + ("" if arm.startswith("fixed") else "·AdaScale")
        final = spread([100 * r["points"][-1][2] for r in rs if r["points"]], 2)
        print(f"| {arm} | {lr} | " + " | ".join(cells) + f" | {final} |")
    return {"fixed_lrs": fixed_lrs, "runs": runs}


def environment(argv) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"command": "python " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "commit": commit,
            "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["increase", "timing", "adaptive", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=4.0)
    parser.add_argument("--model", default="mlp", choices=["mlp", "cnn"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.025, 0.05, 0.1])
    parser.add_argument("--fixed", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.85, 0.87])
    parser.add_argument("--eval-examples", type=int, default=7_680)
    parser.add_argument("--scale", type=float, default=1.0, help="adaptive: c in B = c·B_simple or c·√(128·B_simple)")
    parser.add_argument("--max-batch", type=int, default=8192, help="adaptive: largest batch; increase: the hybrid arm's cap")
    parser.add_argument("--arms", nargs="+", choices=["fixed", "increase", "hybrid"], default=None,
                        help="increase: the arms to run (default fixed increase)")
    parser.add_argument("--rule", default="approx", choices=["approx", "exact"],
                        help="increase, timing: increase_batch's rule (approx = ε/B, as in the recorded tables; "
                             "exact = the same ε(N/B − 1)/(1 − m) as the LR-decay run)")
    parser.add_argument("--repeats", type=int, default=3, help="timing: runs of each arm")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = leave as is)")
    parser.add_argument("--out", type=Path, default=Path("bench_increase_batch.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    out = {"environment": environment(sys.argv), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.section in ("increase", "all"):
        out["increase"] = increase(args)
    if args.section in ("timing", "all"):
        out["timing"] = timing(args)
    if args.section in ("adaptive", "all"):
        out["adaptive"] = adaptive(args)
    out["environment"]["load_average_end"] = os.getloadavg()
    out["environment"]["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
