"""Epoch-wise shuffling without replacement, resumable to the exact example, with batch sizes that may change.

>>> s = EpochSampler(5, seed=0)
>>> [len(s.next_batch(2)) for _ in range(4)]   # 2 + 2 + 1 (epoch 0, last batch truncated), then epoch 1
[2, 2, 1, 2]
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset, default_collate

from hasten.errors import HastenError


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a permutation of range(n) from a generator seeded by (seed, epoch) alone
    (mixed by NumPy's SeedSequence: torch's CPU generator keeps only 32 bits of a seed)."""
    mixed = np.random.SeedSequence([seed % 2**64, epoch]).generate_state(1)[0]
    generator = torch.Generator().manual_seed(int(mixed))
    return torch.randperm(n, generator=generator)


class EpochSampler:
    """Draws batches of indices; every example exactly once per epoch.

    The last batch of an epoch is truncated to what is left and the next call starts the next epoch, so batch
    boundaries never straddle epochs. ``state_dict()`` is ``{seed, epoch, position}``: enough to restore exactly,
    since each epoch's permutation depends only on (seed, epoch).
    """

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise HastenError("the training set is empty: check the task's data")
        self.n, self.seed = n, seed
        self.epoch, self.position = 0, 0
        self._order = epoch_permutation(n, seed, 0)

    def next_batch(self, batch_size: int) -> torch.Tensor:
        if batch_size < 1:
            raise HastenError(f"batch_size must be at least 1, got {batch_size}")
        if self.position >= self.n:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = epoch_permutation(self.n, self.seed, self.epoch)
        indices = self._order[self.position : self.position + batch_size]
        self.position += len(indices)
        return indices

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = epoch_permutation(self.n, self.seed, self.epoch)


def shard(indices: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This process's part of a global batch: contiguous slices whose sizes differ by at most one, so each
    example of the batch goes to exactly one rank (every rank draws the same global batch from the same sampler)."""
    return torch.tensor_split(indices, world_size)[rank]


def gather(dataset: Dataset, indices: torch.Tensor) -> tuple:
    """The examples at ``indices`` as a batch: one tensor index per field for a ``TensorDataset`` (fast), else
    the items stacked by ``default_collate`` (in this process; the loop reads them in ``DataLoader`` workers with
    ``workers=N``, see :mod:`hasten.train.data`)."""
    if isinstance(dataset, TensorDataset):
        return tuple(t[indices] for t in dataset.tensors)
    if isinstance(dataset, Subset):
        return gather(dataset.dataset, torch.as_tensor(dataset.indices)[indices])
    return tuple(default_collate([dataset[i] for i in indices.tolist()]))
