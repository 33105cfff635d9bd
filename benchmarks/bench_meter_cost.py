"""What hasten's training loop with its default noise meter costs against a plain PyTorch loop (issue 11).

    python benchmarks/bench_meter_cost.py              # fashion MLP, fashion CNN, shakespeare transformer
    python benchmarks/bench_meter_cost.py --quick      # a few steps of each: checks that the script runs
    python benchmarks/bench_meter_cost.py --only fashion-mlp --variants default off

The baseline is a training loop written in plain PyTorch, without hasten: the same model (built by the task, then
trained by its own copy), the same training tensors, the same optimizer and hyper-parameters (SGD or AdamW, as the
task's defaults say; gradient clipping when they clip), one forward, one backward and one optimizer step per batch
of ``batch_size`` uniformly drawn examples, and nothing else. hasten runs ``fit`` with the task's default settings
except ``eval_every=0, checkpoint_every=0`` (the end-of-run evaluation and checkpoint are not timed either) and
``warmup=0`` (an LR warmup changes no step's cost, and a short run could not hold the task's), and:

- ``default``: noise=auto, noise_budget=0.03 (hasten's defaults),
- ``every``: noise=auto, noise_budget=0 (the meter on every step: its raw cost),
- ``off``: noise=off (the loop without a meter: hasten's own overhead),
- ``micro`` (only when asked for): noise=micro, noise_budget=0 (the split source on every step, beside ``every``).

The two are timed side by side, interleaved in one process: hasten's ``fit`` runs, and before every ``--segment``
hasten steps a callback (the first one) runs ``--segment`` steps of the plain loop, timed between two device
synchronizations. A hasten step is timed from one ``batch_start`` to the next (everything it does, logging
included); the last step of a segment ends at the synchronization that precedes the next plain segment (the run's last step
at its ``batch_end``). The
ratio of the total times (hasten ÷ plain) over the timed segments is what a run pays; the spread of the per-segment
ratios shows the noise. The first ``--warmup`` segments are not timed. Raw JSON lines go to
``benchmarks/results/meter_cost.jsonl`` (``--quick``: ``meter_cost_quick.jsonl``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hasten.tasks import get_task  # noqa: E402
from hasten.train import Callback, fit  # noqa: E402
from hasten.train.config import task_config  # noqa: E402

MODELS = {"fashion-mlp": ("fashion", "mlp"), "fashion-cnn": ("fashion", "cnn"),
          "shakespeare": ("shakespeare", "transformer")}
VARIANTS = {"default": [], "every": ["noise_budget=0"], "off": ["noise=off"],
            "micro": ["noise=micro", "noise_budget=0"]}  # micro: the split source on every step, to compare


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PlainLoop:
    """A training loop in plain PyTorch: its own copy of the model, the same optimizer and data."""

    def __init__(self, task, cfg, device: torch.device, seed: int = 1):
        train, _ = task.load(None)
        self.x, self.y = train.tensors[:2]  # on the host, as hasten keeps a TensorDataset: batches are copied over
        self.device = device
        torch.manual_seed(seed)
        self.model = task.make_model(cfg.model or None).to(device).train()
        params = self.model.parameters()
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            self.opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
        self.loss, self.clip, self.batch = task.loss, cfg.grad_clip, cfg.batch_size
        self.g = torch.Generator(device="cpu").manual_seed(seed)

    def steps(self, n: int) -> None:
        for _ in range(n):
            idx = torch.randint(len(self.x), (self.batch,), generator=self.g)
            x, y = (t[idx].to(self.device, non_blocking=True) for t in (self.x, self.y))
            loss = self.loss(self.model(x), y)
            loss.backward()
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


class Interleave(Callback):
    """Before every ``segment`` hasten steps, ``segment`` plain steps; records both segments' wall times."""

    def __init__(self, plain: PlainLoop, segment: int, warmup: int, device: torch.device):
        self.plain, self.segment, self.warmup, self.device = plain, segment, warmup, device
        self.pairs: list[tuple[float, float]] = []  # (plain seconds, hasten seconds) per timed segment
        self._hasten, self._start, self._count = 0.0, None, 0

    def _close_step(self) -> None:
        if self._start is not None:
            self._hasten += time.perf_counter() - self._start

    def on_batch_start(self, state) -> None:
        if state.step % self.segment == 0:  # a segment of hasten steps ends (or the first begins): plain steps now
            sync(self.device)
            self._close_step()
            self._record()
            t0 = time.perf_counter()
            self.plain.steps(self.segment)
            sync(self.device)
            self._plain = time.perf_counter() - t0
        else:
            self._close_step()
        self._start = time.perf_counter()

    def on_batch_end(self, state) -> None:
        if state.step == state.cfg.steps:  # the last step ends here: the final evaluation and checkpoint are not timed
            sync(self.device)
            self._close_step()
            self._record()
            self._start = None

    def _record(self) -> None:
        if self._start is not None:  # a hasten segment just ended: pair it with the plain one before it
            self._count += 1
            if self._count > self.warmup:
                self.pairs.append((self._plain, self._hasten))
        self._hasten = 0.0


def environment(device: torch.device) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "git": commit.stdout.strip() + ("+dirty" if
            dirty else ""), "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "threads": torch.get_num_threads(), "load_average": os.getloadavg()[0]}


def run(name: str, variant: str, segment: int, segments: int, warmup: int, device: torch.device) -> dict:
    task_name, model = MODELS[name]
    task = get_task(task_name)
    overrides = [f"model={model}", "eval_every=0", "checkpoint_every=0", "progress=false", f"device={device}",
                 f"steps={segment * (segments + warmup)}", "warmup=0", *VARIANTS[variant]]
    cfg = task_config(task_name, overrides)
    timer = Interleave(PlainLoop(task, cfg, device), segment, warmup, device)
    with TemporaryDirectory() as run_dir:
        result = fit(task, cfg, [timer], run_dir=run_dir)
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    plain, hasten = (sum(p[i] for p in timer.pairs) for i in (0, 1))
    ratios = [h / p for p, h in timer.pairs]
    steps = segment * len(timer.pairs)
    measured = [r for r in rows if r.get("noise/measured")]
    return {"model": name, "variant": variant, "overrides": overrides, "batch_size": cfg.batch_size,
            "noise_source": result.noise_source, "plain_step_ms": 1e3 * plain / steps,
            "hasten_step_ms": 1e3 * hasten / steps, "ratio": hasten / plain,
            "segment_ratio_median": statistics.median(ratios), "segment_ratio_min": min(ratios),
            "segment_ratio_max": max(ratios), "segments": len(timer.pairs), "segment_steps": segment,
            "measured_steps": len(measured), "steps": len(rows),
            "noise_every_last": rows[-1].get("noise/every"), "noise_cost_last": rows[-1].get("noise/cost"),
            **environment(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=["default", "every", "off"])
    p.add_argument("--segment", type=int, default=50, help="steps per segment of each loop")
    p.add_argument("--segments", type=int, default=40, help="timed segments per loop")
    p.add_argument("--warmup", type=int, default=2, help="untimed segments first")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (0 = leave as is)")
    p.add_argument("--device", default="", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--quick", action="store_true", help="a few short segments: checks that the script runs")
    a = p.parse_args()
    if a.quick:
        a.segment, a.segments, a.warmup = 5, 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = ROOT / "benchmarks" / "results" / ("meter_cost_quick.jsonl" if a.quick else "meter_cost.jsonl")
    for name in a.only:
        if not get_task(MODELS[name][0]).available():
            print(json.dumps({"model": name, "skipped": "task data not available"}))
            continue
        for variant in a.variants:
            row = {**run(name, variant, a.segment, a.segments, a.warmup, device), "quick": a.quick}
            print(json.dumps(row))
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
