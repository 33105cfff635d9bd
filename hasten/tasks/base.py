"""What a task is: data + model factory + loss + metric + default hyper-parameters."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Task:
    """A registered training task.

    - ``load(path)`` returns ``(train, test)``: map-style datasets (``len`` and ``[i]``) of ``(input, target)`` pairs
      of tensors or numbers. A ``TensorDataset`` is indexed a whole batch at a time; any other dataset (image files
      read one by one, a tokenized corpus on disk) is read item by item, by ``data_workers=N`` ``DataLoader`` processes
      if set (:mod:`hasten.train.data`), and its items must not depend on anything but the index. ``path`` is the
      user's data location or ``None`` for the default; missing data raises :class:`hasten.errors.HastenError`
      naming the command that installs it.
    - ``models`` maps a variant name to a factory ``() -> nn.Module``; the first one is the default.
    - ``loss(outputs, targets)`` is the mean loss over the batch (per example; per token for language models).
    - ``metric(outputs, targets)`` returns one value per example (e.g. 1.0 if correct), averaged by the evaluator.
    - ``defaults`` are the task's tuned hyper-parameters (keys of :class:`hasten.train.TrainConfig`).
    - ``available()`` says whether the data is present without loading it; ``size`` describes it for `hasten tasks`.
    - ``kind`` is "image", "sequence" or "text": how the report shows an example.
    """

    name: str
    description: str
    load: Callable[[str | None], tuple[Dataset, Dataset]]
    models: dict[str, Callable[[], nn.Module]]
    loss: Loss
    metric: Loss
    metric_name: str = "accuracy"
    defaults: dict[str, Any] = field(default_factory=dict)
    available: Callable[[str | None], bool] = lambda path: True
    size: str = ""
    kind: str = "image"
    data_hint: str = ""  # how to get the data, shown when it is missing

    def make_model(self, variant: str | None = None) -> nn.Module:
        from hasten.errors import HastenError

        variant = variant or next(iter(self.models))
        if variant not in self.models:
            raise HastenError(f"task {self.name!r} has no model {variant!r}; choose one of {', '.join(self.models)}")
        return self.models[variant]()
