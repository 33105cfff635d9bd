"""Batch-size schedules as data: progress (examples seen) → :class:`Plan` (global batch, LR multiplier, momentum).

Every schedule has ``plan(examples, b_simple=nan) -> Plan``, ``validate(dataset_size, multiple)`` and
``state_dict()``/``load_state_dict()`` (empty except for :class:`Adaptive`, whose hysteresis has memory). The LR
multiplier multiplies whatever the LR schedule says; ``momentum=None`` leaves the optimizer's momentum alone.

>>> s = increase_batch(128, milestones=(30_000, 45_000), factor=5, max_batch=1024)
>>> [tuple(s.plan(e)) for e in (0, 30_000, 45_000)]   # ×5 batch instead of ÷5 LR; past 1024 the LR decays
[(128, 1.0, None), (640, 1.0, None), (1024, 0.32, None)]
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, NamedTuple, Sequence

from hasten.errors import HastenError
from hasten.schedules.scaling import RULES, rescale

INF = math.inf


class Plan(NamedTuple):
    batch_size: int  # global batch: micro-batch × accumulation steps × world size
    lr_mult: float = 1.0  # multiplies the LR schedule's value
    momentum: float | None = None  # None = keep the optimizer's


def round_batch(batch: float, multiple: int = 1) -> int:
    """The nearest positive multiple of ``multiple`` (micro-batch × world size), at least ``multiple``."""
    return max(multiple, multiple * round(batch / multiple))


def _check_fits(batch: int, dataset_size: int | None, what: str) -> None:
    if dataset_size is not None and batch > dataset_size:
        raise HastenError(f"{what}={batch} is larger than the training set ({dataset_size} examples): lower it")


def _check_multiple(batch: int, multiple: int, what: str) -> None:
    if batch % multiple:
        raise HastenError(f"{what}={batch} is not a multiple of micro-batch × world size = {multiple}: change one")


class Stages:
    """A table of rows ``(until, batch, lr_mult[, momentum])``: row i holds while examples < until_i (strictly
    increasing); the last row holds past its ``until`` too (use ``math.inf``).

    >>> s = stages([(1000, 32, 1.0), (math.inf, 64, 2.0)])   # double the batch, LR ×2 (linear rule)
    >>> s.plan(999).batch_size, s.plan(1000).batch_size
    (32, 64)
    """

    def __init__(self, rows: Sequence[tuple]):
        rows = [tuple(r) for r in rows]
        if not rows:
            raise HastenError("a batch schedule needs at least one stage (until, batch, lr_mult)")
        for row in rows:
            if len(row) not in (3, 4):
                raise HastenError(f"stage {row} must be (until_examples, batch, lr_mult[, momentum])")
            until, batch, lr_mult = row[:3]
            if not (isinstance(batch, int) or float(batch).is_integer()) or batch < 1:
                raise HastenError(f"stage {row}: batch must be a positive integer, got {batch}")
            if not lr_mult >= 0 or not math.isfinite(lr_mult):
                raise HastenError(f"stage {row}: lr_mult must be a finite number ≥ 0, got {lr_mult}")
            if len(row) == 4 and row[3] is not None and not 0 <= row[3] < 1:
                raise HastenError(f"stage {row}: momentum must be in [0, 1), got {row[3]}")
        untils = [r[0] for r in rows]
        if any(not b > a for a, b in zip(untils, untils[1:])) or not untils[0] > 0:
            raise HastenError(f"stage ends must be positive and strictly increasing, got {untils}")
        self.rows = tuple((r[0], int(r[1]), float(r[2]), r[3] if len(r) == 4 else None) for r in rows)
        self._untils = untils

    def plan(self, examples: float, b_simple: float = math.nan) -> Plan:
        i = min(bisect.bisect_right(self._untils, examples), len(self.rows) - 1)
        return Plan(*self.rows[i][1:])

    def validate(self, dataset_size: int | None = None, multiple: int = 1) -> None:
        for until, batch, *_ in self.rows:
            _check_fits(batch, dataset_size, f"batch (stage until {until})")
            _check_multiple(batch, multiple, f"batch (stage until {until})")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def __repr__(self) -> str:
        return f"Stages({list(self.rows)})"


def stages(rows: Sequence[tuple]) -> Stages:
    """An explicit table of ``(until_examples, batch, lr_mult[, momentum])`` rows (modded-nanoGPT style)."""
    return Stages(rows)


def fixed(batch: int) -> Stages:
    """The same batch throughout."""
    return Stages([(INF, batch, 1.0)])


def increase_batch(base_batch: int, milestones: Sequence[float] = (), factor: float = 5.0,
                   max_batch: int | None = None, *, lr_schedule: Callable[[float], float] | None = None,
                   total_examples: float | None = None, multiple: int = 1):
    """Grow the batch where an LR schedule would decay the LR (Smith, Kindermans, Ying & Le 2017, "Don't Decay the
    Learning Rate, Increase the Batch Size"), keeping the SGD noise g ∝ ε/B of the LR-decay run.

    Either ``milestones`` (examples) with ``factor`` (the batch is ×factor at each one, where the LR would be
    ÷factor), or any decay ``lr_schedule(examples) -> multiplier`` (checked non-increasing on [0, total_examples]):
    then B = base/lr. Past ``max_batch`` the LR decays instead, ε/B being kept ("hybrid"). Batches round to
    ``multiple``, and the LR multiplier B/B_ideal absorbs the rounding so ε/B is exact.
    """
    if not base_batch >= 1:
        raise HastenError(f"base_batch={base_batch} must be a positive integer")
    _check_multiple(base_batch, multiple, "base_batch")
    if max_batch is not None and max_batch < base_batch:
        raise HastenError(f"max_batch={max_batch} is smaller than base_batch={base_batch}")
    cap = INF if max_batch is None else max(multiple, multiple * (max_batch // multiple))
    if lr_schedule is not None:
        if milestones:
            raise HastenError("give increase_batch either milestones or an lr_schedule, not both")
        return FromLR(base_batch, lr_schedule, cap, total_examples, multiple)
    if not factor >= 1:
        raise HastenError(f"factor={factor} must be ≥ 1 (the batch multiplier at each milestone)")
    ms = [float(m) for m in milestones]
    if any(not b > a for a, b in zip(ms, ms[1:])) or (ms and not ms[0] > 0):
        raise HastenError(f"milestones must be positive and strictly increasing, got {list(milestones)}")
    rows = []
    for i, until in enumerate(ms + [INF]):
        ideal = base_batch * factor**i
        batch = min(round_batch(ideal, multiple), cap)
        rows.append((until, batch, batch / ideal))
    return Stages(rows)


class FromLR:
    """B = base/lr(examples) capped at ``max_batch``; LR multiplier B·lr/base (see :func:`increase_batch`)."""

    GRID = 257  # points of [0, total_examples] where the LR schedule is checked to be a decay

    def __init__(self, base_batch: int, lr_schedule: Callable[[float], float], max_batch: float,
                 total_examples: float | None, multiple: int = 1):
        if not math.isfinite(max_batch):
            raise HastenError("increase_batch from an lr_schedule needs max_batch (the LR may reach 0)")
        if not (total_examples and total_examples > 0):
            raise HastenError("increase_batch from an lr_schedule needs total_examples > 0 to check the schedule")
        grid = [lr_schedule(total_examples * i / (self.GRID - 1)) for i in range(self.GRID)]
        if not grid[0] > 0 or any(not (math.isfinite(v) and v >= 0) for v in grid):
            raise HastenError(f"lr_schedule must start > 0 and stay finite and ≥ 0, got {grid[0]} at 0 examples")
        if any(b > a * (1 + 1e-12) for a, b in zip(grid, grid[1:])):
            raise HastenError("lr_schedule must be non-increasing (a decay) to become batch increases; "
                              "apply LR warmup separately")
        self.base_batch, self.lr_schedule, self.max_batch = base_batch, lr_schedule, int(max_batch)
        self.total_examples, self.multiple = total_examples, multiple

    def plan(self, examples: float, b_simple: float = math.nan) -> Plan:
        lr = self.lr_schedule(examples)
        batch = self.max_batch if lr <= 0 else min(round_batch(self.base_batch / lr, self.multiple), self.max_batch)
        return Plan(batch, batch * lr / self.base_batch)

    def validate(self, dataset_size: int | None = None, multiple: int = 1) -> None:
        _check_fits(self.max_batch, dataset_size, "max_batch")
        _check_multiple(self.base_batch, multiple, "base_batch")
        _check_multiple(self.max_batch, multiple, "max_batch")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...


def batch_cost(batch: float, b_noise: float, step_value: float) -> float:
    """Predicted cost per unit of training progress, in units of S_min: S/S_min + E/(K·S_min) with
    S/S_min = 1 + B_noise/B and E = E_min(1 + B/B_noise), E_min = B_noise·S_min (McCandlish et al. 2018,
    eqs. 2.11-2.12), so cost = 1 + B_noise/B + (B_noise + B)/K. K = ``step_value``: how many examples one optimizer
    step is worth. It is minimal at B* = √(K·B_noise) (App. D's √ rule); K = c²·B_noise puts it at B* = c·B_noise."""
    return 1.0 + b_noise / batch + (b_noise + batch) / step_value


class Adaptive:
    """The batch follows the running noise-scale estimate, with hysteresis (McCandlish et al. 2018).

    Target: ``rule="linear"``: B* = scale·B_simple; ``rule="sqrt"``: B* = scale·√(ref_batch·B_simple) (App. D:
    B ∝ √B_noise), clamped to [min_batch, max_batch] and rounded to ``multiple``.

    Gain criterion: switch from the current B to the target only when :func:`batch_cost` (the predicted steps plus
    examples/K per unit of progress, with the K for which the target is optimal) drops by at least ``gain`` (5%
    by default), and at least ``hold`` examples after the last change. With a constant estimate it changes at most
    once. It holds while B_simple is NaN (no estimate yet, or |G|² ≤ 0). The LR multiplier follows ``lr_rule``
    (see :func:`hasten.schedules.scaling.rescale`) relative to ``base_batch``, the batch the LR was tuned at.
    """

    def __init__(self, base_batch: int, min_batch: int, max_batch: int, *, rule: str = "linear", scale: float = 1.0,
                 ref_batch: int | None = None, gain: float = 0.05, hold: float = 0.0, lr_rule: str = "adascale",
                 multiple: int = 1, dataset_size: int | None = None, momentum: float | None = None):
        if not (min_batch >= 1 and max_batch >= 1 and base_batch >= 1):
            raise HastenError(f"batch sizes must be positive, got min={min_batch}, max={max_batch}, base={base_batch}")
        if max_batch < min_batch:
            raise HastenError(f"max_batch={max_batch} is smaller than min_batch={min_batch}")
        if not min_batch <= base_batch <= max_batch:
            raise HastenError(f"base_batch={base_batch} must lie in [min_batch={min_batch}, max_batch={max_batch}]")
        if rule not in ("linear", "sqrt"):
            raise HastenError(f"adaptive rule {rule!r}: choose linear (B = c·B_simple) or sqrt (B ∝ √B_simple)")
        if lr_rule not in RULES:
            raise HastenError(f"unknown lr rule {lr_rule!r}: choose one of {', '.join(RULES)}")
        if not (scale > 0 and gain >= 0 and hold >= 0):
            raise HastenError(f"need scale > 0, gain ≥ 0 and hold ≥ 0, got {scale}, {gain}, {hold}")
        _check_multiple(base_batch, multiple, "base_batch")
        self.lo = multiple * math.ceil(min_batch / multiple)
        self.hi = multiple * (max_batch // multiple)
        if self.hi < self.lo:
            raise HastenError(f"no multiple of {multiple} lies in [min_batch={min_batch}, max_batch={max_batch}]")
        self.base_batch, self.rule, self.scale, self.ref_batch = base_batch, rule, scale, ref_batch or base_batch
        self.gain, self.hold, self.lr_rule, self.multiple = gain, hold, lr_rule, multiple
        self.dataset_size, self.momentum = dataset_size, momentum
        self.batch, self.changes, self.last_change, self.b_simple = base_batch, 0, -INF, math.nan

    def step_value(self, b_noise: float) -> float:
        """K of :func:`batch_cost` for which this rule's target is the optimum."""
        c = self.scale
        return c * c * (b_noise if self.rule == "linear" else self.ref_batch)

    def target(self, b_noise: float) -> int:
        ideal = self.scale * (b_noise if self.rule == "linear" else math.sqrt(self.ref_batch * b_noise))
        return min(max(round_batch(ideal, self.multiple), self.lo), self.hi)

    def predicted_gain(self, batch: int, new_batch: int, b_noise: float) -> float:
        """Relative drop of :func:`batch_cost` from ``batch`` to ``new_batch``."""
        k = self.step_value(b_noise)
        old = batch_cost(batch, b_noise, k)
        return (old - batch_cost(new_batch, b_noise, k)) / old

    def plan(self, examples: float, b_simple: float = math.nan) -> Plan:
        if math.isfinite(b_simple) and b_simple > 0:
            self.b_simple = b_simple
            new = self.target(b_simple)
            if (new != self.batch and examples - self.last_change >= self.hold
                    and self.predicted_gain(self.batch, new, b_simple) >= self.gain):
                self.batch, self.changes, self.last_change = new, self.changes + 1, examples
        lr_mult, momentum = rescale(self.lr_rule, self.base_batch, self.batch, b_simple=self.b_simple,
                                    dataset_size=self.dataset_size, momentum=self.momentum)
        return Plan(self.batch, lr_mult, momentum)

    def validate(self, dataset_size: int | None = None, multiple: int = 1) -> None:
        _check_fits(self.hi, dataset_size, "max_batch")
        for what, b in (("base_batch", self.base_batch), ("min_batch", self.lo), ("max_batch", self.hi)):
            _check_multiple(b, multiple, what)

    def state_dict(self) -> dict:
        return {"batch": self.batch, "changes": self.changes, "last_change": self.last_change,
                "b_simple": self.b_simple}

    def load_state_dict(self, state: dict) -> None:
        self.batch, self.changes = int(state["batch"]), int(state["changes"])
        self.last_change, self.b_simple = float(state["last_change"]), float(state["b_simple"])


def adaptive(base_batch: int, min_batch: int, max_batch: int, **options) -> Adaptive:
    """A batch that follows the noise scale; see :class:`Adaptive` for ``options``."""
    return Adaptive(base_batch, min_batch, max_batch, **options)
