"""Accuracy-vs-time tradeoff curves from one run (Portes, Blalock, Stephenson, Frankle 2022).

Cosine annealing with warm restarts (Loshchilov & Hutter 2017, SGDR), each cycle ``t_mult`` times longer than the
one before; at the end of every cycle the LR is back near zero, as at the end of a separately trained cosine run
of that total length, so one (training time, metric) point per cycle approximates those runs. The curve costs
only its longest run, ΣT_i, against Σ_k Σ_{i≤k} T_i for separate runs.

>>> cycle_lengths(700, cycles=3, t_mult=2)
[100, 200, 400]
>>> f = cyclic_cosine([100, 200, 400])
>>> [round(f(s), 3) for s in (0, 50, 100, 200, 300)]
[1.0, 0.5, 1.0, 0.5, 1.0]
"""
from __future__ import annotations

import bisect
import math
import time
from typing import Callable, Sequence

Schedule = Callable[[int], float]


def cycle_lengths(steps: int, cycles: int, t_mult: float = 2.0) -> list[int]:
    """``cycles`` cycle lengths T_i = T_0·t_mult^i that add up to ``steps`` (the last absorbs rounding)."""
    if cycles < 1 or steps < cycles:
        raise ValueError(f"need 1 ≤ cycles ≤ steps, got cycles={cycles}, steps={steps}")
    weights = [t_mult**i for i in range(cycles)]
    lengths = [max(1, round(steps * w / sum(weights))) for w in weights[:-1]]
    return lengths + [steps - sum(lengths)]


def cycle_ends(lengths: Sequence[int]) -> list[int]:
    """The step count at the end of each cycle: the running sums of the lengths."""
    ends, total = [], 0
    for length in lengths:
        total += length
        ends.append(total)
    return ends


def cyclic_cosine(lengths: Sequence[int], warmup: int = 0) -> Schedule:
    """LR multiplier at step s: ½(1 + cos(π·u/T_i)) with u the step within cycle i (hasten's cosine schedule
    restarted at each cycle); the first ``warmup`` steps of the first cycle rise linearly instead."""
    ends = cycle_ends(lengths)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        i = min(bisect.bisect_right(ends, step), len(ends) - 1)
        start = ends[i] - lengths[i]
        return 0.5 * (1.0 + math.cos(math.pi * min(step - start, lengths[i]) / lengths[i]))

    return multiplier


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (time, metric) that no other point beats on both: sorted by time, each has a strictly
    better metric than every faster one."""
    sign = 1.0 if higher_is_better else -1.0
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -sign * points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if sign * points[i][1] > best:
            front.append(i)
            best = sign * points[i][1]
    return front


def time_to_target(points: Sequence[tuple[float, float]], target: float, higher_is_better: bool = True) -> float:
    """The first time at which the metric reaches ``target`` (inf if never)."""
    reached = [t for t, m in sorted(points) if (m >= target if higher_is_better else m <= target)]
    return reached[0] if reached else math.inf


class CyclicLR:
    """Callback: the LR of step s is ``peak_lr × cyclic_cosine(lengths, warmup)(s)`` (replaces cfg.schedule)."""

    def __init__(self, lengths: Sequence[int], peak_lr: float, warmup: int = 0):
        self.schedule, self.peak_lr = cyclic_cosine(lengths, warmup), peak_lr

    def on_batch_start(self, state) -> None:
        state.lr = self.peak_lr * self.schedule(state.step)


class EvalPoints:
    """Callback: has the loop evaluate after the listed steps and records (steps, seconds, eval metrics).

    Training time follows Bartoldson et al. (2023): the clock starts after the first step (warm-up of kernels and
    allocators) and stops during every evaluation, so monitoring does not count. ``seconds`` is wall-clock,
    ``cpu_seconds`` the process's CPU time (less sensitive to other work on a shared machine). Run with
    checkpoint_every=0 so that checkpoints are written only at the end, after the last point.
    """

    name = "eval_points"

    def __init__(self, steps: Sequence[int]):
        self.steps = sorted(set(steps))
        self.points: list[dict] = []
        self.spent = [0.0, 0.0]  # training seconds so far: wall, CPU
        self._since = None  # (wall, CPU) when the clock last started; None while it is stopped

    @staticmethod
    def _now() -> tuple[float, float]:
        return time.perf_counter(), time.process_time()

    def _stop(self) -> None:
        if self._since is not None:
            self.spent = [s + now - since for s, now, since in zip(self.spent, self._now(), self._since)]
            self._since = None

    def on_batch_end(self, state) -> None:
        if self._since is None:  # the first step of a (resumed) run is warm-up: the clock starts after it
            self._since = self._now()
        if state.step in self.steps:
            state.evaluate_now = True

    def on_before_evaluate(self, state) -> None:
        self._stop()

    def on_evaluate(self, state) -> None:
        if state.step in self.steps:
            evals = {k: v for k, v in state.metrics.items() if k.startswith("eval/")}
            self.points.append({"steps": state.step, "examples": state.examples, "seconds": self.spent[0],
                                "cpu_seconds": self.spent[1], **evals})
        self._since = self._now()

    def state_dict(self) -> dict:
        return {"points": self.points, "spent": list(self.spent)}

    def load_state_dict(self, state: dict) -> None:
        self.points, self.spent = state["points"], list(state["spent"])
