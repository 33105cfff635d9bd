"""Batch-size schedules as data: progress (examples seen) → :class:`Plan` (global batch, LR multiplier, momentum).

Every schedule has ``plan(examples, b_simple=nan) -> Plan``, ``validate(dataset_size, multiple)`` and
``state_dict()``/``load_state_dict()`` (empty except for :class:`Adaptive`, whose hysteresis has memory). The LR
multiplier multiplies whatever the LR schedule says; ``momentum=None`` leaves the optimizer's momentum alone.

>>> s = increase_batch(128, milestones=(30_000, 45_000), factor=5, max_batch=1024, dataset_size=50_000)
>>> [(p.batch_size, round(p.lr_mult, 3)) for p in map(s.plan, (0, 30_000, 45_000))]  # g of LR ÷5, ÷25 at 128
[(128, 1.0), (634, 1.001), (1024, 0.326)]
>>> s = increase_batch(128, milestones=(30_000, 45_000), factor=5, max_batch=1024, rule="approx")  # ε/B: B ≪ N
>>> [tuple(s.plan(e)) for e in (0, 30_000, 45_000)]   # ×5 batch instead of ÷5 LR; past 1024 the LR decays
[(128, 1.0, None), (640, 1.0, None), (1024, 0.32, None)]
"""
from __future__ import annotations

import bisect
import math
from typing import Callable, NamedTuple, Sequence

from hasten.errors import HastenError
from hasten.schedules.scaling import RULES, constant_noise_batch, constant_noise_lr, rescale

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


INCREASE_RULES = ("exact", "approx")


def increase_batch(base_batch: int, milestones: Sequence[float] = (), factor: float = 5.0,
                   max_batch: int | None = None, *, lr_schedule: Callable[[float], float] | None = None,
                   total_examples: float | None = None, multiple: int = 1, dataset_size: int | None = None,
                   rule: str = "exact") -> FromLR:
    """Grow the batch where an LR schedule would decay the LR (Smith, Kindermans, Ying & Le 2017, "Don't Decay the
    Learning Rate, Increase the Batch Size"), keeping the SGD noise g = ε(N/B − 1)/(1 − m) of the LR-decay run.

    The decay is either ``milestones`` (examples) with ``factor`` (the LR would be ÷factor at each one), or any
    ``lr_schedule(examples) -> multiplier`` d (checked non-increasing on [0, total_examples]). Where the LR-decay
    run (batch ``base_batch``, LR ε·d) is, this one trains at:

    - ``rule="exact"`` (default): B = N/(1 + d(N/B₀ − 1)), the batch whose g equals that run's at the full LR
      (:func:`~hasten.schedules.scaling.constant_noise_batch`; N = ``dataset_size``, required). The momentum
      cancels when both runs share it. B stays below N, so g never drops to the full-batch 0.
    - ``rule="approx"``: the paper's B = B₀/d, which holds ε/B and so g only while B ≪ N: at B = N/2 its noise is
      already (N/B − 1)/(N/B₀ − 1)·B/B₀ below the LR-decay run's.

    Past ``max_batch`` the batch stays there and the LR decays instead, by the same rule ("hybrid"). Batches round
    to the nearest multiple of ``multiple`` and the LR multiplier takes up the rounding, so the rule's g (or ε/B)
    is held exactly, not within a rounding error.
    """
    if rule not in INCREASE_RULES:
        raise HastenError(f"increase_batch rule {rule!r}: choose exact (holds ε(N/B − 1)/(1 − m)) or approx "
                          "(holds ε/B, Smith et al.'s B ≪ N form)")
    if not base_batch >= 1:
        raise HastenError(f"base_batch={base_batch} must be a positive integer")
    _check_multiple(base_batch, multiple, "base_batch")
    if max_batch is not None and max_batch < base_batch:
        raise HastenError(f"max_batch={max_batch} is smaller than base_batch={base_batch}")
    cap = INF if max_batch is None else max(multiple, multiple * (max_batch // multiple))
    if rule == "exact":
        if not dataset_size:
            raise HastenError("increase_batch rule='exact' needs dataset_size (N in g = ε(N/B − 1)/(1 − m)); "
                              "or pass rule='approx' to hold ε/B")
        if base_batch >= dataset_size:
            raise HastenError(f"base_batch={base_batch} must be smaller than dataset_size={dataset_size}: "
                              "a full batch has no SGD noise to hold")
        cap = min(cap, multiple * ((dataset_size - 1) // multiple))  # below N: g > 0 wherever the LR is
    if lr_schedule is not None:
        if milestones:
            raise HastenError("give increase_batch either milestones or an lr_schedule, not both")
        if not math.isfinite(cap):
            raise HastenError("increase_batch from an lr_schedule needs max_batch (the LR may reach 0)")
        if not (total_examples and total_examples > 0):
            raise HastenError("increase_batch from an lr_schedule needs total_examples > 0 to check the schedule")
        grid = [lr_schedule(total_examples * i / (FromLR.GRID - 1)) for i in range(FromLR.GRID)]
        if not grid[0] > 0 or any(not (math.isfinite(v) and v >= 0) for v in grid):
            raise HastenError(f"lr_schedule must start > 0 and stay finite and ≥ 0, got {grid[0]} at 0 examples")
        if any(b > a * (1 + 1e-12) for a, b in zip(grid, grid[1:])):
            raise HastenError("lr_schedule must be non-increasing (a decay) to become batch increases; "
                              "apply LR warmup separately")
        return FromLR(base_batch, lr_schedule, cap, multiple, rule, dataset_size, probes=grid, continuous=True)
    if not factor >= 1:
        raise HastenError(f"factor={factor} must be ≥ 1 (the batch multiplier at each milestone)")
    ms = [float(m) for m in milestones]
    if any(not b > a for a, b in zip(ms, ms[1:])) or (ms and not ms[0] > 0):
        raise HastenError(f"milestones must be positive and strictly increasing, got {list(milestones)}")
    decays = [float(factor) ** -i for i in range(len(ms) + 1)]
    return FromLR(base_batch, lambda e: decays[bisect.bisect_right(ms, e)], cap, multiple, rule, dataset_size,
                  probes=decays, continuous=False)


class FromLR:
    """The batch (and LR multiplier) that hold an LR-decay run's noise where its LR is ×``lr_schedule(examples)``;
    see :func:`increase_batch`, which builds it."""

    GRID = 257  # points of [0, total_examples] where the LR schedule is checked to be a decay

    def __init__(self, base_batch: int, lr_schedule: Callable[[float], float], max_batch: float, multiple: int,
                 rule: str, dataset_size: int | None, *, probes: Sequence[float] = (), continuous: bool = True):
        self.base_batch, self.lr_schedule, self.max_batch = base_batch, lr_schedule, max_batch
        self.multiple, self.rule, self.dataset_size = multiple, rule, dataset_size
        self.probes, self.continuous = tuple(probes), continuous  # LR multipliers validate() plans for

    def batch_for(self, decay: float) -> Plan:
        """The plan where the LR-decay run's LR is ×``decay``."""
        base, cap, multiple = self.base_batch, self.max_batch, self.multiple
        if self.rule == "approx":  # ε/B = decay/base: B = base/decay
            batch = cap if decay <= 0 else min(round_batch(base / decay, multiple), cap)
            return Plan(int(batch), batch * decay / base)
        ideal = constant_noise_batch(decay, base, 1.0, self.dataset_size)  # g of the LR-decay run at the full LR
        batch = min(round_batch(ideal, multiple), cap)
        return Plan(int(batch), constant_noise_lr(decay, base, batch, self.dataset_size))

    def plan(self, examples: float, b_simple: float = math.nan) -> Plan:
        return self.batch_for(self.lr_schedule(examples))

    def validate(self, dataset_size: int | None = None, multiple: int = 1) -> None:
        if self.rule == "exact" and dataset_size is not None and dataset_size != self.dataset_size:
            raise HastenError(f"increase_batch was built for dataset_size={self.dataset_size} but the training set "
                              f"has {dataset_size} examples: build it with dataset_size={dataset_size}")
        _check_multiple(self.base_batch, multiple, "base_batch")
        if self.continuous and self.multiple % multiple:
            raise HastenError(f"increase_batch rounds batches to multiples of {self.multiple}, not of micro-batch × "
                              f"world size = {multiple}: build it with multiple={multiple}")
        for decay in self.probes:
            batch = self.batch_for(decay).batch_size
            what = "max_batch" if batch == self.max_batch else f"batch (where the LR would be ×{decay:.3g})"
            _check_fits(batch, dataset_size, what)
            _check_multiple(batch, multiple, what)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...

    def __repr__(self) -> str:
        return (f"increase_batch(base_batch={self.base_batch}, max_batch={self.max_batch}, rule={self.rule!r}, "
                f"dataset_size={self.dataset_size}, multiple={self.multiple})")


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
