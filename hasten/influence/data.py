"""Examples to score: a ``TensorDataset``, an ``(inputs, targets)`` pair of tensors, or any map-style dataset of
``(input, target)`` pairs, streamed in contiguous batches (tensor data is sliced, never copied whole)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Iterator

import torch
from torch.utils.data import default_collate

from hasten.errors import HastenError


class Examples:
    """``len(examples)`` and ``examples.batches(size)`` -> (start, inputs, targets) in dataset order."""

    def __init__(self, data, role: str = ""):
        what = f"the {role} dataset" if role else "the dataset"
        self.tensors = None
        if isinstance(data, Sequence) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
            self.tensors = tuple(data)
        elif hasattr(data, "tensors"):
            if len(data.tensors) != 2:
                raise HastenError(f"{what} has {len(data.tensors)} tensors: expected (inputs, targets)")
            self.tensors = tuple(data.tensors)
        elif not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise HastenError(f"{what} is a {type(data).__name__}: pass a TensorDataset, (inputs, targets) tensors "
                              "or a map-style dataset of (input, target) pairs")
        if self.tensors is not None and len(self.tensors[0]) != len(self.tensors[1]):
            raise HastenError(f"{what} has {len(self.tensors[0])} inputs but {len(self.tensors[1])} targets")
        self.data = data
        self.n = len(self.tensors[0]) if self.tensors is not None else len(data)
        if self.n == 0:
            raise HastenError(f"{what} is empty: give at least one (input, target) example")

    def __len__(self) -> int:
        return self.n

    def batches(self, size: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for start in range(0, self.n, size):
            stop = min(start + size, self.n)
            if self.tensors is not None:
                x, y = self.tensors[0][start:stop], self.tensors[1][start:stop]
            else:
                x, y = default_collate([self.data[i] for i in range(start, stop)])
            yield start, x, y
