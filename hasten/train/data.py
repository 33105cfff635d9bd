"""Batches for the loop from any map-style dataset: a ``TensorDataset`` is indexed directly, any other dataset (files
on disk, a tokenized corpus too big for memory) is read by ``DataLoader`` worker processes (``data_workers=N``).

Why the loop draws the indices and the workers only read them. An adaptive batch schedule decides the batch size
at ``batch_start`` of each step, from the noise measured on the step before, and the checkpoint's sampler state must
be what the loop has trained on. A ``DataLoader`` that owns the sampler draws ``prefetch_factor × workers`` batches
ahead, before their size is known, and its sampler then stands ahead of the loop. Handing workers only the indices
already decided (a queue filled at each step) is exact but reads nothing ahead: the workers would wait while the
model computes. So the loop keeps drawing from its :class:`~hasten.train.sampler.EpochSampler` (a step trains on
exactly the examples of the direct path for a given seed and batch-size sequence, and the checkpoint holds the
loop's sampler, never counting a prefetched batch), and the ``DataLoader``'s batch sampler is a *prediction* of the
indices the loop will ask for: a copy of the sampler run forward at the current batch size, one predicted batch per
worker task as in a plain ``DataLoader``. Every chunk a worker returns is checked against the indices the loop drew
before it is used; a batch may take the start or the rest of a chunk. In one process the stream an epoch visits
does not depend on the batch sizes (they only choose where to cut it), so a prediction never misses. Under DDP a
rank's shard depends on the global batch size, and a changed size is a miss: the workers start again from the
loop's indices (persistent workers: the chunks in flight are read and dropped, no new processes). A miss costs
time, never correctness.

Items must be deterministic functions of their index: a random augmentation inside ``__getitem__`` would draw from
the workers' generators, which are not the loop's (nor saved in checkpoints); augment in a method instead.
"""
from __future__ import annotations

import collections
import copy
from typing import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset, default_collate

from hasten.errors import HastenError
from hasten.train.sampler import EpochSampler, gather, shard


def direct(dataset: Dataset) -> bool:
    """Whether ``gather`` reads ``dataset`` by tensor indexing (a ``TensorDataset``, or a ``Subset`` of one)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def collate(items: list) -> tuple:
    """``(input, target, ...)`` items stacked field by field into a tuple of tensors (``default_collate``)."""
    batch = default_collate(items)
    if not isinstance(batch, (tuple, list)) or not all(isinstance(t, torch.Tensor) for t in batch):
        raise HastenError("dataset items must be (input, target) pairs of tensors or numbers")
    return tuple(batch)


def check_examples(dataset, what: str) -> None:
    """Fail in one line unless ``dataset`` is map-style (``len`` and ``[i]``) with ``(input, target)`` items."""
    if isinstance(dataset, IterableDataset) or not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
        raise HastenError(f"{what} is a {type(dataset).__name__}: a task's load must return map-style datasets "
                          "(with len() and [i]) of (input, target) pairs")
    if len(dataset) == 0:
        return
    item = dataset[0]
    fields = item if isinstance(item, (tuple, list)) else ()
    kinds = [type(f).__name__ for f in fields if not isinstance(f, (torch.Tensor, int, float, bool))
             and type(f).__module__ != "numpy"]
    if len(fields) < 2 or kinds:
        shown = f"a {type(item).__name__}" if len(fields) < 2 else f"a {type(item).__name__} holding a {kinds[0]}"
        raise HastenError(f"{what}: item 0 is {shown}; a task's load must return datasets whose items are "
                          "(input, target) pairs of tensors or numbers")


def load_data(task, path: str | None) -> tuple[Dataset, Dataset]:
    """``task.load(path)``, its two datasets checked with :func:`check_examples`."""
    train, test = task.load(path)
    check_examples(train, f"{task.name}'s training set")
    check_examples(test, f"{task.name}'s test set")
    return train, test


def check_workers(workers: int) -> None:
    if workers < 0:
        raise HastenError(f"data_workers={workers} must be 0 (read data in this process) or a number of processes")


def _loader(dataset: Dataset, batch_sampler, workers: int, pin_memory: bool, persistent: bool) -> DataLoader:
    # A generator of its own: the DataLoader draws its workers' base seed from it, not from the training RNG.
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, persistent_workers=persistent, generator=torch.Generator())


def to_device(batch: tuple, device: torch.device) -> tuple:
    return tuple(t.to(device, non_blocking=True) for t in batch)


class _Prediction:
    """The ``DataLoader``'s batch sampler: the index chunks this rank will ask for next (``first``, then the shards
    of what a copy of the loop's sampler draws at ``batch_size``), each remembered in ``expected`` as it is handed
    out (in the main process: the ``DataLoader`` asks for a chunk when it sends one to a worker)."""

    def __init__(self, sampler: EpochSampler, rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world
        self.first, self.batch_size = torch.empty(0, dtype=torch.long), 1
        self.expected: collections.deque = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        ahead = copy.copy(self.sampler)  # shares the epoch's order; drawing reassigns, never mutates it
        chunk = self.first
        while True:
            if len(chunk):
                self.expected.append(chunk)
                yield chunk.tolist()
            chunk = shard(ahead.next_batch(self.batch_size), self.rank, self.world)


class Batches:
    """This rank's batch for the indices the loop drew, on ``device``: :func:`gather` for a ``TensorDataset`` or
    with ``workers=0``, else read ahead by ``workers`` processes (see the module docstring for why this is exact).

    >>> data = TensorDataset(torch.arange(6.0), torch.arange(6))
    >>> sampler = EpochSampler(6, seed=0)
    >>> batches = Batches(data, sampler, torch.device("cpu"))
    >>> indices = sampler.next_batch(4)
    >>> torch.equal(batches.fetch(indices, 4)[1], indices)
    True
    """

    def __init__(self, dataset: Dataset, sampler: EpochSampler, device: torch.device, *, rank: int = 0,
                 world: int = 1, workers: int = 0, pin_memory: bool = False):
        check_workers(workers)
        self.dataset, self.device = dataset, device
        self.workers = 0 if direct(dataset) else workers
        self.restarts = 0  # times the workers started over from the loop's indices (a missed prediction)
        self._held: tuple | None = None  # (indices, batch) of a chunk read but not yet (all) used
        self._iterator = None
        if self.workers:
            self._prediction = _Prediction(sampler, rank, world)
            self._loader = _loader(dataset, self._prediction, self.workers, pin_memory and device.type == "cuda",
                                   persistent=True)

    def fetch(self, indices: torch.Tensor, batch_size: int) -> tuple:
        """The examples at ``indices`` (this rank's part of a global batch of ``batch_size``) on the device."""
        if not len(indices) and not direct(self.dataset):  # an empty shard (DDP, a short last batch)
            return to_device(tuple(t[:0] for t in collate([self.dataset[0]])), self.device)
        if not self.workers:
            return to_device(gather(self.dataset, indices), self.device)
        self._prediction.batch_size = batch_size  # chunks predicted from now on
        pieces, need = [], indices
        while len(need):
            if self._held is None:
                if self._iterator is None:
                    self._start(need)
                self._held = (self._prediction.expected.popleft(), next(self._iterator))
            chunk, batch = self._held
            k = min(len(chunk), len(need))
            if not torch.equal(chunk[:k], need[:k]):  # predicted another batch size (DDP) or sampler state
                self._start(need)
                continue
            pieces.append(to_device(tuple(t[:k] for t in batch), self.device))
            self._held = (chunk[k:], tuple(t[k:] for t in batch)) if k < len(chunk) else None
            need = need[k:]
        if len(pieces) == 1:
            return pieces[0]
        return tuple(torch.cat(field) for field in zip(*pieces))

    def _start(self, need: torch.Tensor) -> None:
        """Point the workers at ``need`` and what follows it; chunks still in flight are dropped."""
        self.restarts += self._iterator is not None
        self._held = None
        self._prediction.first = need
        self._prediction.expected.clear()
        self._iterator = iter(self._loader)  # persistent workers: reset, not restarted

    def close(self) -> None:
        """Stop the worker processes (dropping the last reference to the iterator shuts them down, as garbage
        collection would); the object is done."""
        self._iterator = self._held = self._loader = None


def ordered_batches(dataset: Dataset, chunks: Iterable[torch.Tensor], *, workers: int = 0,
                    pin_memory: bool = False) -> Iterator[tuple]:
    """The batches at ``chunks`` (index tensors) in order, on the CPU: gathered here for a ``TensorDataset`` or
    with ``workers=0``, else read by ``workers`` processes for this one pass (evaluation)."""
    check_workers(workers)
    chunks = list(chunks)
    if not workers or direct(dataset) or not chunks:
        return (gather(dataset, c) for c in chunks)
    sampler = [c.tolist() for c in chunks]
    return iter(_loader(dataset, sampler, min(workers, len(chunks)), pin_memory, persistent=False))
