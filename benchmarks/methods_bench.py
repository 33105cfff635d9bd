"""Speedup methods, measured: time to a target accuracy against the baseline, one-run tradeoff curves, and the
masked-LM masking-rate schedule against a fixed 15%.

    python benchmarks/methods_bench.py methods --task fashion --model cnn --steps 500 --seeds 0,1
    python benchmarks/methods_bench.py tradeoff --task fashion --model cnn --steps 1500 --cycles 4
    python benchmarks/methods_bench.py mlm --steps 2000 --eval-every 500 --seeds 0,1,2
    python benchmarks/methods_bench.py summarize --inputs a.jsonl b.jsonl   # one table over runs recorded apart

Practice of Bartoldson, Kailkhura & Blalock (2023): every arm gets the same step budget and seeds; the training
clock starts after the first step and stops during evaluation (hasten.methods.tradeoff.EvalPoints), and both
wall-clock and process CPU seconds are kept (CPU time is less sensitive to other work on a shared machine);
time-to-target is read at the evaluation points; n and spread are reported; a method that is not faster than the
baseline by more than the spread is reported as not helping. Each run uses one thread and no noise meter.
Results are appended as JSON lines to --out (with the command, date, environment and code version) and
summarized as Markdown on stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hasten.errors import HastenError  # noqa: E402
from hasten.methods import METHODS, build_methods  # noqa: E402
from hasten.methods.tradeoff import EvalPoints, time_to_target  # noqa: E402
from hasten.methods.tradeoff_run import environment, run_tradeoff  # noqa: E402
from hasten.tasks import get_task  # noqa: E402
from hasten.train import fit  # noqa: E402
from hasten.train.config import task_config  # noqa: E402

EXTRA = {"fashion": ["sortagrad:difficulty=loss"]}  # variants worth measuring besides the defaults


def run_arm(task_name: str, keys: list[str], methods: str, seed: int, steps: int, eval_every: int) -> dict:
    """One training run; its points (steps, seconds, cpu_seconds, eval metrics) at every ``eval_every`` steps."""
    task = get_task(task_name)
    cfg = task_config(task_name, [*keys, f"steps={steps}", f"seed={seed}", f"methods={methods}", "noise=off",
                                  "threads=1", "eval_every=0", "checkpoint_every=0", "progress=false"])
    points = EvalPoints(range(eval_every, steps + 1, eval_every))
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        fit(task, cfg, [points], run_dir=tmp)
        elapsed = time.perf_counter() - started
    return {"methods": methods or "baseline", "seed": seed, "points": points.points, "elapsed": elapsed,
            "metric": f"eval/{task.metric_name}"}


def applicable(task_name: str, model: str) -> list[str]:
    task = get_task(task_name)
    net = task.make_model(model or None)
    names = [n for n, info in METHODS.items() if info.cls().applies_to(task, net) is None]
    return names + [m for m in EXTRA.get(task_name, []) if _builds(m, task, net)]


def _builds(spec: str, task, net) -> bool:
    try:
        build_methods(spec, task, net)
        return True
    except HastenError:
        return False


def summarize(runs: list[dict], target_drop: float) -> tuple[list[dict], float]:
    """Per arm: mean ± sd over seeds of the final metric and of the time to the target (the baseline's worst
    final metric over seeds minus ``target_drop``, so the baseline reaches it in every seed); the verdict compares
    CPU time-to-target with the baseline's."""
    metric = runs[0]["metric"]
    arms: dict[str, list[dict]] = {}
    for r in runs:
        arms.setdefault(r["methods"], []).append(r)
    target = min(r["points"][-1][metric] for r in arms["baseline"]) - target_drop
    rows = []
    for name, group in arms.items():
        finals = [r["points"][-1][metric] for r in group]
        ttt = [time_to_target([(p["cpu_seconds"], p[metric]) for p in r["points"]], target) for r in group]
        wall = [time_to_target([(p["seconds"], p[metric]) for p in r["points"]], target) for r in group]
        per_step = [r["points"][-1]["cpu_seconds"] / max(r["points"][-1]["steps"] - 1, 1) for r in group]
        rows.append({"arm": name, "n": len(group), "final": _ms(finals), "cpu_ttt": _ms(ttt), "wall_ttt": _ms(wall),
                     "cpu_s_per_step": _ms(per_step), "reached": sum(math.isfinite(t) for t in ttt),
                     "_ttt": ttt, "_final": finals})
    base = next(r for r in rows if r["arm"] == "baseline")
    for row in rows:
        row["verdict"] = verdict(row, base)
    return rows, target


def verdict(row: dict, base: dict) -> str:
    if row["arm"] == "baseline":
        return "reference"
    if row["reached"] < row["n"]:
        return f"not helping: reached the target in {row['reached']}/{row['n']} seeds"
    mean, sd = _mean_sd(row["_ttt"])
    b_mean, b_sd = _mean_sd(base["_ttt"])
    if not math.isfinite(b_mean):
        return "baseline did not reach the target in every seed: no time comparison"
    if mean < b_mean - (sd + b_sd):
        return f"helps: {b_mean / mean:.2f}× faster to target (CPU)"
    if mean > b_mean + (sd + b_sd):
        return f"not helping: {mean / b_mean:.2f}× slower to target (CPU)"
    return "not helping: within the spread of the baseline"


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    if not all(math.isfinite(x) for x in xs):
        return math.inf, 0.0
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def _ms(xs: list[float]) -> str:
    mean, sd = _mean_sd(xs)
    return "never" if not math.isfinite(mean) else f"{mean:.4g} ± {sd:.2g}"


def markdown(rows: list[dict], target: float, metric: str) -> str:
    lines = [f"target {metric} = {target:.4f}", "",
             "| arm | n | final | CPU s to target | wall s to target | CPU s/step | verdict |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['n']} | {r['final']} | {r['cpu_ttt']} | {r['wall_ttt']} | "
                     f"{r['cpu_s_per_step']} | {r['verdict']} |")
    return "\n".join(lines)


def mlm_table(runs: list[dict]) -> str:
    """Per arm and evaluation point: mean ± sd over seeds of the masked loss and accuracy, and the paired
    (same-seed) differences from the fixed-15% reference."""
    lines = ["| arm | steps | n | masked loss | masked accuracy | paired Δ accuracy | paired Δ loss |",
             "|---|---|---|---|---|---|---|"]
    base = {r["seed"]: r for r in runs if r["methods"] == "baseline"}
    for arm in dict.fromkeys(r["methods"] for r in runs):
        group = [r for r in runs if r["methods"] == arm]
        for i, point in enumerate(group[0]["points"]):
            loss = [r["points"][i]["eval/loss"] for r in group]
            acc = [r["points"][i]["eval/masked accuracy"] for r in group]
            pairs = [(r["points"][i]["eval/masked accuracy"] - base[r["seed"]]["points"][i]["eval/masked accuracy"],
                      r["points"][i]["eval/loss"] - base[r["seed"]]["points"][i]["eval/loss"])
                     for r in group if arm != "baseline" and r["seed"] in base]
            lines.append(f"| {arm} | {point['steps']} | {len(group)} | {_ms(loss)} | {_ms(acc)} | "
                         + (" / ".join(f"{a:+.4f}" for a, _ in pairs) or "-") + " | "
                         + (" / ".join(f"{b:+.4f}" for _, b in pairs) or "-") + " |")
    return "\n".join(lines)


def record(out: Path, kind: str, payload: dict) -> None:
    row = {"kind": kind, "command": shlex.join([sys.executable, *sys.argv]),
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "environment": environment(), **payload}
    with open(out, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["methods", "tradeoff", "mlm", "summarize"])
    parser.add_argument("--inputs", nargs="*", default=[], help="summarize: JSON-lines files written by --out")
    parser.add_argument("--task", default="fashion")
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default="", help="arms separated by ; (each a methods= value, e.g. \"mixup;sam,ema\"); default: every method that applies")
    parser.add_argument("--target-drop", type=float, default=0.003, help="target = worst baseline final - this")
    parser.add_argument("--cycles", type=int, default=4)
    parser.add_argument("--keys", default="", help="extra key=value training keys, space separated")
    parser.add_argument("--out", default="methods_bench.jsonl")
    args = parser.parse_args(argv)
    if args.kind == "summarize":  # e.g. a seed added later to a benchmark recorded earlier
        runs = [json.loads(line)["run"] for path in args.inputs for line in open(path) if line.strip()]
        runs = [r for r in runs if r.get("points")]
        rows, target = summarize(runs, args.target_drop)
        print(markdown(rows, target, runs[0]["metric"]))
        if runs[0]["metric"] == "eval/masked accuracy":
            print("\n" + mlm_table(runs))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    keys = ([f"model={args.model}"] if args.model and args.kind != "mlm" else []) + args.keys.split()
    out = Path(args.out)

    if args.kind == "tradeoff":
        run_dir = out.parent / f"tradeoff-{args.task}"  # kept: report.html and the runs
        result = run_tradeoff(args.task, [*keys, f"steps={args.steps}", f"cycles={args.cycles}", "noise=off",
                                          "threads=1", "progress=false", "clock=cpu", f"run_dir={run_dir}",
                                          *([f"methods={args.methods}"] if args.methods else [])])
        record(out, "tradeoff", {"result": result})
        return

    task = "shakespeare-mlm" if args.kind == "mlm" else args.task
    if args.kind == "mlm":
        arms = ["mask_schedule:schedule=constant", "mask_schedule"]
    else:
        arms = [""] + (args.methods.split(";") if args.methods else applicable(task, args.model))
    runs = []
    run_arm(task, [*keys, "warmup=0"], "", seeds[0], 20, 20)  # warm-up, discarded: a process's first run is slower
    for seed in seeds:  # seed-major: an interrupted benchmark still has whole seeds
        for arm in list(arms):
            try:
                run = run_arm(task, keys, arm, seed, args.steps, args.eval_every)
            except HastenError as e:  # a refusal that needs the data (e.g. sortagrad on fixed-length windows)
                print(f"{arm}: refused: {e}", flush=True)
                arms.remove(arm)
                continue
            if args.kind == "mlm" and arm.endswith("constant"):
                run["methods"] = "baseline"  # fixed 15% is the reference
            runs.append(run)
            record(out, args.kind, {"task": task, "steps": args.steps, "run": run})
            last = run["points"][-1]
            print(f"seed {seed} {arm or 'baseline'}: {last[run['metric']]:.4f} at {last['steps']} steps, "
                  f"{last['cpu_seconds']:.1f} CPU s", flush=True)
    rows, target = summarize(runs, args.target_drop)
    print(markdown(rows, target, runs[0]["metric"]))
    if args.kind == "mlm":
        print("\n" + mlm_table(runs))


if __name__ == "__main__":
    main()
