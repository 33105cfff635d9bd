"""Learning-rate schedules as plain functions ``step -> multiplier`` of the peak LR (optax-style).

``step`` is the index of the optimizer step about to be taken (0 for the first one).

>>> f = make_schedule("cosine", steps=100, warmup_steps=10)
>>> [round(f(s), 3) for s in (0, 9, 10, 55, 100)]
[0.1, 1.0, 1.0, 0.5, 0.0]
"""
from __future__ import annotations

import math
from typing import Callable

from hasten.errors import HastenError

Schedule = Callable[[int], float]


def constant() -> Schedule:
    return lambda step: 1.0


def cosine(steps: int) -> Schedule:
    """Half a cosine from 1 at step 0 to 0 at ``steps`` (Loshchilov & Hutter 2017, SGDR without restarts)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))


def step_decay(steps: int, milestones: tuple[float, ...] = (0.5, 0.75), factor: float = 0.1) -> Schedule:
    """×``factor`` at each milestone (a fraction of ``steps``): ×0.1 at 50% and ×0.01 from 75% by default."""
    return lambda step: factor ** sum(step >= m * steps for m in milestones)


def warmup(schedule: Schedule, warmup_steps: int) -> Schedule:
    """Linear warmup (Goyal et al. 2017): (step+1)/warmup_steps for the first ``warmup_steps`` steps, then
    ``schedule`` counted from the end of the warmup."""
    if warmup_steps <= 0:
        return schedule
    return lambda step: (step + 1) / warmup_steps if step < warmup_steps else schedule(step - warmup_steps)


SCHEDULES = {"constant": lambda steps: constant(), "cosine": cosine, "step": step_decay}


def make_schedule(name: str, steps: int, warmup_steps: int = 0) -> Schedule:
    """The named schedule over ``steps`` optimizer steps, after ``warmup_steps`` of linear warmup."""
    if name not in SCHEDULES:
        raise HastenError(f"unknown schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if not 0 <= warmup_steps <= steps:
        raise HastenError(f"warmup={warmup_steps} must be between 0 and steps={steps}")
    return warmup(SCHEDULES[name](steps - warmup_steps), warmup_steps)
