"""`digits`: scikit-learn's 8×8 handwritten digits (UCI optdigits test set, 1,797 images), an MLP in seconds."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hasten.errors import HastenError
from hasten.tasks.base import Task
from hasten.tasks.models import accuracy, cross_entropy, mlp

N_TEST = 360  # the remaining 1,437 examples train
SPLIT_SEED = 0  # fixed: every run sees the same split


def split(n: int, n_test: int = N_TEST, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (train, test) index arrays: a seeded permutation of range(n), the last n_test are test."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[:-n_test]), np.sort(order[-n_test:])


@functools.lru_cache(maxsize=2)
def _load(path: str | None) -> tuple[TensorDataset, TensorDataset]:
    if path is not None:
        raise HastenError("digits ships with scikit-learn and takes no data=; leave data unset")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32) / 16.0)  # pixel counts 0..16 -> [0, 1]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    train, test = (torch.from_numpy(i) for i in split(len(y)))
    return TensorDataset(x[train], y[train]), TensorDataset(x[test], y[test])


def load(path: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): 1,437 / 360 examples, inputs (64,) float32 in [0, 1], targets int64 in 0..9."""
    return _load(path or None)


def fetch() -> Path:
    """Nothing to download: the data is inside scikit-learn. Returns its file."""
    import sklearn.datasets

    return Path(sklearn.datasets.__file__).parent / "data" / "digits.csv.gz"


TASK = Task(
    name="digits",
    description="8×8 handwritten digits (scikit-learn), MLP 64-128-128-10",
    load=load,
    models={"mlp": lambda: mlp((64, 128, 128, 10))},
    loss=cross_entropy,
    metric=accuracy,
    # noise_small=all: on a model this small reading every micro-batch costs nothing that shows, and narrows the
    # interval of a short run (B_simple 97, 95% -7..202, vs 60, -46..166 from the first micro-batch alone).
    defaults=dict(steps=600, batch_size=64, lr=0.1, momentum=0.9, eval_every=100, checkpoint_every=200,
                  noise_small="all"),
    size="1,437 train / 360 test, 8×8 grayscale",
    kind="image",
    data_hint="bundled with scikit-learn",
)
