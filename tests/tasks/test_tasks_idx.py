"""IDX parsing against hand-written bytes, and Fashion-MNIST loading from a directory of tiny IDX files."""
import gzip
import struct

import numpy as np
import pytest
import torch

from hasten.errors import HastenError
from hasten.tasks import fashion
from hasten.tasks.idx import parse_idx, read_idx


def idx_bytes(code: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file written by hand: 0, 0, type code, ndim, big-endian uint32 dims, payload."""
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def test_uint8_plain_and_gzip(tmp_path):
    raw = idx_bytes(0x08, (2, 3, 4), bytes(range(24)))
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    expected = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, expected)


def test_big_endian_multibyte_types():
    ints = parse_idx(idx_bytes(0x0C, (3,), struct.pack(">iii", 1, -2, 70000)))
    np.testing.assert_array_equal(ints, [1, -2, 70000])
    floats = parse_idx(idx_bytes(0x0D, (2,), struct.pack(">ff", 1.5, -0.25)))
    np.testing.assert_array_equal(floats, [1.5, -0.25])
    shorts = parse_idx(idx_bytes(0x0B, (1, 2), struct.pack(">hh", 258, -3)))
    np.testing.assert_array_equal(shorts, [[258, -3]])


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes([0, 1, 8, 1]) + struct.pack(">I", 2) + b"ab",  # second magic byte not zero
        bytes([0, 0, 0x42, 1]) + struct.pack(">I", 2) + b"ab",  # unknown type code
        bytes([0, 0, 8, 2]) + struct.pack(">I", 2),  # header cut short
        idx_bytes(0x08, (2, 3), bytes(5)),  # one byte missing
        idx_bytes(0x08, (2, 3), bytes(7)),  # one byte too many
    ],
)
def test_corrupt_bytes_raise(raw):
    with pytest.raises(HastenError, match="corrupt"):
        parse_idx(raw)


def test_corrupt_or_missing_files_raise(tmp_path):
    (tmp_path / "bad.gz").write_bytes(b"this is not gzip")
    with pytest.raises(HastenError, match="corrupt"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(idx_bytes(8, (4,), bytes(4)))[:-6])
    with pytest.raises(HastenError, match="corrupt"):
        read_idx(tmp_path / "cut.gz")
    with pytest.raises(HastenError, match="not found"):
        read_idx(tmp_path / "absent")


def write_fashion(directory, n_train=5, n_test=3, gz=True, labels=None):
    rng = np.random.default_rng(0)
    images = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
        for kind, arr, dims in (("images-idx3", x, (n, 28, 28)), ("labels-idx1", y, (len(y),))):
            raw = idx_bytes(0x08, dims, arr.tobytes())
            name = f"{split}-{kind}-ubyte"
            if gz:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
        images[split] = (x, y)
    return images


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_loads_any_directory(tmp_path, gz):
    images = write_fashion(tmp_path, gz=gz)
    assert fashion.available(str(tmp_path))
    train, test = fashion.load(str(tmp_path))
    for ds, (x, y) in ((train, images["train"]), (test, images["t10k"])):
        xs, ys = ds.tensors
        assert xs.shape == (len(x), 1, 28, 28) and xs.dtype == torch.float32 and ys.dtype == torch.int64
        expected = (x.astype(np.float64) / 255 - 0.2860) / 0.3530
        np.testing.assert_allclose(xs[:, 0].numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(ys.numpy(), y)


def test_fashion_missing_says_how_to_install(tmp_path):
    assert not fashion.available(str(tmp_path))
    with pytest.raises(HastenError, match="apt-get install dataset-fashion-mnist"):
        fashion.load(str(tmp_path))


def test_fashion_label_mismatch_is_corrupt(tmp_path):
    write_fashion(tmp_path, n_train=5, n_test=3, labels=np.zeros(4, dtype=np.uint8))
    with pytest.raises(HastenError, match="corrupt"):
        fashion.load(str(tmp_path))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    with pytest.raises(HastenError, match="corrupt"):
        fashion.load(str(tmp_path))  # errors are not cached


@pytest.mark.skipif(not fashion.available(None), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_real_files():
    train, test = fashion.load(None)
    assert train.tensors[0].shape == (60000, 1, 28, 28) and test.tensors[0].shape == (10000, 1, 28, 28)
    # the normalization constants are the training set's pixel mean and std
    x = train.tensors[0]
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    assert torch.equal(torch.bincount(train.tensors[1]), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.tensors[1]), torch.full((10,), 1000))
