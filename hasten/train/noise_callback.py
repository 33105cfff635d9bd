"""The gradient noise scale measured during training, as a loop callback.

McCandlish, Kaplan, Amodei et al. 2018 (arXiv:1812.06162): B_simple = tr(Σ)/|G|² (eq. 2.9) from squared gradient
norms at two batch sizes taken at the same parameters (eq. A.2). Two sources:

- ``micro``: the micro-batches of gradient accumulation (B_small = micro-batch, B_big = batch). No extra compute:
  a :class:`hasten.measure.MicroBatchTap` reads each micro-batch's own gradient as the backward passes run. A
  step whose micro-batches differ in size (the truncated last batch of an epoch) is not measured.
- ``per_example``: per-example gradient norms (B_small = 1, lowest variance) of the step's batch via torch.func,
  at the cost of about one extra forward and backward per step (dropout draws as in training; BatchNorm is refused).

Both measure in ``before_optimizer_step``: the accumulated gradient, before clipping and the optimizer step. A
non-finite step is counted as skipped and left out of the sums.
"""
from __future__ import annotations

import torch

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate
from hasten.train.events import Callback, LoopState

SOURCES = ("micro", "per_example")


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
        source: "micro" (needs micro_batch_size < batch_size) or "per_example".
        horizon: EMA horizon in examples; None = running mean over the run.
        precondition: measure Adam-preconditioned gradients g/(√v̂+ε) instead of raw ones (micro source only).
    """

    name = "noise"

    def __init__(self, source: str = "micro", horizon: float | None = None, precondition: bool = False):
        if source not in SOURCES:
            raise HastenError(f"noise={source!r}: choose {' or '.join(SOURCES)}")
        if precondition and source != "micro":
            raise HastenError("precondition=true works with noise=micro only: set noise=micro or precondition=false")
        self.source, self.horizon, self.precondition = source, horizon, precondition
        self.noise: NoiseScale | None = None
        self.tap = None

    def on_fit_start(self, state: LoopState) -> None:
        self.noise = NoiseScale(horizon=self.horizon, dataset_size=state.train_size)
        if self.source == "micro":
            from hasten.measure import MicroBatchTap

            if self.precondition and not isinstance(state.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise HastenError("precondition=true needs optimizer=adam (it divides by Adam's √v̂+ε)")
            optimizer = state.optimizer if self.precondition else None
            self.tap = MicroBatchTap(state.model, self.noise, precondition=optimizer)

    def on_batch_ready(self, state: LoopState) -> None:
        if self.tap is not None:
            self.tap.discard()  # backwards since the last step (SAM's second pass) are not this step's micro-batches

    def on_before_optimizer_step(self, state: LoopState) -> None:
        inputs, targets = state.batch[:2]
        if self.source == "micro":
            self.tap.step(len(inputs), micro_batch_sizes=micro_batch_sizes(len(inputs), state.micro_batch_size))
        elif len(inputs) > 1:
            from hasten.measure.per_example import per_example_sq_norms

            sq_norms, big_sq = per_example_sq_norms(state.model, state.loss_fn, inputs, targets)
            self.noise.update(sq_norms.double().mean().item(), 1, big_sq.item(), len(inputs))
        est = self.estimate()
        state.metrics.update({"noise/b_simple": est.b_simple, "noise/b_simple_se": est.b_simple_se,
                              "noise/grad_sq": est.grad_sq, "noise/trace_cov": est.trace_cov,
                              "noise/skipped": est.n_skipped})

    def _estimator(self) -> NoiseScale:
        return self.tap.noise if self.tap is not None else self.noise  # the tap's hands over its last step first

    def estimate(self) -> NoiseScaleEstimate:
        return self._estimator().compute()

    def on_fit_end(self, state: LoopState) -> None:
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def state_dict(self) -> dict:
        return self._estimator().state_dict()

    def load_state_dict(self, state: dict) -> None:
        (self.tap or self.noise).load_state_dict(state)
