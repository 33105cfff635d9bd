"""The gradient noise scale measured during training, as a loop callback.

McCandlish, Kaplan, Amodei et al. 2018 (arXiv:1812.06162): B_simple = tr(Σ)/|G|² (eq. 2.9) from squared gradient
norms at two batch sizes taken at the same parameters (eq. A.2). Two sources:

- ``micro``: the micro-batches of gradient accumulation (B_small = micro-batch, B_big = batch). No extra compute:
  a :class:`hasten.measure.MicroBatchTap` reads each micro-batch's own gradient as the backward passes run. A
  step whose micro-batches differ in size (the truncated last batch of an epoch) is not measured.
- ``per_example``: per-example gradient norms (B_small = 1, lowest variance) of the step's batch via torch.func,
  at the cost of about one extra forward and backward per step (dropout draws as in training; BatchNorm is refused).
- ``ddp``: the ranks of DistributedDataParallel (B_small = a rank's shard, B_big = the global batch) via
  :func:`hasten.measure.attach_ddp_noise`, riding on DDP's own all-reduce; the estimate is the same on every rank.
  Under torchrun ``micro`` (the default) means ``ddp``; ``per_example`` is refused (ranks would disagree). On a step
  whose shards differ by one example the loop weights each rank's gradient by W·b_r/B (so their average is the
  batch mean); the meter's pair is then off by a relative O(1/b_r²): negligible.

Both measure in ``before_optimizer_step``: the accumulated gradient, before clipping and the optimizer step. A
non-finite step is counted as skipped and left out of the sums.
"""
from __future__ import annotations

import torch

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate, load_meter_state
from hasten.train.events import Callback, LoopState

SOURCES = ("micro", "per_example", "ddp")


def noise_source(noise: str, world: int) -> str:
    """The source to measure with in a run of ``world`` processes (or "off"): micro becomes ddp under DDP."""
    if noise not in (*SOURCES, "off"):
        raise HastenError(f"noise={noise!r}: choose micro, per_example, ddp or off")
    if world > 1 and noise == "per_example":
        raise HastenError("noise=per_example measures one process: under torchrun use noise=ddp (or micro, the same "
                          "there) or noise=off")
    if world == 1 and noise == "ddp":
        raise HastenError("noise=ddp measures across DDP processes: launch with torchrun --nproc_per_node=2 or more, "
                          "or use noise=micro in one process")
    return "ddp" if world > 1 and noise == "micro" else noise


def horizon_from_config(cfg) -> float | None:
    """``noise_horizon`` in examples: negative = running mean (None), 0 = a fifth of the run's examples."""
    if cfg.noise_horizon < 0:
        return None
    return cfg.noise_horizon or cfg.steps * cfg.batch_size / 5


def micro_batch_sizes(batch: int, micro: int) -> list[int]:
    """Sizes of ``batch`` split into chunks of ``micro`` (0 = one chunk); the last one may be smaller."""
    micro = micro or batch
    return [micro] * (batch // micro) + ([batch % micro] if batch % micro else [])


class NoiseScaleCallback(Callback):
    """Streams B_simple into a :class:`NoiseScale` and adds ``noise/*`` keys to every step's row.

    Args:
        source: "micro" (needs micro_batch_size < batch_size), "per_example" or "ddp" (under torchrun).
        horizon: EMA horizon in examples; None = running mean over the run.
        precondition: measure Adam-preconditioned gradients g/(√v̂+ε) instead of raw ones (micro source only).
        every: measure one optimizer step in ``every`` (micro and ddp sources): the meter's cost shrinks by that
            factor, the estimate stays unbiased and its variance grows by about that factor.
        small: micro source: "first" reads the first micro-batch's gradient, "all" every micro-batch's (lower
            variance, one more read of the gradient per micro-batch).
    """

    name = "noise"

    def __init__(self, source: str = "micro", horizon: float | None = None, precondition: bool = False,
                 every: int = 1, small: str = "first"):
        if source not in SOURCES:
            raise HastenError(f"noise={source!r}: choose {' or '.join(SOURCES)}")
        if precondition and source != "micro":
            where = " in one process (not under torchrun)" if source == "ddp" else ""
            raise HastenError(f"precondition=true works with noise=micro{where} only: set precondition=false")
        if every < 1:
            raise HastenError(f"noise_every={every}: give a positive number of steps (1 = measure every step)")
        if small not in ("first", "all"):
            raise HastenError(f"noise_small={small!r}: choose first (one micro-batch read per step) or all")
        self.source, self.horizon, self.precondition = source, horizon, precondition
        self.every, self.small = every, small
        self.noise: NoiseScale | None = None
        self.meter = None  # MicroBatchTap (micro) or DDPNoiseState (ddp): both feed self.noise

    def on_fit_start(self, state: LoopState) -> None:
        self.noise = NoiseScale(horizon=self.horizon, dataset_size=state.train_size)
        if self.source == "micro":
            from hasten.measure import MicroBatchTap

            if self.precondition and not isinstance(state.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise HastenError("precondition=true needs optimizer=adam (it divides by Adam's √v̂+ε)")
            optimizer = state.optimizer if self.precondition else None
            self.meter = MicroBatchTap(state.model, self.noise, precondition=optimizer, every=self.every,
                                       small=self.small)
        elif self.source == "ddp":
            from hasten.measure import attach_ddp_noise

            if not isinstance(state.net, torch.nn.parallel.DistributedDataParallel):
                raise HastenError("noise=ddp needs a run under torchrun with 2 or more processes: use noise=micro")
            self.meter = attach_ddp_noise(state.net, self.noise, every=self.every)

    def on_batch_ready(self, state: LoopState) -> None:
        if self.meter is not None:  # backwards and all-reduces since the last step (SAM's second pass) are not
            self.meter.discard()  # this step's micro-batches

    def on_before_optimizer_step(self, state: LoopState) -> None:
        inputs, targets = state.batch[:2]
        if self.source == "micro":
            self.meter.step(len(inputs), micro_batch_sizes=micro_batch_sizes(len(inputs), state.micro_batch_size))
        elif self.source == "ddp":
            self.meter.step(len(inputs))  # every rank, with its shard's size
        elif len(inputs) > 1 and state.step % self.every == 0:  # state.step: finished steps, kept on resume
            from hasten.measure.per_example import per_example_sq_norms

            sq_norms, big_sq = per_example_sq_norms(state.model, state.loss_fn, inputs, targets)
            self.noise.update(sq_norms.double().mean().item(), 1, big_sq.item(), len(inputs))
        est = self.estimate()
        state.metrics.update({"noise/b_simple": est.b_simple, "noise/b_simple_se": est.b_simple_se,
                              "noise/b_simple_lo": est.b_simple_lo, "noise/b_simple_hi": est.b_simple_hi,
                              "noise/grad_sq": est.grad_sq, "noise/trace_cov": est.trace_cov,
                              "noise/skipped": est.n_skipped})

    def estimate(self) -> NoiseScaleEstimate:
        return self.noise.compute()

    def on_fit_end(self, state: LoopState) -> None:
        if self.source == "micro" and self.meter is not None:
            self.meter.remove()  # the tap's tensor hooks (DDP's communication hook stays with the DDP wrapper)
        self.meter = None

    def state_dict(self) -> dict:
        return self.meter.state_dict() if self.meter is not None else self.noise.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.meter is not None:
            self.meter.load_state_dict(state)  # the estimate and the phase of `every`
        else:
            load_meter_state(self.noise, state)
