"""Named loop events, the state callbacks see, and the dispatcher.

The loop fires, in order::

    fit_start
    per step: batch_start → batch_ready → (after_backward per micro-batch) → before_optimizer_step → batch_end
              → before_evaluate → evaluate (when it evaluates) → checkpoint (after the file is written)
    fit_end

``batch_ready`` fires once the batch is drawn: a callback may replace ``state.batch`` there (speedup methods:
MixUp, resizing, selective backprop...). ``before_optimizer_step`` sees the accumulated gradient of the mean loss
over the batch, unscaled (after ``GradScaler.unscale_`` with precision=fp16) and *before* clipping (Lightning's
``on_before_optimizer_step``); ``after_backward`` fires after each micro-batch's backward, when ``.grad`` holds the
sum of the micro-batches so far (each scaled by its share of the batch, and by the loss scale with fp16);
``state.last_backward`` is True at the step's last one. The noise-scale callback fires after every other callback
(the loop moves it last): it sees the batch the methods made and measures at the last ``after_backward``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from hasten.errors import HastenError
from hasten.tasks.base import Task
from hasten.train.config import TrainConfig

EVENTS = (
    "fit_start",
    "batch_start",
    "batch_ready",
    "after_backward",
    "before_optimizer_step",
    "batch_end",
    "before_evaluate",
    "evaluate",
    "checkpoint",
    "fit_end",
)


@dataclass
class LoopState:
    """What the loop knows, shared with callbacks (which may change ``batch_size``, ``lr`` and ``should_stop``).

    ``step`` counts finished optimizer steps; at ``batch_start`` a callback may set ``batch_size`` (drawn next) and
    ``lr`` (the scheduled value, applied to the optimizer after the event). ``metrics`` is the row logged for this
    step: callbacks add keys to it. ``batch`` is this step's ``(inputs, targets)`` on the device (this rank's
    shard of the global batch under DDP).
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    task: Task
    run_dir: Path
    device: torch.device
    train_size: int
    batch_size: int
    micro_batch_size: int
    step: int = 0
    examples: int = 0
    epoch: int = 0
    lr: float = 0.0
    loss: float = float("nan")
    metrics: dict = field(default_factory=dict)
    batch: tuple | None = None
    should_stop: bool = False  # a callback sets it to end the run after this step (evaluated and checkpointed)
    nonfinite_steps: int = 0  # steps skipped so far because the loss (or the clipped norm) was not finite
    loss_fn: Callable | None = None  # training loss (outputs, targets) -> batch mean; methods may replace it
    closure: Callable | None = None  # closure() redoes forward + backward on state.batch (SAM's second pass)
    train_set: Any = None  # the training dataset (SortaGrad reorders the first epoch)
    evaluate_now: bool = False  # a callback sets it at batch_end to have this step evaluated
    net: nn.Module | None = None  # what forwards run through: the DDP wrapper of ``model`` under torchrun, else model
    # Reset every step. A method that makes this step's batch something other than a uniform sample of the training
    # set (SortaGrad's ordered epoch, selective backprop) says so here at batch_ready: the noise meter skips the step.
    skewed_batch: str = ""
    split: int = 0  # split this step's backward into at least this many micro-batches (the micro noise meter)
    last_backward: bool = False  # at after_backward: whether it is the step's last micro-batch
    micro_batches: tuple = ((), ())  # this step's micro-batch sizes, and the factors their mean losses were scaled by
    scaler: Any = None  # the torch.amp.GradScaler with precision=fp16, else None
    shared: dict = field(default_factory=dict)  # per-rank numbers summed over the ranks with the step's loss
    noise_bias: str = ""  # why methods bias the noise scale (their noise_bias), "" if none does: batch=adaptive refuses


class Callback:
    """Base class: every ``on_<event>(state)`` does nothing; override the ones you need.

    A callback with a ``name`` and ``state_dict()``/``load_state_dict()`` is saved in checkpoints under that name;
    on resume ``load_state_dict`` is called right after ``on_fit_start``.
    """

    name: str = ""

    def on_fit_start(self, state: LoopState) -> None: ...
    def on_batch_start(self, state: LoopState) -> None: ...
    def on_batch_ready(self, state: LoopState) -> None: ...
    def on_after_backward(self, state: LoopState) -> None: ...
    def on_before_optimizer_step(self, state: LoopState) -> None: ...
    def on_batch_end(self, state: LoopState) -> None: ...
    def on_before_evaluate(self, state: LoopState) -> None: ...
    def on_evaluate(self, state: LoopState) -> None: ...
    def on_checkpoint(self, state: LoopState) -> None: ...
    def on_fit_end(self, state: LoopState) -> None: ...


class Callbacks:
    """An ordered list of callbacks (any object with some ``on_<event>`` methods): fire events, save their states."""

    def __init__(self, callbacks: Iterable[Any] = ()):
        self.callbacks = list(callbacks)
        # Bound methods per event, looked up once: firing an event nobody handles costs one empty loop.
        self._handlers = {e: [getattr(c, f"on_{e}") for c in self.callbacks if hasattr(c, f"on_{e}")] for e in EVENTS}
        names = [c.name for c in self._stateful()]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise HastenError(f"two callbacks share the name {dupes[0]!r}: give each stateful callback its own name")

    def fire(self, event: str, state: LoopState) -> None:
        for handler in self._handlers[event]:
            handler(state)

    def find(self, kind: type) -> Any | None:
        return next((c for c in self.callbacks if isinstance(c, kind)), None)

    def _stateful(self) -> list:
        return [c for c in self.callbacks if getattr(c, "name", "") and hasattr(c, "state_dict")]

    def state_dict(self) -> dict:
        return {c.name: c.state_dict() for c in self._stateful()}

    def load_state_dict(self, states: dict) -> None:
        for c in self._stateful():
            if c.name in states:
                c.load_state_dict(states[c.name])
