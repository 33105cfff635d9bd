"""A registered task whose data is image files read lazily: trains the same with data_workers=0 and 2 and as tensors."""
import dataclasses
import doctest
import multiprocessing
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import Dataset, TensorDataset  # noqa: E402

import hasten.tasks  # noqa: E402
from hasten.tasks import TASKS, Task, get_task, register  # noqa: E402
from hasten.train import TrainConfig, fit, load_checkpoint  # noqa: E402

SIDE, CLASSES = 8, 3


class PngFolder(Dataset):
    """One grey image per file, named <index>_<label>.png; a file is read only when its item is asked for."""

    def __init__(self, directory: Path):
        self.files = sorted(directory.glob("*.png"))

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        path = self.files[i]
        image = torch.from_numpy(mpimg.imread(path)[:, :, 0].copy())  # grey: R = G = B; alpha dropped
        return image, int(path.stem.split("_")[1])


def write_pngs(directory: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir()
    for i in range(n):
        label = int(rng.integers(CLASSES))
        image = rng.random((SIDE, SIDE)) * 0.5
        image[:, label * 2 : label * 2 + 3] += 0.5  # a class is a brighter band of columns
        mpimg.imsave(directory / f"{i:04d}_{label}.png", image, cmap="gray", vmin=0, vmax=1)


def as_tensors(dataset: Dataset) -> TensorDataset:
    x, y = zip(*(dataset[i] for i in range(len(dataset))))
    return TensorDataset(torch.stack(x), torch.tensor(y))


def model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, CLASSES))


@pytest.fixture
def png_task(tmp_path):
    write_pngs(tmp_path / "train", 46, seed=0)
    write_pngs(tmp_path / "test", 12, seed=1)

    def load(path):
        root = Path(path or tmp_path)
        return PngFolder(root / "train"), PngFolder(root / "test")

    task = register(Task(name="png-bands", description="8x8 PNG files, 3 classes", load=load,
                         models={"mlp": model}, loss=F.cross_entropy,
                         metric=lambda out, y: (out.argmax(1) == y).float()), replace=True)
    yield task
    TASKS.pop(task.name)


def train(task, run_dir, **overrides) -> dict:
    # 46 = 4·10 + 6: the epoch ends on a short batch; 7 steps run into the second epoch.
    cfg = TrainConfig(task=task.name, steps=7, batch_size=10, lr=0.2, eval_every=3, checkpoint_every=0, noise="off",
                      progress=False, threads=1, device="cpu", **overrides)
    result = fit(task, cfg, run_dir=run_dir)
    weights = load_checkpoint(run_dir / "checkpoint-latest.pt")["model"]
    return {"metrics": result.metrics, "loss": result.loss, **weights}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_png_files_train_identically_in_workers_and_as_tensors(png_task, tmp_path):
    task = get_task("png-bands")
    assert task is png_task
    in_process = train(task, tmp_path / "w0", data_workers=0)
    in_workers = train(task, tmp_path / "w2", data_workers=2)
    assert not multiprocessing.active_children()  # fit stopped its workers
    tensors = dataclasses.replace(png_task, load=lambda path: tuple(map(as_tensors, png_task.load(path))))
    from_tensors = train(tensors, tmp_path / "tensors")
    assert same(in_process, in_workers)
    assert same(in_process, from_tensors)  # the same examples in the same order, and the same dropout


def test_register_doctest():
    runner = doctest.DocTestRunner()
    for example in doctest.DocTestFinder().find(hasten.tasks.register, globs=vars(hasten.tasks).copy()):
        runner.run(example)
    assert runner.tries > 0 and runner.failures == 0
