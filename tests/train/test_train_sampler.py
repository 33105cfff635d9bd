"""EpochSampler: every example exactly once per epoch for any batch-size sequence; exact restore; gather."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset, Subset, TensorDataset

from hasten.errors import HastenError
from hasten.train.sampler import EpochSampler, epoch_permutation, gather


def draw(sampler, sizes):
    """(epoch, indices) for each requested size; the epoch is the one the batch came from."""
    out = []
    for b in sizes:
        idx = sampler.next_batch(b)
        out.append((sampler.epoch, idx.tolist()))
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**40), sizes=st.lists(st.integers(1, 50), min_size=1, max_size=40))
def test_each_example_exactly_once_per_epoch(n, seed, sizes):
    batches = draw(EpochSampler(n, seed), sizes)
    by_epoch: dict[int, list[int]] = {}
    position = 0
    for (epoch, idx), b in zip(batches, sizes):
        # A batch is the requested size, or truncated to what the epoch has left; it never straddles epochs.
        left = n - position if position < n else n
        assert len(idx) == min(b, left)
        position = (position if position < n else 0) + len(idx)
        by_epoch.setdefault(epoch, []).extend(idx)
    epochs = sorted(by_epoch)
    assert epochs == list(range(len(epochs)))
    for e in epochs:
        seen = by_epoch[e]
        assert len(seen) == len(set(seen))  # never twice within an epoch
        assert seen == epoch_permutation(n, seed, e).tolist()[: len(seen)]
        if e < epochs[-1]:
            assert sorted(seen) == list(range(n))  # finished epochs hold every example


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 30), seed=st.integers(0, 1000), sizes=st.lists(st.integers(1, 20), min_size=2, max_size=30),
       cut=st.integers(0, 29))
def test_restore_continues_exactly(n, seed, sizes, cut):
    cut = cut % len(sizes)
    sampler = EpochSampler(n, seed)
    draw(sampler, sizes[:cut])
    state = sampler.state_dict()
    rest = draw(sampler, sizes[cut:])
    restored = EpochSampler(n, seed=seed + 1)  # the seed comes back from the state too
    restored.load_state_dict(dict(state))
    assert draw(restored, sizes[cut:]) == rest


def test_epochs_and_seeds_differ():
    assert not torch.equal(epoch_permutation(50, 0, 0), epoch_permutation(50, 0, 1))
    assert not torch.equal(epoch_permutation(50, 0, 0), epoch_permutation(50, 1, 0))
    assert torch.equal(epoch_permutation(50, 3, 2), epoch_permutation(50, 3, 2))


def test_bad_sizes():
    with pytest.raises(HastenError):
        EpochSampler(0)
    with pytest.raises(HastenError):
        EpochSampler(5).next_batch(0)


class Items(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_gather_tensor_subset_and_generic_agree():
    x, y = torch.randn(10, 3), torch.arange(10)
    idx = torch.tensor([7, 2, 2, 9])
    expected = (x[idx], y[idx])
    for dataset in (TensorDataset(x, y), Items(x, y)):
        got = gather(dataset, idx)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    sub = Subset(TensorDataset(x, y), [9, 8, 7, 6, 5])
    got = gather(sub, torch.tensor([0, 4]))
    assert torch.equal(got[0], x[[9, 5]]) and torch.equal(got[1], y[[9, 5]])
