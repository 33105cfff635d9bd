"""`mnist1d`: MNIST-1D (Greydanus & Kobak 2020), 5,000 procedurally generated length-40 signals of 10 digits.

Generated locally with ``mnist1d.data.make_dataset`` and the package's default arguments (seed 42, 4,000 train /
1,000 test); ``get_dataset`` is avoided because it downloads. The arrays are cached as ``mnist1d.npz`` in the
hasten cache directory (or in ``data=DIR`` / ``data=FILE.npz``) so later runs skip the ~1 s generation.
"""
from __future__ import annotations

import functools
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hasten.data import atomic_write, cache_dir
from hasten.errors import HastenError
from hasten.tasks.base import Task
from hasten.tasks.models import accuracy, cross_entropy, mlp

FILE = "mnist1d.npz"
KEYS = ("x", "y", "x_test", "y_test")


def cache_path(path: str | None = None) -> Path:
    """Where the generated arrays live: ``path`` if it names a .npz file, ``path/mnist1d.npz``, or the cache."""
    p = Path(path).expanduser() if path else cache_dir()
    return p if p.suffix == ".npz" else p / FILE


def generate() -> dict[str, np.ndarray]:
    """The default MNIST-1D split, generated without touching the caller's global random state."""
    from mnist1d.data import get_dataset_args, make_dataset

    saved = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(get_dataset_args())  # seeds `random` and `np.random` globally with args.seed
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
    return {
        "x": data["x"].astype(np.float32), "y": data["y"].astype(np.int64),
        "x_test": data["x_test"].astype(np.float32), "y_test": data["y_test"].astype(np.int64),
    }


def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise HastenError(f"{path} is corrupt ({type(e).__name__}: {e}); delete it and it will be regenerated") from None
    x, y, xt, yt = (arrays[k] for k in KEYS)
    if x.ndim != 2 or xt.ndim != 2 or x.shape[1] != xt.shape[1] or len(x) != len(y) or len(xt) != len(yt):
        raise HastenError(f"{path} is corrupt: inconsistent array shapes; delete it and it will be regenerated")
    return arrays


def _save(target: Path, arrays: dict[str, np.ndarray]) -> None:
    try:
        atomic_write(target, lambda tmp: np.savez(tmp, **arrays))
    except OSError as e:
        raise HastenError(f"cannot write {target} ({e}); set HASTEN_CACHE or data= to a writable place") from None


def ensure(path: str | None = None) -> Path:
    """Generate and cache the arrays unless they are already there; return the cache file."""
    target = cache_path(path)
    if not target.is_file():
        _save(target, generate())
    return target


@functools.lru_cache(maxsize=2)
def _load(path: str | None) -> tuple[TensorDataset, TensorDataset]:
    target = cache_path(path)
    if target.is_file():
        arrays = _read(target)
    else:
        arrays = generate()
        try:
            _save(target, arrays)
        except HastenError:
            pass  # a read-only cache only costs regenerating next time
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    return TensorDataset(t["x"].float(), t["y"].long()), TensorDataset(t["x_test"].float(), t["y_test"].long())


def load(path: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test): 4,000 / 1,000 examples, inputs (40,) float32 (standardized), targets int64 in 0..9."""
    return _load(path or None)


def fetch() -> Path:
    return ensure()


TASK = Task(
    name="mnist1d",
    description="MNIST-1D synthetic length-40 signals (generated locally), MLP 40-256-256-10",
    load=load,
    models={"mlp": lambda: mlp((40, 256, 256, 10))},
    loss=cross_entropy,
    metric=accuracy,
    defaults=dict(steps=1500, batch_size=100, lr=0.1, momentum=0.9, eval_every=250, checkpoint_every=500),
    size="4,000 train / 1,000 test, length-40 signals",
    kind="sequence",
    data_hint="generated on first use and cached (hasten data fetch mnist1d)",
)
