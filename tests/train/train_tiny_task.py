"""A tiny synthetic task for the training-loop tests, also runnable as a script (the SIGKILL resume test).

``python train_tiny_task.py RUN_DIR [--slow]`` trains with the config below and writes RUN_DIR/result.json.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script

from hasten.tasks.base import Task  # noqa: E402
from hasten.train import Callback, TrainConfig  # noqa: E402
from hasten.train.logger import read_jsonl  # noqa: E402


def make_data(n_train: int = 96, n_test: int = 40, dim: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(1234)
    w = torch.randn(dim, classes, generator=g)
    x = torch.randn(n_train + n_test, dim, generator=g)
    y = (x @ w + 0.5 * torch.randn(n_train + n_test, classes, generator=g)).argmax(1)
    return TensorDataset(x[:n_train], y[:n_train]), TensorDataset(x[n_train:], y[n_train:])


def tiny_task(dropout: float = 0.0, loss=None, n_train: int = 96) -> Task:
    data = make_data(n_train)

    def model() -> nn.Module:
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3))

    return Task(
        name="tiny",
        description="synthetic 6-feature, 3-class linear-ish classification",
        load=lambda path: data,
        models={"mlp": model},
        loss=loss or F.cross_entropy,
        metric=lambda out, y: (out.argmax(1) == y).float(),
    )


def tiny_config(**overrides) -> TrainConfig:
    base = dict(task="tiny", steps=12, batch_size=16, lr=0.1, eval_every=4, checkpoint_every=4, noise="micro",
                noise_budget=0.0, progress=False, threads=1, device="cpu")  # budget 0: measured steps fixed
    return TrainConfig(**{**base, **overrides})


# The SIGKILL test's run: dropout (global RNG), momentum, truncated batches (96 = 5·20 − 4), noise=micro.
SCRIPT_CONFIG = dict(steps=80, batch_size=20, micro_batch_size=5, checkpoint_every=5, eval_every=10, noise="micro",
                     noise_horizon=-1.0, schedule="cosine", warmup=5)


class Crash(Callback):
    """Stops a run at the end of step ``at`` as Ctrl-C would."""

    def __init__(self, at):
        self.at = at

    def on_batch_end(self, state):
        if state.step == self.at:
            raise KeyboardInterrupt


def untimed_rows(run_dir):
    """A run's metrics rows without wall-clock time (equal between a resumed and an uninterrupted run)."""
    return [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(run_dir / "metrics.jsonl")]


class Sleep(Callback):
    """Slows each step down, so a test can kill the process between two checkpoints."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_batch_end(self, state) -> None:
        time.sleep(self.seconds)


def main(run_dir: str, slow: bool) -> None:
    from hasten.train import fit

    result = fit(tiny_task(dropout=0.2), tiny_config(**SCRIPT_CONFIG), [Sleep(0.02)] if slow else [], run_dir=run_dir)
    noise = None if result.noise is None else result.noise.as_dict()
    out = {"metrics": result.metrics, "loss": result.loss, "steps": result.steps, "examples": result.examples,
           "noise": noise}
    (Path(run_dir) / "result.json").write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], "--slow" in sys.argv[2:])
