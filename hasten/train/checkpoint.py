"""Atomic, checksummed checkpoint files and the random-number state that makes a resumed run exact.

File layout: a 52-byte header ``b"HASTENCK" | version (u32) | sha256 of payload (32 bytes) | payload length (u64)``
followed by the ``torch.save`` bytes of the payload. The file is written to a temporary name in the same folder,
flushed, fsync'ed and renamed over the target (``os.replace`` is atomic), so a reader sees the old file or the new
one, never half of one. Loading checks the length and the hash before unpickling, and unpickles with
``weights_only=True`` (tensors, numbers, strings and containers only).
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hasten.errors import HastenError

MAGIC = b"HASTENCK"
VERSION = 1
_HEADER = struct.Struct("<8sI32sQ")


class CorruptCheckpoint(HastenError):
    """A checkpoint file that is truncated or whose checksum does not match."""


def encode_checkpoint(payload: dict) -> bytes:
    """Header + ``torch.save`` bytes of ``payload``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    return _HEADER.pack(MAGIC, VERSION, hashlib.sha256(body).digest(), len(body)) + body


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Atomically write ``payload`` (a dict of tensors, numbers, strings, containers) with its checksum."""
    write_atomic(path, encode_checkpoint(payload))


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a file written by :func:`save_checkpoint`; a truncated or altered file raises :class:`CorruptCheckpoint`
    (a :class:`HastenError`)."""
    path = Path(path)
    corrupt = CorruptCheckpoint(f"checkpoint {path} is corrupt (truncated or checksum mismatch): restore it from a "
                                "copy, or move it away")
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise corrupt
    magic, version, digest, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise corrupt
    if version > VERSION:
        raise HastenError(f"checkpoint {path} was written by a newer hasten (format {version}): upgrade hasten")
    body = memoryview(data)[_HEADER.size :]
    if len(body) != length or hashlib.sha256(body).digest() != digest:
        raise corrupt
    return torch.load(io.BytesIO(body), map_location=map_location, weights_only=True)


def stale_temp_files(folder: str | Path) -> list[Path]:
    """Temporary files left by writes that were killed midway (safe to delete: the target was never replaced)."""
    return sorted(Path(folder).glob(".*.tmp-*"))


def rng_state() -> dict:
    """Every global random state a training step can draw from: Python, NumPy, torch CPU and CUDA."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when the device count matches)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
