"""The Lightning adapters on Fashion-MNIST: the monitor's cost per step, and increase_batch vs an LR decay.

    python benchmarks/bench_lightning.py overhead         # step time with the monitor ÷ without (target ≤ 1.05)
    python benchmarks/bench_lightning.py overhead --source per_example --accumulate 1 --batch 256
    python benchmarks/bench_lightning.py increase         # LR decay vs BatchSizeSchedule(increase_batch), 3 seeds
    python benchmarks/bench_lightning.py all --quick      # a tiny run of both, to check the script (not a result)

``overhead``: plain Lightning on the fashion MLP, dataloader batch ``--batch`` × ``--accumulate`` micro-batches.
One model, trained by a series of short fits that alternate between the monitor attached and not (ABBA order, so
neither always runs first); each fit's first ``--warmup`` steps are dropped and every other step is timed on its own,
from the first micro-batch's ``on_train_batch_start`` to the last one's ``on_train_batch_end`` (wall and process-CPU
time). We report the ratio of the mean step times (what a run pays), of the medians (robust to scheduling spikes),
and the min-max of the mean ratio over the ``--repeats`` pairs of fits. One thread.

``increase``: Smith, Kindermans, Ying & Le 2017. Both arms start at batch 128 (dataloader batch 128), SGD with
momentum 0.9 at ``--lr``, for ``--epochs`` epochs. ``decay`` divides the LR by 5 at 30%, 60% and 80% of the run
(torch's MultiStepLR, stepped per optimizer step); ``increase`` keeps the LR and multiplies the batch instead, by
``BatchSizeSchedule(increase_batch(..., rule=--rule))`` (``exact``: the batch with the decay run's SGD noise
ε(N/B − 1)/(1 − m); ``approx``: ×5, ε/B held). Test accuracy once, at the end; optimizer steps, examples and
wall-clock of the fit. The claim checked: equal accuracy with ≥ 2× fewer optimizer steps.

Raw results are stored as JSON in benchmarks/results/ (``--out``) with the command, date, machine, versions and
code version; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402

from hasten.integrations.lightning import BatchSizeSchedule, NoiseScaleMonitor  # noqa: E402
from hasten.schedules import increase_batch  # noqa: E402
from hasten.tasks import get_task  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MILESTONES, FACTOR = (0.3, 0.6, 0.8), 5.0  # Smith et al. 2017's CIFAR-10 schedule, as fractions of the run
TASK = get_task("fashion")


class Classifier(pl.LightningModule):
    def __init__(self, net: torch.nn.Module, lr: float, decay_steps: list[int] | None = None):
        super().__init__()
        self.net, self.lr, self.decay_steps = net, lr, decay_steps

    def training_step(self, batch, batch_idx):
        x, y = batch
        return TASK.loss(self.net(x), y)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        if not self.decay_steps:
            return optimizer
        decay = torch.optim.lr_scheduler.MultiStepLR(optimizer, self.decay_steps, gamma=1 / FACTOR)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": decay, "interval": "step"}}


def loader(data: TensorDataset, batch: int, seed: int) -> DataLoader:
    """Whole batches indexed at once (no per-example collation), reshuffled each epoch."""
    sampler = BatchSampler(RandomSampler(data, generator=torch.Generator().manual_seed(seed)), batch, drop_last=True)
    return DataLoader(data, batch_size=None, sampler=sampler)


def trainer(callbacks, **keys) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks, **keys)


class StepTimer(pl.Callback):
    """(wall, CPU) seconds of each optimizer step: first micro-batch's start to the last one's end."""

    def __init__(self):
        self.steps, self._start = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and self._start is not None:
            self.steps.append((time.perf_counter() - self._start[0], time.process_time() - self._start[1]))
            self._start = None


def overhead(args, train: TensorDataset) -> dict:
    torch.manual_seed(0)
    module = Classifier(TASK.make_model("mlp"), lr=0.05)
    monitor = NoiseScaleMonitor(source=args.source, every=args.every, small=args.small)
    times, ratios = {False: [], True: []}, []
    for repeat in range(args.repeats):
        pair = {}
        for with_monitor in (False, True) if repeat % 2 == 0 else (True, False):
            timer = StepTimer()
            callbacks = [timer, monitor] if with_monitor else [timer]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer(callbacks, max_steps=args.warmup + args.steps, accumulate_grad_batches=args.accumulate) \
                    .fit(module, loader(train, args.batch, seed=repeat))
            pair[with_monitor] = timer.steps[args.warmup:]
            times[with_monitor] += pair[with_monitor]
        ratios.append(statistics.fmean(t[0] for t in pair[True]) / statistics.fmean(t[0] for t in pair[False]))
    out = {"source": monitor.source_used, "b_simple": monitor.estimate.b_simple, "steps_per_arm": len(times[True]),
           "wall_ratio_mean_min_max": [min(ratios), max(ratios)]}
    for i, clock in enumerate(("wall", "cpu")):
        a, b = [t[i] for t in times[True]], [t[i] for t in times[False]]
        out.update({f"{clock}_step_ms_without": 1e3 * statistics.median(b),
                    f"{clock}_step_ms_with": 1e3 * statistics.median(a),
                    f"{clock}_ratio_median": statistics.median(a) / statistics.median(b),
                    f"{clock}_ratio_mean": statistics.fmean(a) / statistics.fmean(b)})
    print(f"\n### Lightning step time with NoiseScaleMonitor ÷ without (fashion MLP, batch {args.batch} × "
          f"{args.accumulate}, source {out['source']}, every {args.every}, small {args.small}; "
          f"{out['steps_per_arm']} steps per arm)\n")
    print("| clock | median step without (ms) | with (ms) | ratio of medians | ratio of means | mean ratio min-max |")
    print("|---|---|---|---|---|---|")
    for clock in ("wall", "cpu"):
        spread = " - ".join(f"{r:.3f}" for r in out["wall_ratio_mean_min_max"]) if clock == "wall" else ""
        print(f"| {clock} | {out[f'{clock}_step_ms_without']:.2f} | {out[f'{clock}_step_ms_with']:.2f} | "
              f"{out[f'{clock}_ratio_median']:.3f} | {out[f'{clock}_ratio_mean']:.3f} | {spread} |")
    return out


def accuracy(net: torch.nn.Module, test: TensorDataset) -> float:
    net.eval()
    with torch.no_grad():
        x, y = test.tensors
        return float(torch.cat([TASK.metric(net(xb), yb) for xb, yb in zip(x.split(2000), y.split(2000))]).mean())


def run_arm(arm: str, seed: int, args, train: TensorDataset, test: TensorDataset) -> dict:
    torch.manual_seed(seed)
    batches = len(train) // args.base  # per epoch (drop_last)
    total_steps = int(args.epochs * batches)
    if arm == "decay":
        module = Classifier(TASK.make_model("mlp"), args.lr, [round(m * total_steps) for m in MILESTONES])
        callbacks = []
    else:
        total = total_steps * args.base  # examples, the same as the decay run's
        plan = increase_batch(args.base, milestones=[m * total for m in MILESTONES], factor=FACTOR,
                              max_batch=args.max_batch, multiple=args.base, dataset_size=len(train), rule=args.rule)
        module, callbacks = Classifier(TASK.make_model("mlp"), args.lr), [BatchSizeSchedule(plan)]
    counter = ExampleLimit(total_steps * args.base)
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = trainer([*callbacks, counter], max_epochs=-1)
        fitted.fit(module, loader(train, args.base, seed))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    history = callbacks[0].history if callbacks else []
    return {"arm": arm, "seed": seed, "lr": args.lr, "steps": fitted.global_step, "examples": counter.examples,
            "accuracy": accuracy(module.net, test), "seconds": seconds, "cpu_seconds": cpu, "batches": history}


class ExampleLimit(pl.Callback):
    """Stops the fit after ``limit`` examples (both arms see the same number, in epochs of the same order)."""

    def __init__(self, limit: int):
        self.limit, self.examples = limit, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.examples += len(batch[0])
        if self.examples >= self.limit and (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            trainer.should_stop = True


def spread(values, digits: int = 0) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):,.{digits}f} ± {sd:,.{digits}f} (n={len(values)})"


def increase(args, train: TensorDataset, test: TensorDataset) -> dict:
    runs = []
    for seed in args.seeds:
        for arm in ("decay", "increase") if seed % 2 == 0 else ("increase", "decay"):  # alternate: spread load
            runs.append(run_arm(arm, seed, args, train, test))
            print(json.dumps({k: runs[-1][k] for k in ("arm", "seed", "steps", "accuracy", "seconds")}), flush=True)
    print(f"\n### Lightning, fashion MLP: LR decay vs BatchSizeSchedule(increase_batch, rule {args.rule}) "
          f"({args.epochs} epochs from batch {args.base}, lr {args.lr})\n")
    print("| arm | test accuracy (%) | optimizer steps | wall-clock (s) | CPU time (s) |\n|---|---|---|---|---|")
    for arm in ("decay", "increase"):
        rs = [r for r in runs if r["arm"] == arm]
        print(f"| {arm} | {spread([100 * r['accuracy'] for r in rs], 2)} | {spread([r['steps'] for r in rs])} | "
              f"{spread([r['seconds'] for r in rs], 1)} | {spread([r['cpu_seconds'] for r in rs], 1)} |")
    return {"runs": runs}


def environment(argv) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"command": "python " + " ".join(argv), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "torch": torch.__version__, "lightning": lightning.__version__, "threads": torch.get_num_threads(),
            "commit": commit, "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("section", choices=["overhead", "increase", "all"])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks that the script runs")
    parser.add_argument("--source", default="auto", choices=["auto", "micro", "per_example"], help="overhead")
    parser.add_argument("--every", type=int, default=1, help="overhead: measure one step in N")
    parser.add_argument("--small", default="first", choices=["first", "all"], help="overhead: micro-batches read")
    parser.add_argument("--batch", type=int, default=64, help="overhead: dataloader batch")
    parser.add_argument("--accumulate", type=int, default=4, help="overhead: micro-batches per step")
    parser.add_argument("--steps", type=int, default=200, help="overhead: timed steps per fit")
    parser.add_argument("--warmup", type=int, default=20, help="overhead: untimed steps at the start of each fit")
    parser.add_argument("--repeats", type=int, default=10, help="overhead: pairs of fits (with, without)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="increase")
    parser.add_argument("--epochs", type=float, default=4.0, help="increase: epochs of both arms")
    parser.add_argument("--base", type=int, default=128, help="increase: starting batch (= dataloader batch)")
    parser.add_argument("--lr", type=float, default=0.05, help="increase: SGD LR of both arms")
    parser.add_argument("--max-batch", type=int, default=None, help="increase: cap; past it the LR decays")
    parser.add_argument("--rule", default="exact", choices=["exact", "approx"], help="increase: increase_batch rule")
    parser.add_argument("--train-size", type=int, default=0, help="first N training examples (0 = all 60,000)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/...)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 10, 3, 2
        args.seeds, args.epochs, args.train_size = [0], 1.0, args.train_size or 4096
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    train, test = TASK.load(None)
    if args.train_size:
        train = TensorDataset(*(t[: args.train_size] for t in train.tensors))
    out = {"environment": environment(sys.argv), "args": {k: str(v) for k, v in vars(args).items()}}
    if args.section in ("overhead", "all"):
        out["overhead"] = overhead(args, train)
    if args.section in ("increase", "all"):
        out["increase"] = increase(args, train, test)
    out["environment"]["load_average_end"] = os.getloadavg()
    path = args.out or RESULTS / f"bench_lightning_{args.section}{'_quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print(f"\nraw results: {path}")


if __name__ == "__main__":
    main()
