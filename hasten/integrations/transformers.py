"""The gradient noise scale B_simple = tr(Σ)/|G|² during a Hugging Face ``Trainer.train()``, as a callback.

McCandlish, Kaplan, Amodei et al. 2018 (arXiv:1812.06162): squared gradient norms at two batch sizes taken at the
same parameters (eq. A.2), read from the backward passes the Trainer runs anyway:

>>> cb = NoiseScaleCallback()                                                       # doctest: +SKIP
>>> trainer = Trainer(model, TrainingArguments(..., gradient_accumulation_steps=4),
...                   train_dataset=ds, callbacks=[cb])                             # doctest: +SKIP
>>> trainer.train(); cb.estimate.b_simple, cb.estimate.interval                     # doctest: +SKIP

Sources (``source="auto"`` picks ``micro`` when ``gradient_accumulation_steps >= 2``, else ``per_example``):

- ``micro``: :class:`hasten.measure.MicroBatchTap`, B_small = a micro-batch, B_big = the accumulated batch.
- ``per_example``: :class:`hasten.measure.PerExampleTap`, B_small = 1 (lower variance); every trainable parameter
  must sit in a layer it covers (GPT-2's Conv1D and tied embeddings are not), else a HastenError says what to change.

What it sees, exactly (transformers 4.46+, checked against 5.x):

- Clipping. ``on_pre_optimizer_step`` runs after ``max_grad_norm`` clipping (on by default), so the tap is not
  stepped there. A hook on the model's output tensor (in the outermost graph, so reentrant checkpointing is fine)
  queues an autograd callback during the last micro-batch's backward; it runs when that backward has finished
  accumulating, before the Trainer clips, and steps the tap on the unclipped accumulated ``.grad`` (one host sync).
  The last micro-batch is the one accelerate's ``GradientState`` marks for gradient sync.
- Loss scaling. The Trainer divides each micro-batch loss by the number of micro-batches in the step, unless the model
  consumes ``num_items_in_batch`` (causal LMs do): its loss is then the token sum of the micro-batch divided by the
  label tokens N of the whole accumulated batch, so micro-batch j (n_j tokens) carries weight n_j/N and its mean
  per-token gradient is its backward's gradient times N/n_j; B_small = n_1 tokens (``small="all"``: the harmonic mean
  of the n_j), B_big = N, and **B_simple is in tokens** (as if tokens were independent draws). n_j is counted from the
  ``labels`` (or ``shift_labels``) the model receives, with or without the first position, whichever sums to N.
  Otherwise B_simple is in examples (the batch dimension of the model's first tensor input); the per-example source
  is always in examples (sequences).
- ``on_substep_end`` fires after non-final micro-steps only, so micro-batches are counted by a forward pre-hook on the
  model (forwards in training mode with gradients on), and the tap is reset at ``on_step_begin``.
- fp16 mixed precision: the gradients are divided by the GradScaler's scale (read from the optimizer).

A step whose micro-batches hold different numbers of examples (the short last batch of an epoch) is not measured;
a non-finite one is counted as skipped. When the train dataset has a length D and B_simple is in examples, the
estimator applies the finite-population correction for batches drawn without replacement (``NoiseScale(dataset_size
=D)``). One process only: under DDP or DataParallel the callback refuses to start.

Logging goes through the Trainer: ``noise/b_simple``, ``noise/b_simple_se``, ``noise/b_simple_lo`` and ``_hi`` (the
95% interval), ``noise/grad_sq``, ``noise/trace_cov``, ``noise/skipped`` (the keys of hasten's own loop) are added to
each log after a measured step and to the end-of-training summary, so they land in ``trainer.state.log_history`` and
on the console. The Trainer calls its ``report_to`` integrations (TensorBoard, W&B, ...) before the callbacks passed to
it; add the callback with :meth:`NoiseScaleCallback.attach` to put it ahead of them so they get the keys too.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from accelerate.state import GradientState
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from hasten.errors import HastenError
from hasten.measure.hook_tap import PerExampleTap
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate, meter_state
from hasten.measure.tap import MicroBatchTap, check_meter_options

SOURCES = ("auto", "micro", "per_example")
_IGNORE = -100  # the label HF losses and the Trainer's token count skip
_MICRO_HINT = "set gradient_accumulation_steps >= 2 in TrainingArguments to measure from micro-batches instead"


class _StepReader:
    """Counts a step's micro-batches and their sizes, and steps the tap when the last one's backward has finished."""

    def __init__(self, model: torch.nn.Module, tap, scaler):
        self.tap, self.scaler, self.micro = tap, scaler, isinstance(tap, MicroBatchTap)
        self.shifts = _loss_shifts_labels(model)
        self.discard()
        self._handles = [model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
                         model.register_forward_hook(self._after_forward, with_kwargs=True)]

    def discard(self) -> None:
        self.sizes: list = []  # per micro-batch: examples (int), or its loss's label tokens (a tensor, no sync)
        self.total = None  # num_items_in_batch the model received (None: each loss divided by the micro-batches)
        self.final = False  # whether the micro-batch in flight is the step's last
        self.stepped = False  # whether the tap was stepped for this step (at the end of its last backward)

    def _before_forward(self, module, args, kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return
        self.final = GradientState().sync_gradients
        if not self.micro or not self.measuring():
            return
        total = kwargs.get("num_items_in_batch")
        labels = kwargs.get("shift_labels", kwargs.get("labels"))
        if total is not None and labels is not None:
            self.total = total
            if self.shifts and "shift_labels" not in kwargs:
                labels = labels[..., 1:]  # a causal LM's loss never predicts position 0
            self.sizes.append(labels.ne(_IGNORE).sum())
        else:
            first = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()), None)
            self.sizes.append(len(first) if first is not None else None)

    def measuring(self) -> bool:
        """Whether the tap measures this step (one in ``every``); on the others only its phase advances."""
        return self.tap.steps % self.tap.every == 0

    def _after_forward(self, module, args, kwargs, output):
        if not (self.final and module.training and torch.is_grad_enabled() and self.measuring()):
            return
        out = _output_tensor(output)
        if out is not None:
            out.register_hook(self._queue)  # fires first in this backward, in its outermost graph task

    def _queue(self, grad):
        torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        """All micro-batches' gradients are in ``.grad``, unclipped: measure the step."""
        self.stepped, sizes, total = True, self.sizes, self.total
        self.sizes = []
        scale = float(self.scaler.get_scale()) if self.scaler is not None and self.scaler.is_enabled() else 1.0
        if not (scale > 0 and math.isfinite(scale)):
            scale = 1.0
        if not self.micro:
            try:
                self.tap.step(loss_scale=scale)
            except HastenError as e:  # a layer the tap refuses, found while measuring
                raise _per_example_error(e) from None
            return
        if None in sizes or not sizes:
            self._skip()
        elif total is None:  # every micro-batch loss divided by their number (the Trainer's default)
            self.tap.step(sum(sizes), loss_scale=scale, micro_batch_sizes=sizes)
        else:  # micro-batch j's loss: its n_j tokens' sum ÷ num_items_in_batch
            device = sizes[0].device
            dtype = torch.float32 if device.type == "mps" else torch.float64
            total = torch.as_tensor(total, device=device).to(dtype).reshape(())
            *n, total = [round(v) for v in torch.stack([c.to(dtype) for c in sizes] + [total]).tolist()]  # host sync
            if min(n) <= 0 or not total > 0:
                return self._skip()
            # Weights n_j/Σn make .grad the batch's per-token mean up to the factor Σn/total, which the Trainer's
            # count leaves when it differs from the tokens the loss used (GPT-2: position 0 counted, never predicted).
            self.tap.noise.dataset_size = None  # per token now; the data set's size in tokens is not known
            self.tap.step(sum(n), loss_scale=scale * sum(n) / total, micro_batch_sizes=n,
                          micro_batch_weights=[c / sum(n) for c in n])

    def _skip(self) -> None:
        """End the tap's step unmeasured (its ``every`` phase advances): discarded first, it does not read .grad."""
        self.tap.discard()
        if self.micro:
            self.tap.step(1)
        else:
            self.tap.step()

    def step_if_missed(self) -> None:
        """Advance the tap's step if the end of the last backward did not (the Trainer has clipped .grad by now)."""
        if not self.stepped:
            self._skip()
        self.discard()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.tap.remove()


def _loss_shifts_labels(model) -> bool:
    """Whether the model's loss drops the first label of each row (HF causal LMs), as the Trainer tries to tell."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # transformers before 4.46: models did not take num_items_in_batch
        return False
    config = getattr(model, "config", None)
    try:
        causal = getattr(model, "loss_function", None) is ForCausalLMLoss
    except Exception:  # a model whose loss_function property fails: not an HF causal LM
        causal = False
    return causal and not getattr(config, "is_encoder_decoder", False)


def _output_tensor(output):
    """The model's loss if it returns one, else its first output tensor that requires grad."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, Mapping):
        loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            return loss
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return next((t for t in output if isinstance(t, torch.Tensor) and t.requires_grad), None)
    return None


class NoiseScaleCallback(TrainerCallback, ExportableState):
    """Measures B_simple during ``Trainer.train()``; see the module docstring for what it reads and when.

    Args:
        source: "auto" (micro-batches with ``gradient_accumulation_steps >= 2``, else per example), "micro" or
            "per_example".
        every: measure one optimizer step in ``every`` (the others cost nothing; the estimate stays unbiased).
        horizon: EMA horizon in examples (tokens when B_simple is in tokens); None = running mean over the run.
        small: micro source: "first" reads the first micro-batch's gradient (one read per step), "all" every
            micro-batch's (lower variance, k reads).

    ``estimate`` is the current :class:`NoiseScaleEstimate`; ``noise`` the :class:`NoiseScale` it comes from.
    """

    def __init__(self, source: str = "auto", every: int = 1, horizon: float | None = None, small: str = "first"):
        if source not in SOURCES:
            raise HastenError(f"NoiseScaleCallback(source={source!r}): choose {', '.join(SOURCES)}")
        check_meter_options(every, small)
        self.source, self.every, self.horizon, self.small = source, every, horizon, small
        self.noise = NoiseScale(horizon=horizon)
        self.meter_state: dict | None = None  # restored from a checkpoint; loaded at on_train_begin
        self._reader: _StepReader | None = None
        self._logged = 0

    @property
    def estimate(self) -> NoiseScaleEstimate:
        return self.noise.compute()

    def attach(self, trainer) -> "NoiseScaleCallback":
        """Add to ``trainer`` ahead of its ``report_to`` integrations, so that they log the noise keys too."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if args.world_size > 1 or args.n_gpu > 1:
            raise HastenError(f"NoiseScaleCallback measures one process's gradients (this run: world_size="
                              f"{args.world_size}, n_gpu={args.n_gpu}): train on one device to measure")
        accumulation = args.gradient_accumulation_steps
        source = self.source if self.source != "auto" else ("micro" if accumulation >= 2 else "per_example")
        if source == "micro" and accumulation < 2:
            raise HastenError(f"NoiseScaleCallback(source='micro') needs micro-batches: set "
                              f"gradient_accumulation_steps >= 2 in TrainingArguments (it is {accumulation})")
        if self._reader is not None:
            self._reader.remove()
        if source == "micro":
            tap = MicroBatchTap(model, self.noise, every=self.every, small=self.small)
        else:
            tap = _per_example_tap(model, self.noise, self.every)
        if self.meter_state is not None:
            tap.load_state_dict(self.meter_state)
            self.meter_state = None
        self.noise.dataset_size = _dataset_size(train_dataloader)
        self._reader = _StepReader(model, tap, getattr(optimizer, "scaler", None))
        self._logged = self.noise.n_steps + self.noise.n_skipped

    def on_step_begin(self, args, state, control, **kwargs):
        if self._reader is not None:  # forwards and backwards since the last step are not this step's
            self._reader.discard()
            self._reader.tap.discard()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self._reader is not None:
            self._reader.step_if_missed()

    def on_log(self, args, state, control, logs=None, **kwargs):
        seen = self.noise.n_steps + self.noise.n_skipped
        if logs is None or not seen or (seen == self._logged and "train_runtime" not in logs):
            return  # nothing new since the last log (the end-of-training summary gets the estimate anyway)
        self._logged = seen
        e = self.estimate
        keys = {"noise/b_simple": e.b_simple, "noise/b_simple_se": e.b_simple_se, "noise/b_simple_lo": e.b_simple_lo,
                "noise/b_simple_hi": e.b_simple_hi, "noise/grad_sq": e.grad_sq, "noise/trace_cov": e.trace_cov,
                "noise/skipped": e.n_skipped}
        logs.update(keys)
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == state.global_step and set(logs) - set(keys) <= set(last):
            last.update(keys)  # the Trainer appended a copy of `logs` just before calling on_log

    def on_train_end(self, args, state, control, **kwargs):
        if self._reader is not None:
            self.meter_state = self._reader.tap.state_dict()  # the phase of `every`, for a next train() call
            self._reader.remove()  # the hooks; the estimate stays in self.noise
            self._reader = None

    def state(self) -> dict:
        """For the Trainer's checkpoints. With ``restore_callback_states_from_checkpoint=True`` a resumed Trainer builds
        a new callback from it (the estimate and the phase of ``every`` carry on): read that one from
        ``trainer.callback_handler.callbacks``, not the object passed in."""
        meter = self._reader.tap.state_dict() if self._reader is not None else (
            self.meter_state or meter_state(self.noise, 0))
        return {"args": {"source": self.source, "every": self.every, "horizon": self.horizon, "small": self.small},
                "attributes": {"meter_state": meter}}


def _dataset_size(dataloader) -> int | None:
    try:
        return len(dataloader.dataset)
    except (AttributeError, TypeError):
        return None


def _per_example_tap(model, noise: NoiseScale, every: int):
    try:
        return PerExampleTap(model, noise, every=every)
    except HastenError as e:
        raise _per_example_error(e) from None


def _per_example_error(e: HastenError) -> HastenError:
    """The tap's refusal, with the fix a Trainer user has (its own advice names hasten's loop)."""
    reason = str(e).split("measure this model with micro-batches")[0].rstrip(" ;:,")
    return HastenError(f"NoiseScaleCallback cannot measure per example ({reason}): {_MICRO_HINT}")
