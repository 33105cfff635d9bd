"""Step time with the noise-scale meter ÷ without (issue 2 targets: ≤1.03 micro-batch, ≤1.01 DDP).

    python benchmarks/bench_noise_overhead.py            # single process: fashion MLP, batch 256, 4 micro-batches
    python benchmarks/bench_noise_overhead.py --every 4  # measure one step in 4 (unbiased, less overhead)
    python benchmarks/bench_noise_overhead.py --small all  # read every micro-batch's gradient (k reads per step)
    python benchmarks/bench_noise_overhead.py --ddp      # 2 gloo processes under torchrun, per-rank batch 128
    python benchmarks/bench_noise_overhead.py --ddp --model cnn   # the same with the fashion CNN
    python benchmarks/bench_noise_overhead.py --ddp --hook python-allreduce  # a do-nothing Python hook: the floor

Both variants train the same model on the same real Fashion-MNIST batches, interleaved in blocks (ABAB...) so drifts
in machine load hit both alike; the ratio of medians over blocks is reported with its spread (min-max over blocks).
Warm-up blocks are excluded. One thread per process. Wall and process-CPU time are both reported.
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


def _setup(seed: int = 0, model_name: str = "mlp"):
    task = get_task("fashion")
    train, _ = task.load(None)
    torch.manual_seed(seed)
    model = task.make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = train.tensors
    return task, model, opt, x, y


def _block(step, x, y, batch: int, steps: int, g: torch.Generator) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per step. CPU time (all threads of this process) is less disturbed by
    other jobs on a shared machine than wall time; both are reported."""
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch,), generator=g)
        step(x[idx], y[idx])
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def _summary(source: str, without: list, with_meter: list, blocks: int, steps: int, b_simple: float) -> dict:
    """Medians and min-max spreads over blocks of the per-block ratios, for wall and CPU time."""
    out = {"source": source}
    for i, clock in enumerate(("wall", "cpu")):
        ratios = [a[i] / b[i] for a, b in zip(with_meter, without)]
        out.update({f"{clock}_step_ms_without": 1e3 * statistics.median(b[i] for b in without),
                    f"{clock}_step_ms_with": 1e3 * statistics.median(a[i] for a in with_meter),
                    f"{clock}_ratio_median": statistics.median(ratios), f"{clock}_ratio_min": min(ratios),
                    f"{clock}_ratio_max": max(ratios)})
    return {**out, "blocks": blocks, "steps_per_block": steps, "b_simple": b_simple,
            "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def single(blocks: int, steps: int, every: int = 1, small: str = "first") -> dict:
    torch.set_num_threads(1)
    task, model, opt, x, y = _setup()
    tap = MicroBatchTap(model, every=every, small=small)

    def train_step(xb, yb, measure: bool):
        for xm, ym in zip(xb.chunk(4), yb.chunk(4)):
            (task.loss(model(xm), ym) / 4).backward()
        if measure:
            tap.step(len(xb))
        opt.step()
        opt.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(0)
    with_meter, without = [], []
    for b in range(blocks + 2):
        tap.remove()
        t_off = _block(lambda a, c: train_step(a, c, False), x, y, 256, steps, g)
        tap = MicroBatchTap(model, tap.noise, every=every, small=small)
        t_on = _block(lambda a, c: train_step(a, c, True), x, y, 256, steps, g)
        if b >= 2:  # warm-up blocks excluded
            without.append(t_off)
            with_meter.append(t_on)
    return _summary(f"micro-batch (4 x 64), every={every}, small={small}", without, with_meter, blocks, steps,
                    tap.noise.compute().b_simple)


def _python_allreduce_hook(_, bucket):  # no annotations: DDP checks them, and this file defers them
    """DDP's default averaging all-reduce written as a Python hook: the floor of any Python communication hook."""
    future = dist.all_reduce(bucket.buffer().div_(dist.get_world_size()), async_op=True).get_future()
    return future.then(lambda fut: fut.value()[0])


def ddp_worker(blocks: int, steps: int, model_name: str = "mlp", hook: str = "hasten") -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    task, model, opt, x, y = _setup(model_name=model_name)
    plain = torch.nn.parallel.DistributedDataParallel(model)
    hooked = torch.nn.parallel.DistributedDataParallel(model)
    if hook == "hasten":
        state = attach_ddp_noise(hooked)
    else:  # python-allreduce: the cost of a Python hook itself, no meter
        hooked.register_comm_hook(None, _python_allreduce_hook)
        state = None

    def train_step(ddp, xb, yb, measure: bool):
        task.loss(ddp(xb), yb).backward()
        if measure and state is not None:
            state.step(len(xb))
        opt.step()
        opt.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(rank)
    with_meter, without = [], []
    for b in range(blocks + 2):
        dist.barrier()
        t_off = _block(lambda a, c: train_step(plain, a, c, False), x, y, 128, steps, g)
        dist.barrier()
        t_on = _block(lambda a, c: train_step(hooked, a, c, True), x, y, 128, steps, g)
        if b >= 2:
            without.append(t_off)
            with_meter.append(t_on)
    if rank == 0:
        source = f"DDP {hook} hook, fashion {model_name}, 2 ranks x 128"
        b_simple = state.noise.compute().b_simple if state is not None else float("nan")
        print(json.dumps(_summary(source, without, with_meter, blocks, steps, b_simple)))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ddp", action="store_true")
    p.add_argument("--worker", action="store_true")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--every", type=int, default=1, help="measure one step in N (micro-batch source)")
    p.add_argument("--model", default="mlp", choices=["mlp", "cnn"], help="DDP: the fashion model")
    p.add_argument("--hook", default="hasten", choices=["hasten", "python-allreduce"],
                   help="DDP: the meter's hook, or a Python hook doing only the default all-reduce (its floor)")
    p.add_argument("--small", default="first", choices=["first", "all"], help="micro-batch gradients read per step")
    a = p.parse_args()
    if a.worker:
        return ddp_worker(a.blocks, a.steps, a.model, a.hook)
    if a.ddp:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_port=29533", __file__, "--worker", f"--blocks={a.blocks}",
                              f"--steps={a.steps}", f"--model={a.model}", f"--hook={a.hook}"], env=env, capture_output=True, text=True, check=True)
        print(out.stdout.strip().splitlines()[-1])
    else:
        print(json.dumps(single(a.blocks, a.steps, a.every, a.small)))


if __name__ == "__main__":
    main()
