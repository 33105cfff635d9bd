"""Benchmark: a whole batch-size study, timed end to end, with the measured B_crit beside the one-run B_simple.

    python benchmarks/bench_study.py digits target=loss:0.1 --out bench_study_digits.json
    python benchmarks/bench_study.py fashion target=loss:0.35 smith_le_epochs=0 --out bench_study_fashion.json

Any `hasten study batch-size` key may follow the task. The JSON holds the exact command, the date, the machine,
the load average before and after (other work on the machine slows every trial: report it with the timing), the
elapsed seconds, steps to result per batch size, the fit, B_simple and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone

from hasten.study import run_study


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task")
    parser.add_argument("keys", nargs="*", help="key=value study and training keys")
    parser.add_argument("--out", default="", help="write the result JSON here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    started = time.perf_counter()
    summary = run_study(args.task, args.keys)
    elapsed = time.perf_counter() - started
    fit, pred = summary.get("fit") or {}, summary.get("prediction") or {}
    result = {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "study_command": f"hasten study batch-size {args.task} {' '.join(args.keys)}",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": round(elapsed, 1),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "environment": summary["environment"],
        "goals": summary["goals"],
        "trials": {k: v for k, v in summary["options"].items() if k in ("lr_rule", "lr_factors", "seeds", "workers")},
        "per_batch": [{k: r.get(k) for k in ("batch_size", "lr", "steps", "examples", "time", "reached", "regime")}
                      for r in summary["per_batch"]],
        "b_crit": fit.get("b_crit"), "b_crit_ci": (fit.get("ci") or {}).get("b_crit"),
        "b_crit_not_identified": fit.get("reason") or None,
        "s_min": fit.get("s_min"), "e_min": fit.get("e_min"), "fit_residual_rms": fit.get("residual_rms"),
        "b_simple_at_target": pred.get("b_simple_at_target"), "b_simple_mean": pred.get("b_simple_mean"),
        "b_crit_over_b_simple": pred.get("ratio_at_target"), "b_crit_over_b_simple_mean": pred.get("ratio_mean"),
        "adaptive_gain": pred.get("adaptive_gain"), "wallclock_knee": summary.get("wallclock_knee"),
        "smith_le": {k: v for k, v in (summary.get("smith_le") or {}).items() if k != "curves"} or None,
        "b_opt": [(c["lr"], c["b_opt"]) for c in (summary.get("smith_le") or {}).get("curves", [])],
        "notes": summary["notes"], "study_dir": summary["study_dir"],
    }
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


if __name__ == "__main__":
    main()
