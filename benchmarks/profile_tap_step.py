"""Where the micro-batch tap's time goes inside a training step, and what the same operations cost alone.

    python benchmarks/profile_tap_step.py

Part 1 times the fashion MLP's step (batch 256 = 4 × 64, one thread) with no hooks, with six tensor hooks that only
count, and with the tap, interleaved step by step on one model (ratios of mean step times). Part 2 times the tap's
pieces inside the step (its hook norms, the fused norm of ``.grad``, the host sync, ``NoiseScale.update``) and the
same calls in a tight loop on the same tensors.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench_noise_overhead import _setup  # the same model, optimizer and data as the overhead benchmark

from hasten.measure import MicroBatchTap
from hasten.measure.noise_scale import NoiseScale


class Timed:
    """Wraps a callable and accumulates its wall time."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def _step(loss_fn, model, opt, x, y, tap=None):
    for xm, ym in zip(x.chunk(4), y.chunk(4)):
        (loss_fn(model(xm), ym) / 4).backward()
    if tap is not None:
        tap.step(len(x))
    opt.step()
    opt.zero_grad(set_to_none=True)


def hooks_vs_tap(steps: int) -> dict:
    task, model, opt, x, y = _setup()
    params, counts, noise = list(model.parameters()), [0], NoiseScale()
    g, times = torch.Generator().manual_seed(0), {"none": [], "counting hooks": [], "tap": []}
    for i in range(steps + 100):
        idx = torch.randint(len(x), (256,), generator=g)
        for variant in (list(times) if i % 2 == 0 else list(times)[::-1]):
            handles, tap = [], None
            if variant == "counting hooks":
                handles = [p.register_hook(lambda grad: counts.__setitem__(0, counts[0] + 1)) for p in params]
            elif variant == "tap":
                tap = MicroBatchTap(model, noise)
            t0 = time.perf_counter()
            _step(task.loss, model, opt, x[idx], y[idx], tap)
            if i >= 100:
                times[variant].append(time.perf_counter() - t0)
            for handle in handles:
                handle.remove()
            if tap is not None:
                tap.remove()
    base = statistics.fmean(times["none"])
    return {f"{k} mean ratio": round(statistics.fmean(v) / base, 4) for k, v in times.items()} | {
        "step ms without": round(1e3 * base, 3)}


def pieces(steps: int) -> dict:
    task, model, opt, x, y = _setup()
    norm = Timed(torch.linalg.vector_norm)
    torch.linalg.vector_norm = norm  # the tap's hooks bind it when they are made
    tap = MicroBatchTap(model)
    torch.linalg.vector_norm = norm.fn
    foreach, host, update, step = Timed(torch._foreach_norm), Timed(tap._host_values), Timed(tap.noise.update), \
        Timed(tap.step)
    torch._foreach_norm, tap._host_values, tap.noise.update, tap.step = foreach, host, update, step
    g = torch.Generator().manual_seed(0)
    try:
        for _ in range(steps):
            idx = torch.randint(len(x), (256,), generator=g)
            _step(task.loss, model, opt, x[idx], y[idx], tap)
    finally:
        torch._foreach_norm = foreach.fn
    in_step = {"hook norms (6 per step)": norm, "norm of .grad (fused)": foreach, "host sync (stack, tolist)": host,
               "NoiseScale.update": update, "tap.step() in all": step}
    out = {f"{k}, us in the step": round(1e6 * v.seconds / steps, 1) for k, v in in_step.items()}
    grads = [torch.randn_like(p) for p in model.parameters()]
    norms = [torch.linalg.vector_norm(gr) for gr in grads] * 2
    alone = {"hook norms (6 per step)": lambda: [torch.linalg.vector_norm(gr) for gr in grads],
             "norm of .grad (fused)": lambda: torch._foreach_norm(grads, 2),
             "host sync (stack, tolist)": lambda: torch.stack(norms).tolist(),
             "NoiseScale.update": lambda: NoiseScale().update(5.0, 64, 4.0, 256)}
    for name, fn in alone.items():
        for _ in range(100):
            fn()
        t0 = time.perf_counter()
        for _ in range(2000):
            fn()
        out[f"{name}, us alone"] = round(1e6 * (time.perf_counter() - t0) / 2000, 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args()
    torch.set_num_threads(1)
    print(json.dumps(hooks_vs_tap(a.steps)))
    print(json.dumps(pieces(a.steps)))


if __name__ == "__main__":
    main()
