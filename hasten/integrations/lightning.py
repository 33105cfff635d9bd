"""The gradient noise scale B_simple = tr(Σ)/|G|² during Lightning's ``trainer.fit``, as a callback.

McCandlish, Kaplan, Amodei et al. 2018 (arXiv:1812.06162): squared gradient norms at two batch sizes taken at the
same parameters (eq. A.2), read from the backward passes Lightning runs anyway:

>>> monitor = NoiseScaleMonitor()                                                   # doctest: +SKIP
>>> trainer = L.Trainer(accumulate_grad_batches=4, callbacks=[monitor])             # doctest: +SKIP
>>> trainer.fit(module, loader); monitor.estimate.b_simple, monitor.estimate.interval  # doctest: +SKIP

Sources (``source="auto"`` picks the first that applies):

- ``ddp``: under a DDP strategy on 2+ processes, B_small = one rank's examples of the step, B_big = all ranks'
  (:func:`hasten.measure.attach_ddp_noise`, riding on DDP's own all-reduce; the same estimate on every rank).
- ``micro``: with ``accumulate_grad_batches >= 2``, B_small = a micro-batch (one dataloader batch), B_big = the
  accumulated batch (:class:`hasten.measure.MicroBatchTap`).
- ``per_example``: otherwise, B_small = 1 (:class:`hasten.measure.PerExampleTap`: module hooks; refuses BatchNorm
  and parameters outside the layers it covers).

Which gradient it sees, exactly (Lightning 2.x, checked against 2.6): it measures in ``on_after_backward`` of the
last micro-batch of each optimizer step (the one for which Lightning does not accumulate): the accumulated gradient
after DDP's all-reduce, before gradient clipping. Lightning divides each micro-batch loss by
``accumulate_grad_batches``, which is passed on as the divisor (so a short last cycle of an epoch, k' < k equal
micro-batches, is measured right; unequal micro-batches are skipped). Under fp16 AMP the gradient there is still
multiplied by the GradScaler's scale, as are the micro-batch gradients the hooks saw, and the scale is divided out.
``on_before_optimizer_step`` is not used: Lightning calls ``scaler.unscale_`` before it, while the hooks had seen
scaled gradients. bf16 has no scaler.

Logged through ``pl_module.log_dict``, so they reach the loggers and ``trainer.callback_metrics``: ``noise/b_simple``,
``noise/b_simple_lo`` and ``noise/b_simple_hi`` (:attr:`NoiseScaleEstimate.interval`), ``noise/grad_sq``,
``noise/trace_cov``, on the steps Lightning writes to its loggers (``Trainer(log_every_n_steps=...)``: ``self.log``
costs about 0.2 ms a value, a few percent of a small model's step) and at each epoch's end; ``.estimate`` is always
current. The estimate and the phase of ``every``
are the callback's checkpoint state, so ``fit(ckpt_path=...)`` continues the same estimate.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate, load_meter_state, meter_state
from hasten.measure.tap import check_meter_options

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
except ImportError as error:  # pragma: no cover - the extra is not installed
    raise HastenError("hasten.integrations.lightning needs Lightning: pip install 'hasten[lightning]'") from error

SOURCES = ("auto", "micro", "ddp", "per_example")


def first_dim(batch) -> int:
    """Examples in a batch: the first dimension of its first tensor, looking into tuples, lists and dicts."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else 0
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = first_dim(item)
        if n:
            return n
    return 0


def check_automatic(pl_module: pl.LightningModule, who: str) -> None:
    if not pl_module.automatic_optimization:
        raise HastenError(
            f"{who} follows Lightning's automatic optimization, but this module sets automatic_optimization=False: "
            "call hasten.measure.MicroBatchTap's step() in your training_step before optimizer.step() instead"
        )


def world_size(trainer: pl.Trainer) -> int:
    """Processes the gradient is averaged over; raises for strategies whose gradients the meters cannot read."""
    strategy = trainer.strategy
    if getattr(strategy, "handles_gradient_accumulation", False) or not isinstance(
        strategy, (SingleDeviceStrategy, DDPStrategy)
    ):
        raise HastenError(
            f"NoiseScaleMonitor supports single-device and DDP strategies, not {type(strategy).__name__} (it shards "
            "or accumulates gradients itself): use strategy='ddp', or a single device"
        )
    return trainer.world_size if isinstance(strategy, DDPStrategy) else 1


def loss_scale(trainer: pl.Trainer) -> float:
    """The factor the gradients carry before ``scaler.unscale_``: the fp16 GradScaler's scale, else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0


def steps_now(trainer: pl.Trainer) -> bool:
    """Whether the backward that just ran is the last of an optimizer step (Lightning's own test)."""
    return not trainer.fit_loop._should_accumulate()


def logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning writes to its loggers after the current step (``log_every_n_steps``). ``self.log`` costs
    about 0.2 ms a value, a few percent of a small model's step, so the callbacks log on those steps only (and at
    each epoch's end)."""
    connector = getattr(trainer, "_logger_connector", None)
    return connector.should_update_logs if connector is not None else True


def find_batchnorm(module: torch.nn.Module) -> str | None:
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            return name or type(m).__name__
    return None


def resolve_source(source: str, world: int, accumulate: int, module: torch.nn.Module) -> str:
    """The source to measure with, or a HastenError naming what to change."""
    if source == "auto":
        source = "ddp" if world > 1 else "micro" if accumulate >= 2 else "per_example"
        if source == "per_example" and find_batchnorm(module) is not None:
            raise HastenError(
                f"NoiseScaleMonitor needs two batch sizes at the same parameters, but accumulate_grad_batches=1 on one "
                f"device, and per-example gradients are undefined with BatchNorm ({find_batchnorm(module)}): set "
                "Trainer(accumulate_grad_batches=2 or more), or train on 2+ devices with strategy='ddp'"
            )
    if source == "ddp" and world < 2:
        raise HastenError("source='ddp' measures across DDP processes: use strategy='ddp' with devices >= 2, "
                          "or source='micro' with accumulate_grad_batches >= 2")
    if source == "micro" and accumulate < 2:
        raise HastenError(f"source='micro' needs Trainer(accumulate_grad_batches=2 or more), got {accumulate}: "
                          "raise it, or use source='per_example'")
    if source == "per_example" and world > 1:
        raise HastenError("source='per_example' measures one process: under DDP use source='ddp' (or 'auto')")
    return source


class NoiseScaleMonitor(pl.Callback):
    """Streams B_simple into a :class:`NoiseScale` during ``trainer.fit`` (see the module docstring).

    Args:
        source: "auto", "micro", "ddp" or "per_example".
        every: measure one optimizer step in ``every`` (the estimate stays unbiased, its variance grows by about
            that factor, the meter's cost shrinks by it).
        horizon: EMA horizon in examples; None = running mean over the run.
        small: micro source: "first" reads the first micro-batch's gradient, "all" every micro-batch's.
        dataset_size: D for the finite-population correction of batches drawn without replacement; "auto" = the
            length of the train dataloader's dataset (None when its sampler draws with replacement or it has none).
        batch_size_fn: ``fn(batch) -> int`` examples in a dataloader batch (default: the first tensor's first dim).
    """

    def __init__(self, source: str = "auto", every: int = 1, horizon: float | None = None, *,
                 small: str = "first", dataset_size: int | str | None = "auto",
                 batch_size_fn: Callable[[object], int] | None = None):
        if source not in SOURCES:
            raise HastenError(f"source={source!r}: choose one of {', '.join(SOURCES)}")
        check_meter_options(every, small)
        self.source, self.every, self.small = source, every, small
        self.dataset_size, self.batch_size_fn = dataset_size, batch_size_fn or first_dim
        self.noise = NoiseScale(horizon=horizon)
        self.meter = None  # MicroBatchTap, DDPNoiseState or PerExampleTap: all feed self.noise
        self.source_used: str | None = None
        self._steps = 0  # optimizer steps seen: the phase of `every`, kept while no meter is attached
        self._cycle: list[int] = []  # sizes of this optimizer step's micro-batches that ran a backward
        self._divisors: set[int] = set()  # what Lightning divided their losses by
        self._size = 0  # examples in the batch being run
        self._world = 1

    @property
    def estimate(self) -> NoiseScaleEstimate:
        return self.noise.compute()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        check_automatic(pl_module, "NoiseScaleMonitor")
        self._world = world_size(trainer)
        self._detach()
        self._cycle, self._divisors = [], set()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.dataset_size == "auto":
            self.noise.dataset_size = loader_dataset_size(trainer.train_dataloader)
        else:
            self.noise.dataset_size = self.dataset_size

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the source and attach its meter, at the first batch: a BatchSizeSchedule sets the accumulation
        in its on_train_start, which may run after this callback's."""
        source = self.source_used if self.source == "auto" and self.source_used else self.source  # resumed: the same
        self.source_used = resolve_source(source, self._world, trainer.accumulate_grad_batches, pl_module)
        if self.source_used == "micro":
            from hasten.measure.tap import MicroBatchTap

            self.meter = MicroBatchTap(pl_module, self.noise, every=self.every, small=self.small)
        elif self.source_used == "ddp":
            from hasten.measure.ddp import attach_ddp_noise

            fn = self.batch_size_fn
            try:
                self.meter = attach_ddp_noise(trainer.strategy.model, self.noise, every=self.every,
                                              batch_size_fn=lambda args, kwargs: fn(args[0]) if args else 0)
            except RuntimeError as error:  # DDP takes one communication hook
                raise HastenError(f"NoiseScaleMonitor cannot register its DDP communication hook ({error}): "
                                  "remove DDPStrategy(ddp_comm_hook=...)") from error
        else:
            self.meter = per_example_tap(pl_module, self.noise, self.every)
        self.meter.steps = self._steps

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.meter is None:
            self._attach(trainer, pl_module)
        if not self._cycle:
            self.meter.discard()  # backwards and forwards outside this step's micro-batches
        self._size = self.batch_size_fn(batch)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.meter is None:
            return
        self._cycle.append(self._size)
        self._divisors.add(trainer.accumulate_grad_batches)
        if not steps_now(trainer):
            return
        sizes, divisors = self._cycle, self._divisors
        self._cycle, self._divisors = [], set()
        self._measure(trainer, sizes, divisors.pop() if len(divisors) == 1 else None)
        self._steps = self.meter.steps
        if self.noise.n_steps and logging_step(trainer):
            self._log(pl_module, on_step=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.noise.n_steps:  # the latest estimate, also when the run ends between two logging steps
            self._log(pl_module, on_step=False)

    def _log(self, pl_module: pl.LightningModule, on_step: bool) -> None:
        est = self.noise.compute()
        low, high = est.interval
        pl_module.log_dict({"noise/b_simple": est.b_simple, "noise/b_simple_lo": low, "noise/b_simple_hi": high,
                            "noise/grad_sq": est.grad_sq, "noise/trace_cov": est.trace_cov},
                           on_step=on_step, on_epoch=not on_step, batch_size=1)

    def _measure(self, trainer: pl.Trainer, sizes: list[int], divisor: int | None) -> bool:
        scale, meter = loss_scale(trainer), self.meter
        if divisor is None:  # accumulate_grad_batches changed inside the step: its losses are not comparable
            meter.discard()
            meter.steps += 1
            return False
        if self.source_used == "micro":
            return meter.step(sum(sizes), loss_scale=scale, accumulation_steps=divisor, micro_batch_sizes=sizes)
        if self.source_used == "ddp":
            if len(set(sizes)) != 1:  # the local gradient is not the local mean: skip on every rank alike
                meter.discard()
                return meter.step()
            # The local gradient is Σ_j ∇(L_j/divisor) = (k'/divisor)·(the local mean) over k' equal micro-batches.
            return meter.step(sum(sizes), loss_scale=scale * len(sizes) / divisor)
        return meter.step(sum(sizes), loss_scale=scale, accumulation_steps=divisor)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self._cycle and self.meter is not None:  # a step Lightning took without our last-backward test saying so
            self._cycle, self._divisors = [], set()
            self.meter.discard()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._detach()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._detach()

    def _detach(self) -> None:
        if self.meter is not None and hasattr(self.meter, "remove"):
            self.meter.remove()  # tensor/module hooks (DDP's communication hook stays with its wrapper)
        self.meter = None

    def state_dict(self) -> dict:
        return {"source": self.source_used, "meter": meter_state(self.noise, self._steps)}

    def load_state_dict(self, state: dict) -> None:
        self._steps = load_meter_state(self.noise, state["meter"])
        self.source_used = state["source"]
        if self.meter is not None:
            self.meter.steps = self._steps


def loader_dataset_size(loader) -> int | None:
    """Examples a batch is drawn from without replacement, or None (sampling with replacement, unsized data)."""
    if getattr(getattr(loader, "sampler", None), "replacement", False):
        return None
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def per_example_tap(module: pl.LightningModule, noise: NoiseScale, every: int):
    """A :class:`hasten.measure.PerExampleTap` on ``module``, or a HastenError naming what to change."""
    name = find_batchnorm(module)
    if name is not None:
        raise HastenError(f"per-example gradients are undefined with BatchNorm ({name}): set "
                          "Trainer(accumulate_grad_batches=2 or more) for the micro-batch source, or replace "
                          "BatchNorm with GroupNorm/LayerNorm")
    try:
        from hasten.measure.hook_tap import PerExampleTap, uncovered_parameters
    except ImportError as error:
        raise HastenError("this hasten has no per-example tap: set Trainer(accumulate_grad_batches=2 or more) "
                          "for the micro-batch source") from error
    uncovered = uncovered_parameters(module)
    if uncovered:
        shown = ", ".join(uncovered[:5]) + (", ..." if len(uncovered) > 5 else "")
        raise HastenError(f"the per-example source cannot see the gradient of {shown}: set "
                          "Trainer(accumulate_grad_batches=2 or more) for the micro-batch source")
    return PerExampleTap(module, noise, every=every)


from hasten.integrations.lightning_batch import BatchSizeSchedule  # noqa: E402  (it uses the helpers above)

__all__ = ["BatchSizeSchedule", "NoiseScaleMonitor", "first_dim"]
