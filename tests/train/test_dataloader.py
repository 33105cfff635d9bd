"""DataLoader workers behind the exactly-once sampler: changing batch sizes, DDP shards, exact resume, bad items."""
import doctest

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, IterableDataset

from hasten.errors import HastenError
from hasten.train import Callback, fit, load_checkpoint
import hasten.train.data
from hasten.train.data import Batches, check_examples
from hasten.train.sampler import EpochSampler, shard
from train_tiny_task import tiny_config, tiny_task

N = 37


class Numbered(Dataset):
    """Item i is (i as a float feature, i): a batch's targets are the indices it was read from."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return torch.tensor([float(i)]), i


class Lazy(Dataset):
    """Any map-style dataset: the items of a TensorDataset, one at a time (no direct indexing)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors.tensors[0])

    def __getitem__(self, i):
        return self.tensors[i]


@pytest.fixture(scope="module")
def one_process():
    sampler = EpochSampler(N)
    batches = Batches(Numbered(), sampler, torch.device("cpu"), workers=2)
    yield sampler, batches
    batches.close()


def check(batch, indices):
    assert torch.equal(batch[1], indices) and torch.equal(batch[0][:, 0], indices.float())


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), sizes=st.lists(st.integers(1, 2 * N), min_size=1, max_size=12))
def test_changing_batch_sizes_read_each_example_once_per_epoch(one_process, seed, sizes):
    sampler, batches = one_process
    sampler.load_state_dict({"seed": seed, "epoch": 0, "position": 0})  # the workers' prediction is now wrong
    restarts, seen = batches.restarts, {}
    for b in sizes:
        indices = sampler.next_batch(b)
        batch = batches.fetch(indices, b)
        check(batch, indices)
        seen.setdefault(sampler.epoch, []).extend(batch[1].tolist())
    for epoch, items in seen.items():
        assert len(items) == len(set(items)) and (epoch == sampler.epoch or sorted(items) == list(range(N)))
    # One process: a changed batch size only cuts the predicted stream elsewhere, so nothing is read twice.
    assert batches.restarts - restarts <= 1


def test_ddp_shards_follow_a_changed_batch_size():
    world, sizes = 2, [8, 8, 8, 12, 8, 5, 5, 12, 3, 8]  # epoch 0 ends on 1 example: rank 1's shard is empty
    samplers = [EpochSampler(N, seed=3) for _ in range(world)]
    cpu = torch.device("cpu")
    ranks = [Batches(Numbered(), s, cpu, rank=r, world=world, workers=2) for r, s in enumerate(samplers)]
    seen = []
    for b in sizes:
        drawn = [s.next_batch(b) for s in samplers]  # every rank draws the same global batch
        parts = [batches.fetch(shard(d, r, world), b) for r, (d, batches) in enumerate(zip(drawn, ranks))]
        for r, part in enumerate(parts):
            check(part, shard(drawn[r], r, world))
        seen.extend(torch.cat([p[1] for p in parts]).tolist())
        assert sum(len(p[1]) for p in parts) == len(drawn[0]) and parts[0][0].shape[1:] == (1,)
    assert sorted(seen[:N]) == list(range(N))
    assert all(r.restarts > 0 for r in ranks)  # a changed size was a missed prediction, and it was caught
    for r in ranks:
        r.close()


class Sizes(Callback):
    """Sets the batch size at batch_start from a table: changes mid-epoch, with nothing saved to resume."""

    def __init__(self, sizes):
        self.sizes = sizes

    def on_batch_start(self, state):
        state.batch_size = self.sizes[state.step % len(self.sizes)]


class Crash(Callback):
    def on_batch_end(self, state):
        if state.step == 7:
            raise KeyboardInterrupt


def test_resume_mid_epoch_with_workers_is_bit_identical(tmp_path):
    tensors = tiny_task(dropout=0.2)
    task = tiny_task(dropout=0.2)
    object.__setattr__(task, "load", lambda path: tuple(map(Lazy, tensors.load(path))))  # 96 training examples
    cfg = tiny_config(steps=12, data_workers=2, checkpoint_every=5, eval_every=6, noise="off")  # the data, alone
    sizes = [8, 12, 4, 20, 8]
    whole = fit(task, cfg, [Sizes(sizes)], run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):  # after the checkpoint at step 5 (52 examples: mid-epoch)
        fit(task, cfg, [Sizes(sizes), Crash()], run_dir=tmp_path / "cut")
    assert load_checkpoint(tmp_path / "cut" / "checkpoint-latest.pt")["sampler"]["position"] == 52
    resumed = fit(task, cfg, [Sizes(sizes)], run_dir=tmp_path / "cut")
    assert (resumed.metrics, resumed.loss, resumed.examples) == (whole.metrics, whole.loss, whole.examples)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint-latest.pt")["model"] for d in ("whole", "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class Bare(Dataset):
    def __init__(self, item):
        self.item = item

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.item


class Stream(IterableDataset):
    def __iter__(self):
        yield torch.zeros(6), 0


@pytest.mark.parametrize("dataset, message", [
    (Bare(torch.zeros(6)), r"training set: item 0 is a Tensor; .* \(input, target\) pairs"),
    (Bare((torch.zeros(6), "cat")), r"training set: item 0 is a tuple holding a str; .* \(input, target\) pairs"),
    (Bare({"x": torch.zeros(6), "y": 0}), r"item 0 is a dict"),
    (Stream(), r"training set is a Stream: .* map-style"),
])
def test_items_that_are_not_pairs_fail_in_one_line(tmp_path, dataset, message):
    task = tiny_task()
    _, test = task.load(None)
    object.__setattr__(task, "load", lambda path: (dataset, test))
    with pytest.raises(HastenError, match=message) as error:
        fit(task, tiny_config(steps=2, data_workers=2), run_dir=tmp_path)
    assert "\n" not in str(error.value) and str(error.value).startswith("tiny's training set")


def test_workers_must_not_be_negative(tmp_path):
    with pytest.raises(HastenError, match="data_workers=-1 must be 0"):
        fit(tiny_task(), tiny_config(steps=2, data_workers=-1), run_dir=tmp_path)
    check_examples(Numbered(), "numbers")  # numbers as targets are fine


def test_doctests():
    assert doctest.testmod(hasten.train.data).failed == 0
