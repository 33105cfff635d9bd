"""A stand-in for the loop's state in unit tests of the thin classes."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from hasten.train.events import LoopState


def make_state(model, batch, task=None, steps=100, step=0, seed=0, train_set=None, loss_fn=None) -> LoopState:
    task = task or SimpleNamespace(name="toy", kind="image", loss=torch.nn.functional.cross_entropy)
    state = LoopState(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), cfg=SimpleNamespace(steps=steps, seed=seed),
        task=task, run_dir=Path("."), device=torch.device("cpu"), train_size=len(train_set) if train_set else 1000,
        batch_size=len(batch[0]), micro_batch_size=len(batch[0]), step=step, batch=batch,
    )
    state.loss_fn = loss_fn or task.loss
    state.train_set = train_set
    return state
