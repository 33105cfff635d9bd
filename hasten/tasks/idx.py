"""Reader for the IDX format of MNIST and Fashion-MNIST (plain or gzip-compressed).

Layout (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
dimensions n, then n big-endian uint32 sizes, then the values in row-major order (multi-byte values big-endian).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from hasten.errors import HastenError

# IDX type code -> big-endian numpy dtype
_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def parse_idx(raw: bytes, name: str = "idx data") -> np.ndarray:
    """The array stored in the IDX bytes ``raw``; a wrong magic number or size raises :class:`HastenError`."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise HastenError(f"{name} is corrupt: bad IDX magic number {raw[:4].hex() or '(empty)'}; replace the file")
    dtype, ndim = np.dtype(_DTYPES[raw[2]]), raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise HastenError(f"{name} is corrupt: truncated IDX header; replace the file")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise HastenError(
            f"{name} is corrupt: IDX header says {shape} ({expected} bytes) but the file has {len(raw)} bytes; "
            "replace the file"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file; ``.gz`` files are decompressed. Unreadable or corrupt files raise :class:`HastenError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise HastenError(f"{path} not found") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise HastenError(f"{path} is corrupt or unreadable ({e}); replace the file") from None
    return parse_idx(raw, str(path))
