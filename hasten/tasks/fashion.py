"""`fashion`: Fashion-MNIST (Xiao, Rasul, Vollgraf 2017), 70,000 28×28 grayscale clothing images in 10 classes.

Read from the four IDX files (plain or ``.gz``) of Debian's ``dataset-fashion-mnist`` or any directory the user
names with ``data=DIR``. Images are kept as (1, 28, 28) so the MLP (which flattens) and the CNN share the data.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hasten.errors import HastenError
from hasten.tasks.base import Task
from hasten.tasks.idx import read_idx
from hasten.tasks.models import accuracy, cross_entropy, mlp, small_cnn

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
MEAN, STD = 0.2860, 0.3530  # pixel mean and std of the training images (scaled to [0, 1])
HINT = "install it with `apt-get install dataset-fashion-mnist` or pass data=DIR with the idx files"


def find_files(directory: str | Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (each plain or ``.gz``), or None if any is missing."""
    directory = Path(directory)
    found = {}
    for key, stem in FILES.items():
        candidates = [directory / stem, directory / f"{stem}.gz"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        found[key] = path
    return found


def available(path: str | None = None) -> bool:
    return find_files(path or DEFAULT_DIR) is not None


def _images(path: Path) -> np.ndarray:
    x = read_idx(path)
    if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8:
        raise HastenError(f"{path} is corrupt: expected uint8 images of shape (N, 28, 28), got {x.dtype} {x.shape}")
    return x


def _labels(path: Path, count: int) -> np.ndarray:
    y = read_idx(path)
    if y.ndim != 1 or len(y) != count or y.dtype != np.uint8 or (len(y) and y.max() > 9):
        raise HastenError(f"{path} is corrupt: expected {count} uint8 labels in 0..9, got {y.dtype} {y.shape}")
    return y


def normalize(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 1, 28, 28), (x/255 − mean)/std."""
    x = torch.from_numpy(images).to(torch.float32).div_(255.0).sub_(MEAN).div_(STD)
    return x.unsqueeze(1)


@functools.lru_cache(maxsize=2)
def _load(directory: str) -> tuple[TensorDataset, TensorDataset]:
    files = find_files(directory)
    if files is None:
        raise HastenError(f"Fashion-MNIST not found in {directory}: {HINT}")
    out = []
    for split in ("train", "test"):
        x = _images(files[f"{split}_x"])
        y = _labels(files[f"{split}_y"], len(x))
        out.append(TensorDataset(normalize(x), torch.from_numpy(y.astype(np.int64))))
    return out[0], out[1]


def load(path: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): 60,000 / 10,000 examples, inputs (1, 28, 28) float32, targets int64 in 0..9."""
    return _load(str(Path(path or DEFAULT_DIR).expanduser().resolve()))


def fetch() -> Path:
    """Fashion-MNIST comes from a Debian package, not from hasten: say how to install it if it is missing."""
    if not available():
        raise HastenError(f"Fashion-MNIST not found in {DEFAULT_DIR}: {HINT}")
    return Path(DEFAULT_DIR)


TASK = Task(
    name="fashion",
    description="Fashion-MNIST clothing images, MLP 784-256-256-10 or small CNN",
    load=load,
    models={"mlp": lambda: mlp((784, 256, 256, 10)), "cnn": lambda: small_cnn()},
    loss=cross_entropy,
    metric=accuracy,
    defaults=dict(steps=2000, batch_size=128, lr=0.05, momentum=0.9, eval_every=500, checkpoint_every=500),
    available=available,
    size="60,000 train / 10,000 test, 28×28 grayscale",
    kind="image",
    data_hint="apt-get install dataset-fashion-mnist (or data=DIR with the idx files)",
)
