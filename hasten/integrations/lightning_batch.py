"""A batch-size schedule inside Lightning's ``trainer.fit``: grows the effective batch by changing
``trainer.accumulate_grad_batches`` between optimizer steps, with the LR (and momentum) the schedule plans.

>>> plan = increase_batch(64, (30_000, 60_000), 2, dataset_size=len(ds), multiple=64)  # doctest: +SKIP
>>> schedule = BatchSizeSchedule(plan)                                                  # doctest: +SKIP
>>> L.Trainer(callbacks=[schedule], max_epochs=10).fit(module, DataLoader(ds, batch_size=64))  # doctest: +SKIP

The schedules are hasten's (:mod:`hasten.schedules`): ``plan(examples seen) -> Plan(global batch, LR multiplier,
momentum)``; the global batch is dataloader batch × ``accumulate_grad_batches`` × processes, so each planned batch
must be a multiple of dataloader batch × processes (checked when training starts). ``adaptive`` follows the estimate
of the :class:`NoiseScaleMonitor` in the trainer's callbacks.

When it changes (Lightning 2.x, checked against 2.6): Lightning reads ``accumulate_grad_batches`` afresh for every
batch, but it zeroes the gradient at epoch-local batch indices that are multiples of it and steps at the next
multiple (and at an epoch's last batch). So a new value is set only at the first batch of an optimizer step whose
index is a multiple of the new value (always true at an epoch's start); until then the current one stays, with its
LR multiplier: a change planned mid-epoch waits at most new/old − 1 steps (when new is a multiple of old).
:attr:`BatchSizeSchedule.history` records the global step of each change. (Lightning's own
GradientAccumulationScheduler changes it only at epoch starts.)

The LR multiplier is applied around each ``optimizer.step()`` (a step pre-hook multiplies each group's LR, a post-hook
puts it back), so it multiplies whatever the LR scheduler set and the scheduler never sees it (nor does
LearningRateMonitor: the multiplier is logged as ``batch/lr_mult``, with ``batch/size``, on the steps Lightning
writes to its loggers and at each epoch's end). A planned momentum is set on the optimizer
(SGD's momentum, Adam's β₁). Progress (examples seen), the current accumulation and the schedule's own state are
the callback's checkpoint state, so ``fit(ckpt_path=...)`` continues the same plan.
"""
from __future__ import annotations

import math
from typing import Callable

import lightning.pytorch as pl

from hasten.errors import HastenError
from hasten.integrations.lightning import (NoiseScaleMonitor, check_automatic, first_dim, loader_dataset_size,
                                             logging_step)
from hasten.schedules.batch import Adaptive
from hasten.train.batch_callback import set_momentum


class BatchSizeSchedule(pl.Callback):
    """Sets ``trainer.accumulate_grad_batches``, the LR multiplier and momentum from a hasten batch schedule.

    Args:
        schedule: ``increase_batch(...)``, ``adaptive(...)``, ``stages(...)`` or ``fixed(...)`` (global batches).
        monitor: the :class:`NoiseScaleMonitor` whose estimate ``plan`` receives (default: the one among the
            trainer's callbacks; ``adaptive`` needs one).
        micro_batch_size: examples per dataloader batch (default: the train dataloader's ``batch_size``).
        batch_size_fn: ``fn(batch) -> int`` examples in a batch, for the progress count (default: first dim).
    """

    def __init__(self, schedule, *, monitor: NoiseScaleMonitor | None = None, micro_batch_size: int | None = None,
                 batch_size_fn: Callable[[object], int] | None = None):
        if not callable(getattr(schedule, "plan", None)):
            raise HastenError(f"{schedule!r} is not a batch schedule: use hasten.schedules.increase_batch, adaptive, "
                              "stages or fixed")
        self.schedule, self.monitor = schedule, monitor
        self.micro_batch_size, self.batch_size_fn = micro_batch_size, batch_size_fn or first_dim
        self.examples = 0.0  # global examples trained on so far: the schedules' progress
        self.accumulate: int | None = None  # the accumulation in force (None until training starts)
        self.lr_mult = 1.0
        self.history: list[dict] = []  # one row per change: step, examples, batch_size, accumulate, lr_mult
        self.multiple, self.world = 1, 1
        self._handles: list = []
        self._unscaled: dict[int, list] = {}  # per optimizer: its groups' LRs while a step runs scaled
        self._depth: dict[int, int] = {}  # per optimizer: step() calls in progress

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_automatic(pl_module, "BatchSizeSchedule")
        if getattr(trainer.strategy, "handles_gradient_accumulation", False):
            raise HastenError(f"{type(trainer.strategy).__name__} accumulates gradients itself and cannot change "
                              "accumulate_grad_batches during training: use strategy='ddp' or a single device")
        from lightning.pytorch.callbacks import GradientAccumulationScheduler

        if any(isinstance(cb, GradientAccumulationScheduler) for cb in trainer.callbacks):
            raise HastenError("BatchSizeSchedule sets accumulate_grad_batches itself: remove the "
                              "GradientAccumulationScheduler callback")
        if self.monitor is None:
            self.monitor = next((cb for cb in trainer.callbacks if isinstance(cb, NoiseScaleMonitor)), None)
        if isinstance(self.schedule, Adaptive) and self.monitor is None:
            raise HastenError("an adaptive batch schedule follows the noise scale: add NoiseScaleMonitor() to "
                              "Trainer(callbacks=[...]) before BatchSizeSchedule")
        self._remove_hooks()
        self._unscaled, self._depth = {}, {}
        for optimizer in trainer.optimizers:
            self._handles += [optimizer.register_step_pre_hook(self._scale_lr),
                              optimizer.register_step_post_hook(self._restore_lr)]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        micro = self.micro_batch_size or loader_batch_size(trainer.train_dataloader)
        if not micro:
            raise HastenError("BatchSizeSchedule cannot tell the train dataloader's batch size: pass "
                              "BatchSizeSchedule(..., micro_batch_size=N)")
        self.world = trainer.world_size
        self.multiple = micro * self.world
        self.schedule.validate(loader_dataset_size(trainer.train_dataloader), self.multiple)
        if self.accumulate is None:  # a new run: the first step's plan (before any callback's first batch)
            self._apply(trainer, self.schedule.plan(self.examples, self._b_simple()))
        trainer.accumulate_grad_batches = self.accumulate  # resumed: the one in force at the checkpoint

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # the first batch of a step: the last one has stepped
            plan = self.schedule.plan(self.examples, self._b_simple())
            if batch_idx % self._accumulation(plan) == 0:  # Lightning zeroes the gradient here under the new value
                self._apply(trainer, plan)
            if logging_step(trainer):
                self._log(pl_module, on_step=True)
        self.examples += self.batch_size_fn(batch) * self.world

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(pl_module, on_step=False)

    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        pl_module.log_dict({"batch/size": float(self.accumulate * self.multiple), "batch/lr_mult": self.lr_mult},
                           on_step=on_step, on_epoch=not on_step, batch_size=1)

    def _accumulation(self, plan) -> int:
        if plan.batch_size % self.multiple:
            raise HastenError(f"the batch schedule planned batch {plan.batch_size}, not a multiple of dataloader "
                              f"batch × processes = {self.multiple}: pass multiple={self.multiple} to it")
        return plan.batch_size // self.multiple

    def _apply(self, trainer: pl.Trainer, plan) -> None:
        want = self._accumulation(plan)
        if want != self.accumulate:
            trainer.accumulate_grad_batches = want
            self.history.append(dict(step=trainer.global_step, examples=self.examples, batch_size=plan.batch_size,
                                     accumulate=want, lr_mult=plan.lr_mult))
        self.accumulate, self.lr_mult = want, float(plan.lr_mult)
        if plan.momentum is not None:
            for optimizer in trainer.optimizers:
                set_momentum(optimizer, plan.momentum)

    def _b_simple(self) -> float:
        return self.monitor.estimate.b_simple if self.monitor is not None else math.nan

    def _scale_lr(self, optimizer, args, kwargs) -> None:
        # An optimizer subclass whose step() calls super().step() runs the hooks twice, nested: scale once.
        key = id(optimizer)
        self._depth[key] = self._depth.get(key, 0) + 1
        if self._depth[key] == 1 and self.lr_mult != 1.0:
            self._unscaled[key] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * self.lr_mult

    def _restore_lr(self, optimizer, args, kwargs) -> None:
        key = id(optimizer)
        self._depth[key] -= 1
        if self._depth[key] == 0:
            for group, lr in zip(optimizer.param_groups, self._unscaled.pop(key, ())):
                group["lr"] = lr

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def state_dict(self) -> dict:
        return {"examples": self.examples, "accumulate": self.accumulate, "lr_mult": self.lr_mult,
                "history": [dict(row) for row in self.history], "schedule": self.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.examples, self.accumulate = float(state["examples"]), state["accumulate"]
        self.lr_mult, self.history = float(state["lr_mult"]), [dict(row) for row in state["history"]]
        self.schedule.load_state_dict(state["schedule"])


def loader_batch_size(loader) -> int | None:
    """Examples per batch: the DataLoader's ``batch_size``, else its batch sampler's (also when that sampler is
    passed as ``sampler=`` with ``batch_size=None``)."""
    for source in (loader, getattr(loader, "batch_sampler", None), getattr(loader, "sampler", None)):
        size = getattr(source, "batch_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None
