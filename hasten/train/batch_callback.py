"""A batch-size schedule in the training loop: one callback consults it once per step, at ``batch_start``.

Progress is counted in steps of the configured ``batch_size`` (base-batch steps): a step of n examples adds
n/batch_size, or AdaScale's gain r when the schedule scales the LR by AdaScale (τ += r, Johnson et al. 2020). The
LR schedule is read at that progress and multiplied by the plan's LR multiplier, and the run stops once progress
reaches ``steps`` (the last step is trimmed to the examples left, its LR scaled to keep the noise the schedule
holds: g = ε(N/B − 1)/(1 − m) for ``batch=increase`` with the exact rule, else ε/B): bigger batches see the same
examples in fewer optimizer steps. ``steps`` still caps the number of optimizer steps (it binds only when
batches smaller than ``batch_size`` are planned).

The estimate the adaptive schedule follows is the ``noise/b_simple`` that :class:`NoiseScaleCallback` logged on
the previous step; it is part of this callback's saved state, so a resumed run makes the same decisions.
"""
from __future__ import annotations

import math

import torch

from hasten.errors import HastenError
from hasten.schedules import (Adaptive, FromLR, adaptive, adascale_gain_from_noise, constant_noise_lr,
                              increase_batch, stages)
from hasten.train.events import Callback, LoopState
from hasten.train.schedule import SCHEDULES, Schedule, constant, make_schedule, warmup

BATCH_SCHEDULES = ("fixed", "increase", "adaptive", "stages")


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def schedule_from_config(cfg, train_size: int, multiple: int = 1) -> tuple[object, Schedule]:
    """(batch schedule, LR schedule over base-batch steps) for ``cfg.batch``; ``multiple`` = micro-batch × world."""
    lr_schedule = make_schedule(cfg.schedule, cfg.steps, cfg.warmup)  # also checks the schedule's settings
    base, total = cfg.batch_size, cfg.steps * cfg.batch_size
    biggest = cfg.batch_max or multiple * (train_size // multiple)
    if cfg.batch == "fixed":
        return stages([(math.inf, base, 1.0)]), lr_schedule
    if cfg.batch == "increase":
        if cfg.schedule == "constant":
            raise HastenError("batch=increase grows the batch where the LR decays: set schedule=step or cosine")
        decay, w = SCHEDULES[cfg.schedule](cfg.steps - cfg.warmup), cfg.warmup
        # Smith et al. 2017: the batch whose noise g equals the LR-decay run's (exact: B = N/(1 + d(N/B₀ − 1));
        # approx: B = B₀/d); the warmup stays an LR warmup.
        plan = increase_batch(base, max_batch=biggest, lr_schedule=lambda e: decay(max(e / base - w, 0.0)),
                              total_examples=total, multiple=multiple, dataset_size=train_size,
                              rule=cfg.batch_increase_rule)
        return plan, warmup(constant(), w)
    if cfg.batch == "adaptive":
        if cfg.noise == "off":
            raise HastenError("batch=adaptive follows the noise scale: set noise=auto (or hooks, micro, per_example)")
        momentum = cfg.momentum if cfg.optimizer == "sgd" else None
        plan = adaptive(base, cfg.batch_min or base, biggest, rule=cfg.batch_rule, scale=cfg.batch_scale,
                        ref_batch=base, gain=cfg.batch_gain, lr_rule=cfg.batch_lr_rule, multiple=multiple,
                        dataset_size=train_size, momentum=momentum)
        return plan, lr_schedule
    if cfg.batch == "stages":
        return stages([_parse_stage(row, total) for row in cfg.batch_stages or _no_stages()]), lr_schedule
    raise HastenError(f"batch={cfg.batch!r}: choose one of {', '.join(BATCH_SCHEDULES)}")


def _no_stages():
    raise HastenError("batch=stages needs batch_stages=until:batch[:lr_mult[:momentum]],... (until in (0, 1])")


def _parse_stage(row: str, total_examples: float) -> tuple:
    parts = row.split(":")
    try:
        until, batch = float(parts[0]), int(parts[1])
        rest = [float(p) for p in parts[2:]]
    except (ValueError, IndexError):
        raise HastenError(f"batch_stages row {row!r}: expected until:batch[:lr_mult[:momentum]], e.g. 0.5:256:2")
    if len(rest) > 2:
        raise HastenError(f"batch_stages row {row!r} has more than 4 fields (until:batch:lr_mult:momentum)")
    return (until * total_examples, batch, *(rest or [1.0]))


def set_momentum(optimizer: torch.optim.Optimizer, momentum: float) -> None:
    """SGD's ``momentum`` or Adam's β₁."""
    for group in optimizer.param_groups:
        if "betas" in group:
            group["betas"] = (momentum, group["betas"][1])
        else:
            group["momentum"] = momentum


class BatchScheduleCallback(Callback):
    """Sets ``state.batch_size``, ``state.lr`` (and momentum) from a batch schedule each step; logs
    ``batch/planned`` (the loop's ``batch_size`` is what was drawn: less at an epoch's end), ``batch/lr_mult`` and
    ``batch/progress``. ``schedule=None`` builds it from the config (``cfg.batch``)."""

    name = "batch"

    def __init__(self, schedule=None, lr_schedule: Schedule | None = None):
        self.schedule, self.lr_schedule = schedule, lr_schedule
        self.progress, self.b_simple, self.multiple = 0.0, math.nan, 1

    def on_fit_start(self, state: LoopState) -> None:
        cfg, self.multiple = state.cfg, (state.micro_batch_size or 1) * world_size()
        if cfg.batch == "adaptive" and state.noise_bias:
            raise HastenError(f"batch=adaptive follows the noise scale, which is biased here ({state.noise_bias}): "
                              "drop that method, or use batch=fixed or increase")
        if self.schedule is None:
            self.schedule, self.lr_schedule = schedule_from_config(cfg, state.train_size, self.multiple)
        self.lr_schedule = self.lr_schedule or make_schedule(cfg.schedule, cfg.steps, cfg.warmup)
        self.schedule.validate(state.train_size, self.multiple)

    def on_batch_start(self, state: LoopState) -> None:
        plan, cfg = self.schedule.plan(state.examples, self.b_simple), state.cfg
        batch, lr_mult = plan.batch_size, plan.lr_mult
        if not self._adascale():  # the last step takes only the examples left in the run, at the same noise
            left = self.multiple * math.ceil((cfg.steps - self.progress) * cfg.batch_size / self.multiple - 1e-9)
            if self.multiple <= left < batch:
                exact = isinstance(self.schedule, FromLR) and self.schedule.rule == "exact"
                lr_mult = (constant_noise_lr(lr_mult, batch, left, state.train_size) if exact
                           else lr_mult * left / batch)
                batch = left
        state.batch_size = batch
        state.lr = cfg.lr * self.lr_schedule(self.progress) * lr_mult
        if plan.momentum is not None:
            set_momentum(state.optimizer, plan.momentum)
        state.metrics.update({"batch/planned": batch, "batch/lr_mult": lr_mult, "batch/progress": self.progress})

    def _adascale(self) -> bool:
        return isinstance(self.schedule, Adaptive) and self.schedule.lr_rule == "adascale"

    def on_batch_end(self, state: LoopState) -> None:
        n, base = state.metrics["batch_size"], state.cfg.batch_size  # examples drawn this step
        self.b_simple = state.metrics.get("noise/b_simple", math.nan)
        if self._adascale():
            self.progress += adascale_gain_from_noise(self.schedule.b_simple, base, n)
        else:
            self.progress += n / base
        if self.progress >= state.cfg.steps - 1e-9:
            state.should_stop = True

    def state_dict(self) -> dict:
        return {"progress": self.progress, "b_simple": self.b_simple, "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.progress, self.b_simple = float(state["progress"]), float(state["b_simple"])
        self.schedule.load_state_dict(state["schedule"])
