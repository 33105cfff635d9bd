"""Checkpoint files: round trip, corruption detected, atomic writes; RNG state capture; LR schedules."""
import hashlib
import math
import os
import random

import numpy as np
import pytest
import torch

from hasten.errors import HastenError
from hasten.train.checkpoint import MAGIC, load_checkpoint, rng_state, save_checkpoint, set_rng_state, write_atomic
from hasten.train.schedule import make_schedule


def payload():
    return {"model": {"w": torch.randn(4, 3), "b": torch.arange(3)}, "step": 7, "lr": 0.05,
            "cfg": {"task": "tiny", "sizes": (1, 2)}, "nested": [1.5, None, "x"]}


def test_round_trip(tmp_path):
    data = payload()
    save_checkpoint(tmp_path / "c.pt", data)
    back = load_checkpoint(tmp_path / "c.pt")
    assert torch.equal(back["model"]["w"], data["model"]["w"]) and torch.equal(back["model"]["b"], data["model"]["b"])
    keys = ("step", "lr", "cfg", "nested")
    assert {k: back[k] for k in keys} == {k: data[k] for k in keys}
    raw = (tmp_path / "c.pt").read_bytes()
    assert raw[:8] == MAGIC
    assert raw[12:44] == hashlib.sha256(raw[52:]).digest()  # header: magic, version, sha256, length


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "magic"])
def test_corrupt_file_is_an_error(tmp_path, damage):
    path = tmp_path / "c.pt"
    save_checkpoint(path, payload())
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x01
    elif damage == "empty":
        raw = raw[:10]
    else:
        raw[0] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(HastenError, match="is corrupt .*restore it from a copy, or move it away"):
        load_checkpoint(path)


def test_atomic_write_leaves_no_temp_file_and_keeps_old_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, payload())
    save_checkpoint(path, {"step": 8})
    assert os.listdir(tmp_path) == ["c.pt"]
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {"bad": lambda: 0})  # cannot be pickled: fails before anything is written
    with pytest.raises(ZeroDivisionError):
        write_atomic(path, memoryview(b"abc")[(1 // 0):])
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.pt"]
    assert load_checkpoint(path)["step"] == 8


def test_rng_state_round_trip_through_a_file(tmp_path):
    torch.manual_seed(3)
    save_checkpoint(tmp_path / "r.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.nn.functional.dropout(
        torch.ones(8), 0.5).tolist())
    set_rng_state(load_checkpoint(tmp_path / "r.pt")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(2).tolist(), torch.nn.functional.dropout(
        torch.ones(8), 0.5).tolist()) == expected


def test_schedules_closed_form():
    cos = make_schedule("cosine", steps=100)
    assert [cos(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    assert cos(25) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    warm = make_schedule("cosine", steps=110, warmup_steps=10)
    assert [warm(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert warm(60) == pytest.approx(0.5)
    step = make_schedule("step", steps=100)
    assert [step(s) for s in (0, 49, 50, 74, 75, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert make_schedule("constant", steps=10, warmup_steps=2)(5) == 1.0
    with pytest.raises(HastenError):
        make_schedule("linear", steps=10)
    with pytest.raises(HastenError):
        make_schedule("cosine", steps=10, warmup_steps=11)


def test_docstring_examples():
    import doctest

    import hasten.train.sampler
    import hasten.train.schedule

    for module in (hasten.train.sampler, hasten.train.schedule):
        assert doctest.testmod(module).failed == 0
