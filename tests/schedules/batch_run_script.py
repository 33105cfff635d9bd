"""An adaptive-batch run for the SIGKILL resume test, runnable as a script.

``python batch_run_script.py RUN_DIR [--slow]`` trains the tiny task with ``batch=adaptive`` (the batch changes in
the first steps) and writes RUN_DIR/result.json.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent / "train")]  # the repository root; the tiny task

from train_tiny_task import Sleep, tiny_config, tiny_task  # noqa: E402

# Dropout (global RNG), momentum, micro-batches for the meter, a running-mean noise scale that the batch follows.
CONFIG = dict(steps=60, batch_size=8, micro_batch_size=4, checkpoint_every=3, eval_every=10, noise="micro",
              noise_horizon=200.0, schedule="cosine", batch="adaptive", batch_max=48, batch_scale=2.0)


def main(run_dir: str, slow: bool) -> None:
    from hasten.train import fit
    from hasten.train.logger import read_jsonl

    result = fit(tiny_task(dropout=0.2), tiny_config(**CONFIG), [Sleep(0.03)] if slow else [], run_dir=run_dir)
    rows = read_jsonl(Path(run_dir) / "metrics.jsonl")
    out = {"metrics": result.metrics, "loss": result.loss, "steps": result.steps, "examples": result.examples,
           "noise": result.noise.as_dict(), "batches": [r["batch_size"] for r in rows], "lrs": [r["lr"] for r in rows]}
    (Path(run_dir) / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], "--slow" in sys.argv[2:])
