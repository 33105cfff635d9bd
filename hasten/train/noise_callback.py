"""The gradient noise scale measured during training, as a loop callback.

McCandlish, Kaplan, Amodei et al. 2018 (arXiv:1812.06162): B_simple = tr(Σ)/|G|² (eq. 2.9) from squared gradient
norms at two batch sizes taken at the same parameters (eq. A.2). Sources:

- ``hooks``: per-example gradient norms (B_small = 1, the lowest variance) read by layer hooks during the step's own
  backward (:class:`hasten.measure.PerExampleTap`): about one more weight-gradient computation per measured step.
  Covers Linear, Conv, Embedding and normalization layers; no BatchNorm.
- ``micro``: micro-batches (B_small = B/4, B_big = B) read by a :class:`hasten.measure.MicroBatchTap`. Only the
  steps it measures are split into 4 micro-batches (or the configured ``micro_batch_size``, if smaller); the others
  run one backward of the whole batch, as with ``noise=off``. Micro-batches of unequal sizes (a batch size that 4
  does not divide, the truncated last batch of an epoch) are measured too, with B_small their harmonic mean.
- ``per_example``: per-example gradient norms via torch.func, about one extra forward and backward per measured
  step (dropout draws as in training; BatchNorm is refused).
- ``ddp``: the ranks of DistributedDataParallel (B_small = a rank's shard, B_big = the global batch) via
  :func:`hasten.measure.attach_ddp_noise`, riding on DDP's own all-reduce; the estimate is the same on every rank.
  On a step whose shards differ by one example the loop weights each rank's gradient by W·b_r/B (so their average
  is the batch mean); the meter's pair is then off by a relative O(1/b_r²): negligible.
- ``auto`` (the default): ``ddp`` under torchrun; in one process ``hooks`` when every trainable parameter is in a
  layer the tap covers, there is no BatchNorm and each example is one vector to every layer (an MLP); else
  ``micro`` (convolutions and sequences: there the split is the cheaper source). The choice and why are in
  config.json.

Which steps are measured: one in ``every``, the first being step ``every`` (so ``noise_every`` larger than the run
measures nothing and trains exactly as ``noise=off``). With ``budget`` > 0 the callback times its own cost, the
extra wall time of a measured step over a plain one (the median of the last few measured steps' excess over the
median of the plain steps just before each), and measures one step in N = ⌈cost/budget⌉ (never fewer than
``every``), so that the meter's share of the run's time stays near ``budget``; N is logged every step as
``noise/every``. Medians, not means: a step slowed by the OS or the allocator moves neither the plain time nor the
cost. The timings read the host clock at ``batch_start`` and ``batch_end``; on a GPU they are honest because the
loop already waits for the step's loss each step (no extra host sync). Under torchrun the ranks' cost estimates are
summed in the loop's loss all-reduce so every rank picks the same N.

Reproducibility with ``budget`` > 0: which steps get measured depends on wall-clock timings, so two runs of the same
command may measure different steps. N, the phase and the timing state are saved in checkpoints, so a resumed run
continues with the N and phase it stopped at, but its later choices follow its own timings. With the hooks and
per_example sources the weights do not depend on which steps are measured (the meter only reads); with micro, a
measured step sums its micro-batches in another order (and with ddp its last bucket goes through the meter's
all-reduce), so the weights can differ in the last bits. Set ``noise_budget=0`` for runs and resumes that are
bit-identical including the noise estimate.

Steps whose batch a method marks as not a uniform sample of the training set (``state.skewed_batch``: SortaGrad's
ordered first epoch, selective backprop's high-loss subsets) are not measured: the estimate stays that of uniform
batches. A measurement due on such a step moves to the next one.

The measurement is taken at the last micro-batch's ``after_backward`` (before AMP unscaling, clipping and the
optimizer step); the loop puts this callback after every other one so that it sees the batch the methods made.
A non-finite step is counted as skipped and left out of the sums.
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate
from hasten.train.events import Callback, LoopState

SOURCES = ("hooks", "micro", "per_example", "ddp")
CHOICES = ("auto", *SOURCES, "off")
MEASURED_MICRO_BATCHES = 4  # micro source: a measured step's batch is split into this many (B_small = B/4)
START_EVERY = 4  # noise_budget: measure one step in this many until the meter's cost is known
PLAIN_WARMUP, MEASURED_WARMUP = 2, 1  # first steps of each kind left out of the timings (allocations, lazy init)
PLAIN_SAMPLES = 8  # a plain step takes the median time of the last this many plain steps
COST_SAMPLES = 9  # the meter's cost is the median over this many recent measured steps (at least 3)
PROBE = 16  # noise_budget with N = 1: leave one step in this many unmeasured, to keep timing the plain step
MAX_EVERY = 1024


def noise_source(noise: str, world: int) -> str:
    """The source in a run of ``world`` processes, before the model is known: auto and micro become ddp under DDP;
    in one process auto stays auto (:func:`resolve_source` picks with the model)."""
    if noise not in CHOICES:
        raise HastenError(f"noise={noise!r}: choose {', '.join(CHOICES)}")
    if world > 1 and noise in ("per_example", "hooks"):
        raise HastenError(f"noise={noise} measures one process: under torchrun use noise=ddp (or auto or micro, the "
                          "same there) or noise=off")
    if world == 1 and noise == "ddp":
        raise HastenError("noise=ddp measures across DDP processes: launch with torchrun --nproc_per_node=2 or more, "
                          "or use noise=auto in one process")
    return "ddp" if world > 1 and noise in ("auto", "micro") else noise


def resolve_source(noise: str, model: torch.nn.Module, world: int = 1, precondition: bool = False,
                   sample=None, loss_fn=None) -> tuple[str, str]:
    """(source, why): ``noise`` with auto resolved for ``model``: hooks if the per-example tap covers it, else micro.

    ``sample()`` -> (inputs, targets), a few training examples on the model's device: auto then also runs the tap
    once on them with ``loss_fn`` (a layer applied without the batch dimension only shows in a forward), under a
    forked RNG, leaving ``.grad`` as it was.
    """
    source = noise_source(noise, world)
    if source != "auto":
        return source, "chosen by noise=" + noise
    if precondition:
        return "micro", "precondition=true measures micro-batches"
    from hasten.measure import PerExampleTap

    positions = _SeveralPositions(model)
    try:
        tap = PerExampleTap(model)
        try:
            if sample is not None:
                _probe(tap, model, loss_fn, *sample())
        finally:
            tap.remove()
            positions.remove()
    except HastenError as e:
        return "micro", f"the per-example hooks do not apply: {e}"
    if positions.seen if sample is not None else positions.by_type:
        return "micro", ("the layers see several positions per example (convolutions or sequences), where the "
                         "per-example hooks cost 1.4-1.7x a step and 4 micro-batches 1.0x (BENCHMARKS.md)")
    return "hooks", "every trainable parameter is in a layer the per-example hooks cover"


class _SeveralPositions:
    """Whether any Linear/Conv/Embedding layer sees more than one position per example: seen in a forward
    (``seen``), or guessed from the layer types when there is none (``by_type``: any Conv or Embedding).

    The per-example hooks are cheap (‖x‖²‖δ‖² per layer) when each example is one vector; with T positions they
    form each example's gradient or a T×T Gram matrix, and a split into micro-batches costs less: measured with
    ``python benchmarks/bench_meter_cost.py --variants every micro`` on the fashion MLP (hooks 1.37x, split 1.48x a
    plain step), CNN (1.66x vs 0.97x) and shakespeare transformer (1.43x vs 1.02x)."""

    def __init__(self, model: torch.nn.Module):
        from torch import nn

        kinds = (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd)
        layers = [m for m in model.modules() if isinstance(m, kinds)]
        self.by_type = any(not isinstance(m, nn.Linear) for m in layers)
        self.seen = False
        self._handles = [m.register_forward_pre_hook(self._check) for m in layers]

    def _check(self, module, args) -> None:
        from torch import nn

        x = args[0] if args else None
        if not isinstance(x, torch.Tensor):
            return
        if isinstance(module, nn.modules.conv._ConvNd):
            self.seen = True  # a kernel slides over positions
        elif isinstance(module, nn.Embedding):
            self.seen = self.seen or (x.dim() > 1 and x[0].numel() > 1)
        else:
            self.seen = self.seen or (x.dim() > 2 and x[0].numel() // x.shape[-1] > 1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def _probe(tap, model: torch.nn.Module, loss_fn, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    device = inputs.device
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):  # dropout draws nothing from the training RNG
            for p in params:
                p.grad = None
            loss_fn(model(inputs), targets).backward()
            tap.step(len(inputs))
    finally:
        for p, g in zip(params, grads):
            p.grad = g


def horizon_from_config(cfg) -> float | None:
    """``noise_horizon`` in examples: negative = running mean (None), 0 = a fifth of the run's examples."""
    if cfg.noise_horizon < 0:
        return None
    return cfg.noise_horizon or cfg.steps * cfg.batch_size / 5


def split_size(batch: int, micro: int, parts: int = 0) -> int:
    """Examples per backward: ``micro`` (0 = the whole batch), or fewer so the batch makes at least ``parts``."""
    size = micro or max(batch, 1)
    return min(size, max(-(-batch // parts), 1)) if parts > 1 else size


def _arm(meter, on: bool) -> None:
    """Have ``meter`` (which measures the steps where ``steps % every == 0``) measure the next step or not."""
    meter.every, meter.steps = (1, 0) if on else (2, 1)


class NoiseScaleCallback(Callback):
    """Streams B_simple into a :class:`NoiseScale` and adds ``noise/*`` keys to every step's row.

    Args:
        source: "auto", "hooks", "micro", "per_example" or "ddp" (see the module docstring).
        horizon: EMA horizon in examples; None = running mean over the run.
        precondition: measure Adam-preconditioned gradients g/(√v̂+ε) instead of raw ones (micro source only).
        every: measure one optimizer step in ``every`` (with ``budget``: at least every); the estimate stays
            unbiased and its variance grows by about that factor.
        small: micro source: "first" reads the first micro-batch's gradient, "all" every micro-batch's (lower
            variance, one more read of the gradient per micro-batch).
        budget: the share of the step time the meter may take (e.g. 0.03); 0 = measure exactly one step in
            ``every``.
    """

    name = "noise"

    def __init__(self, source: str = "auto", horizon: float | None = None, precondition: bool = False,
                 every: int = 1, small: str = "first", budget: float = 0.0):
        if source not in CHOICES or source == "off":
            raise HastenError(f"noise={source!r}: choose {', '.join(c for c in CHOICES if c != 'off')}")
        if precondition and source not in ("micro", "auto"):
            raise HastenError("precondition=true works with noise=micro in one process only: set precondition=false")
        from hasten.measure.tap import check_meter_options

        check_meter_options(every, small, names=("noise_every", "noise_small"))
        if not 0 <= budget < 1:
            raise HastenError(f"noise_budget={budget}: give the share of step time the meter may take, e.g. 0.03 "
                              "(0 = measure one step in noise_every)")
        self.source, self.horizon, self.precondition = source, horizon, precondition
        self.min_every, self.small, self.budget = every, small, budget
        self.every = max(every, START_EVERY) if budget else every  # N: measure one step in N
        self.wait = self.every - 1  # steps to go before the next measured one
        self.plain_times: list[float] = []  # wall seconds of the last plain (unmeasured) steps
        self.costs: list[float] = []  # recent measured steps' extra time over a plain step, as a fraction of it
        self.timed = [0, 0]  # steps seen for timing: [plain, measured]
        self.in_a_row = 0  # measured steps since the last plain one (PROBE)
        self.noise: NoiseScale | None = None
        self.meter = None  # MicroBatchTap, PerExampleTap or DDPNoiseState: all feed self.noise
        self.measuring, self._started, self._done, self._timed = False, 0.0, False, False

    # ---- setting up ---------------------------------------------------------------------------------------------

    def on_fit_start(self, state: LoopState) -> None:
        from hasten.train import distributed as dist

        self.world = dist.world_size()
        self.noise = NoiseScale(horizon=self.horizon, dataset_size=state.train_size)
        if self.source == "auto":
            self.source, _ = resolve_source("auto", state.model, self.world, self.precondition)
        if self.source == "micro":
            from hasten.measure import MicroBatchTap

            if self.precondition and not isinstance(state.optimizer, (torch.optim.Adam, torch.optim.AdamW)):
                raise HastenError("precondition=true needs optimizer=adam (it divides by Adam's √v̂+ε)")
            optimizer = state.optimizer if self.precondition else None
            self.meter = MicroBatchTap(state.model, self.noise, precondition=optimizer, small=self.small)
        elif self.source == "hooks":
            from hasten.measure import PerExampleTap

            self.meter = PerExampleTap(state.model, self.noise)
        elif self.source == "ddp":
            from hasten.measure import attach_ddp_noise

            if not isinstance(state.net, torch.nn.parallel.DistributedDataParallel):
                raise HastenError("noise=ddp needs a run under torchrun with 2 or more processes: use noise=auto")
            if state.scaler is not None:
                raise HastenError("noise=ddp reads loss-scaled gradients, which precision=fp16 rescales every few "
                                  "steps: use precision=bf16, or noise=off")
            self.meter = attach_ddp_noise(state.net, self.noise)
        elif getattr(state.loss_fn, "terms", None) is not None:  # per_example
            raise HastenError(f"noise=per_example takes each example's own mean loss, which weights examples unlike "
                              f"{state.task.name}'s loss (a mean over a varying number of terms per example): use "
                              "noise=hooks or noise=micro")
        if self.meter is not None:
            _arm(self.meter, False)

    # ---- each step ----------------------------------------------------------------------------------------------

    def on_batch_start(self, state: LoopState) -> None:
        self._started = time.perf_counter()

    def on_batch_ready(self, state: LoopState) -> None:
        """Decide whether this step is measured, after the methods made the batch (this callback fires last)."""
        if self.meter is not None:
            self.meter.discard()  # whatever ran since the last step (SAM's second pass...) is not this step's
        probe = self.budget and self.every == 1 and self.in_a_row >= PROBE - 1
        self.measuring = self.wait == 0 and not state.skewed_batch and not probe
        self._timed, self._done = not state.skewed_batch, False
        if self.measuring:
            if self.meter is not None:
                _arm(self.meter, True)
            if self.source == "micro":
                state.split = MEASURED_MICRO_BATCHES

    def on_after_backward(self, state: LoopState) -> None:
        if not state.last_backward or self._done:
            return
        self._done = True  # the step's last micro-batch: measure here, before unscaling, clipping and SAM
        if self.measuring:
            self._measure(state)
        est = self.estimate()
        state.metrics.update({"noise/b_simple": est.b_simple, "noise/b_simple_se": est.b_simple_se,
                              "noise/b_simple_lo": est.b_simple_lo, "noise/b_simple_hi": est.b_simple_hi,
                              "noise/grad_sq": est.grad_sq, "noise/trace_cov": est.trace_cov,
                              "noise/skipped": est.n_skipped})
        if self.budget and self.world > 1:  # summed over the ranks with the loss: every rank picks the same N
            state.shared["noise/cost"] = self.cost()

    def _measure(self, state: LoopState) -> None:
        inputs, targets = state.batch[:2]
        scale = state.scaler.get_scale() if state.scaler is not None else 1.0  # fp16: the meters unscale
        if self.source == "micro":
            sizes, weights = state.micro_batches
            self.meter.step(len(inputs), loss_scale=scale, micro_batch_sizes=sizes, micro_batch_weights=weights)
        elif self.source == "hooks":
            self.meter.step(len(inputs), loss_scale=scale)
        elif self.source == "ddp":
            self.meter.step(len(inputs))  # every rank, with its shard's size
        elif len(inputs) > 1:
            from hasten.measure.per_example import per_example_sq_norms

            sq_norms, big_sq = per_example_sq_norms(state.model, state.loss_fn, inputs, targets)
            self.noise.update(sq_norms.double().mean().item(), 1, big_sq.item(), len(inputs))
        if self.meter is not None:
            _arm(self.meter, False)
        state.split = 0

    def on_batch_end(self, state: LoopState) -> None:
        if self._timed:
            self._time(time.perf_counter() - self._started)
        if self.measuring:
            self.in_a_row += 1
            if self.budget:
                cost = state.shared.get("noise/cost", math.nan) / self.world if self.world > 1 else self.cost()
                self.every = self.choose_every(cost)
            self.wait = self.every - 1
        else:
            self.in_a_row = 0
            self.wait = max(self.wait - 1, 0)  # a due measurement on a skewed step moves to the next step
        state.metrics.update({"noise/every": self.every, "noise/measured": self.measuring})
        if self.budget:
            state.metrics["noise/cost"] = self.cost()

    # ---- the meter's own cost (noise_budget) ---------------------------------------------------------------------

    def _time(self, seconds: float) -> None:
        kind = int(self.measuring)
        self.timed[kind] += 1
        if kind == 0 and self.timed[0] > PLAIN_WARMUP:
            self.plain_times = [*self.plain_times, seconds][-PLAIN_SAMPLES:]
        elif kind == 1 and self.timed[1] > MEASURED_WARMUP and len(self.plain_times) >= 3:
            plain = statistics.median(self.plain_times)
            self.costs = [*self.costs, seconds / plain - 1.0][-COST_SAMPLES:]

    def cost(self) -> float:
        """The meter's extra time per measured step, as a fraction of a plain step (nan until 3 were timed)."""
        return statistics.median(self.costs) if len(self.costs) >= 3 else math.nan

    def choose_every(self, cost: float) -> int:
        """N = ⌈cost/budget⌉ within [every, MAX_EVERY]; lowered only when the new N is clearly (25%) smaller."""
        if math.isnan(cost):
            return self.every
        target = min(max(math.ceil(max(cost, 0.0) / self.budget), self.min_every), MAX_EVERY)
        return target if target > self.every or target < 0.75 * self.every else self.every

    # ---- results and checkpoints ---------------------------------------------------------------------------------

    def estimate(self) -> NoiseScaleEstimate:
        return self.noise.compute()

    def on_fit_end(self, state: LoopState) -> None:
        if self.source in ("micro", "hooks") and self.meter is not None:
            self.meter.remove()  # the taps' hooks (DDP's communication hook stays with the DDP wrapper)
        self.meter = None

    def state_dict(self) -> dict:
        schedule = {"every": self.every, "wait": self.wait, "plain_times": self.plain_times, "costs": self.costs,
                    "timed": self.timed, "in_a_row": self.in_a_row}
        return {**self.noise.state_dict(), "schedule": schedule}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        schedule = state.pop("schedule", None)
        state.pop("steps", None)  # checkpoints from before the callback kept its own schedule
        self.noise.load_state_dict(state)
        if schedule is not None:
            self.every, self.wait, self.plain_times = schedule["every"], schedule["wait"], list(schedule["plain_times"])
            self.costs, self.timed, self.in_a_row = list(schedule["costs"]), list(schedule["timed"]), \
                schedule["in_a_row"]
