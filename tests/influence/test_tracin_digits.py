"""TracIn on a real model: random projections keep the ranking, and self-influence finds flipped labels (digits)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn

from hasten.influence import TracIn


def digits(flip: float = 0.0, seed: int = 0):
    """sklearn digits in [0, 1], shuffled; a fraction ``flip`` of the labels changed to another class at random."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(bunch.target))
    x = torch.tensor(bunch.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target[order])
    flipped = torch.from_numpy(rng.permutation(len(y))[: int(flip * len(y))])
    y[flipped] = (y[flipped] + torch.from_numpy(rng.integers(1, 10, len(flipped)))) % 10
    return x, y, flipped


def train_full_batch(x, y, sizes, steps, lr=0.3, keep=3, seed=0):
    """Plain full-batch SGD with momentum (no hasten), saving ``keep`` evenly spaced checkpoints with their LR."""
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    model = nn.Sequential(*layers)
    opt, checkpoints = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), []
    for step in range(1, steps + 1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % (steps // keep) == 0:
            checkpoints.append(({k: v.clone() for k, v in model.state_dict().items()}, lr))
    return model, checkpoints


@pytest.fixture(scope="module")
def digits_mlp():
    """The 64-256-256-10 MLP trained briefly: 45 full-batch steps (97% test accuracy), 3 checkpoints."""
    x, y, _ = digits()
    model, checkpoints = train_full_batch(x[:1400], y[:1400], (64, 256, 256, 10), steps=45)
    return model, checkpoints, (x[:1400], y[:1400]), (x[1400:], y[1400:])


def test_projection_keeps_self_influence_ranks_at_1024(digits_mlp):
    model, checkpoints, (x, y), _ = digits_mlp
    train = (x[:400], y[:400])
    exact = TracIn(model, F.cross_entropy, checkpoints).self_influence(train)
    projected = TracIn(model, F.cross_entropy, checkpoints, projection_dim=1024).self_influence(train)
    assert spearmanr(exact, projected).statistic >= 0.99


def test_projection_keeps_influence_ranks_at_4096(digits_mlp):
    model, checkpoints, (x, y), (xt, yt) = digits_mlp
    train, test = (x[:150], y[:150]), (xt[:20], yt[:20])
    last = checkpoints[-1:]  # one checkpoint keeps the test quick; the curve over d is in the benchmark
    exact = TracIn(model, F.cross_entropy, last).influence(train, test)
    projected = TracIn(model, F.cross_entropy, last, projection_dim=4096, seed=1).influence(train, test)
    rho = [spearmanr(exact[j], projected[j]).statistic for j in range(len(exact))]
    assert np.mean(rho) >= 0.95


def test_self_influence_finds_flipped_labels():
    x, y, flipped = digits(flip=0.1, seed=3)
    model, checkpoints = train_full_batch(x, y, (64, 128, 10), steps=30)
    scores = TracIn(model, F.cross_entropy, checkpoints).self_influence((x, y))
    top = set(torch.argsort(scores, descending=True)[: len(flipped)].tolist())
    found = len(top & set(flipped.tolist())) / len(flipped)
    assert found >= 0.5
