"""Step time with the noise-scale meter ÷ without (issue 2 targets: ≤1.03 micro-batch, ≤1.01 DDP).

    python benchmarks/bench_noise_overhead.py            # single process: fashion MLP, batch 256, 4 micro-batches
    python benchmarks/bench_noise_overhead.py --every 4  # measure one step in 4 (unbiased, less overhead)
    python benchmarks/bench_noise_overhead.py --small all  # read every micro-batch's gradient (k reads per step)
    python benchmarks/bench_noise_overhead.py --ddp      # 2 gloo processes under torchrun, per-rank batch 128
    python benchmarks/bench_noise_overhead.py --ddp --every 4   # DDP, measuring one step in 4
    python benchmarks/bench_noise_overhead.py --ddp --model cnn   # the same with the fashion CNN
    python benchmarks/bench_noise_overhead.py --ddp --hook python-allreduce  # a do-nothing Python hook: the floor
    python benchmarks/bench_noise_overhead.py --ddp --hook none  # A/A: both wrappers plain, the method's noise

One model trains on real Fashion-MNIST batches, its steps alternating between the meter attached and not (ABBA
order, so neither always runs first): in one process the tap's hooks are registered for the steps with the meter
and removed for the others (outside the timed region); under DDP the same parameters are driven through two DDP
wrappers, one with DDP's built-in all-reduce and one with the meter's hook. One model, not two copies: on this VM
two identical copies of a model train up to 10% apart in speed (memory placement), which would swamp a 1% effect.
Each step is timed on its own; we report the ratios of the mean step times (what a run pays, with ``every`` > 1
too) and of the medians (robust to scheduling spikes), and the min-max of the mean ratio over 10 chunks of the run.
Warm-up steps are excluded. One thread per process. Wall and process-CPU time are both reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

from hasten.measure import MicroBatchTap, attach_ddp_noise
from hasten.tasks import get_task

CHUNKS = 10


def _setup(model_name: str = "mlp", seed: int = 0):
    task = get_task("fashion")
    train, _ = task.load(None)
    torch.manual_seed(seed)
    model = task.make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    return task, model, opt, x, y


def _interleaved(step, x, y, batch: int, steps: int, warmup: int, g: torch.Generator, before=None, after=None):
    """Per-step (wall, CPU) seconds without and with the meter, alternating (ABBA) on fresh batches.
    ``before(meter)`` / ``after(meter)`` run untimed around each step (attaching and removing hooks)."""
    times = {False: [], True: []}
    for i in range(warmup + 2 * steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        meter = (i % 4) in (1, 2)
        if before is not None:
            before(meter)
        t0, c0 = time.perf_counter(), time.process_time()
        step(x[idx], y[idx], meter)
        t = (time.perf_counter() - t0, time.process_time() - c0)
        if after is not None:
            after(meter)
        if i >= warmup:
            times[meter].append(t)
    return times[False], times[True]


def _summary(source: str, without: list, with_meter: list, b_simple: float) -> dict:
    """Ratios of median and of mean step times, wall and CPU; spread of the median ratio over chunks of the run."""
    out = {"source": source}
    n = len(without) // CHUNKS
    for i, clock in enumerate(("wall", "cpu")):
        a, b = [t[i] for t in with_meter], [t[i] for t in without]
        chunk_ratios = [statistics.fmean(a[k * n:(k + 1) * n]) / statistics.fmean(b[k * n:(k + 1) * n])
                        for k in range(CHUNKS)]
        out.update({f"{clock}_step_ms_without": 1e3 * statistics.median(b),
                    f"{clock}_step_ms_with": 1e3 * statistics.median(a),
                    f"{clock}_ratio_median": statistics.median(a) / statistics.median(b),
                    f"{clock}_ratio_mean": statistics.fmean(a) / statistics.fmean(b),
                    f"{clock}_chunk_min": min(chunk_ratios), f"{clock}_chunk_max": max(chunk_ratios)})
    return {**out, "steps": len(without), "b_simple": b_simple, "load_average": os.getloadavg()[0],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def single(steps: int, warmup: int, every: int = 1, small: str = "first") -> dict:
    torch.set_num_threads(1)
    task, model, opt, x, y = _setup()
    taps = [MicroBatchTap(model, every=every, small=small)]
    taps[0].remove()
    measured = [0]  # steps with the tap attached: the phase of `every`

    def attach(meter: bool):
        if meter:
            taps[0] = MicroBatchTap(model, taps[0].noise, every=every, small=small)
            taps[0].steps = measured[0]

    def detach(meter: bool):
        if meter:
            taps[0].remove()
            measured[0] += 1

    def train_step(xb, yb, meter: bool):
        for xm, ym in zip(xb.chunk(4), yb.chunk(4)):
            (task.loss(model(xm), ym) / 4).backward()
        if meter:
            taps[0].step(len(xb))
        opt.step()
        opt.zero_grad(set_to_none=True)

    without, with_meter = _interleaved(train_step, x, y, 256, steps, warmup, torch.Generator().manual_seed(0),
                                       attach, detach)
    return _summary(f"micro-batch (4 x 64), every={every}, small={small}", without, with_meter,
                    taps[0].noise.compute().b_simple)


def _python_allreduce_hook(_, bucket):  # no annotations: DDP checks them, and this file defers them
    """DDP's default averaging all-reduce written as a Python hook: the floor of any Python communication hook."""
    future = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def ddp_worker(steps: int, warmup: int, model_name: str = "mlp", hook: str = "hasten", every: int = 1) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task, model, opt, x, y = _setup(model_name)
    plain, hooked = (torch.nn.parallel.DistributedDataParallel(model) for _ in range(2))
    if hook == "hasten":
        state = attach_ddp_noise(hooked, every=every)
    else:  # python-allreduce: the cost of a Python hook itself, no meter; none: two plain wrappers (A/A, the noise)
        if hook == "python-allreduce":
            hooked.register_comm_hook(None, _python_allreduce_hook)
        state = None

    def train_step(xb, yb, meter: bool):
        task.loss((hooked if meter else plain)(xb), yb).backward()
        if meter and state is not None:
            state.step(len(xb))
        opt.step()
        opt.zero_grad(set_to_none=True)

    dist.barrier()
    without, with_meter = _interleaved(train_step, x, y, 128, steps, warmup, torch.Generator().manual_seed(rank))
    if rank == 0:
        source = f"DDP {hook} hook, fashion {model_name}, 2 ranks x 128" + (f", every={every}" if every > 1 else "")
        b_simple = state.noise.compute().b_simple if state is not None else float("nan")
        print(json.dumps(_summary(source, without, with_meter, b_simple)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--steps", type=int, default=4000, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps per variant first")
    p.add_argument("--every", type=int, default=1, help="measure one step in N")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="DDP: the fashion model")
    p.add_argument("--hook", default="hasten", choices=["hasten", "python-allreduce", "none"],
                   help="DDP: the meter's hook, a Python hook doing only the default all-reduce (its floor), or none "
                        "(both wrappers plain: an A/A run, the benchmark's own noise)")
    p.add_argument("--small", default="first", choices=["first", "all"], help="micro-batch gradients read per step")
    a = p.parse_args()
    if a.worker:
        return ddp_worker(a.steps, a.warmup, a.model, a.hook, a.every)
    if a.ddp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_port=29533", __file__, "--worker", f"--steps={a.steps}",
                              f"--warmup={a.warmup}", f"--model={a.model}", f"--hook={a.hook}", f"--every={a.every}"],
                             env=env, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])
    else:
        print(json.dumps(single(a.steps, a.warmup, a.every, a.small)))


if __name__ == "__main__":
    main()
