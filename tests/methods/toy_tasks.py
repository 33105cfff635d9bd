"""Small tasks for the conformance test: every method applies to at least one of them, and each trains in a
fraction of a second (real data would make the test slow)."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import TensorDataset

from hasten.tasks.base import Task
from hasten.tasks.digits import TASK as DIGITS
from hasten.tasks.models import CharTransformer, accuracy, cross_entropy
from hasten.tasks.shakespeare_mlm import MaskedLM, masked_accuracy, masked_cross_entropy

VOCAB, LENGTH = 16, 16


def image_cnn() -> nn.Module:
    """Images: conv-pool-strided conv-global pool-linear (takes any size ≥ 4, so it can be resized)."""
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


@functools.lru_cache(maxsize=1)
def _images(path=None):
    train, test = DIGITS.load(None)
    n_train, n_test = 512, 128
    mean, std = train.tensors[0].mean(), train.tensors[0].std()
    as_image = lambda d, n: TensorDataset(((d.tensors[0][:n] - mean) / std).reshape(-1, 1, 8, 8),  # noqa: E731
                                          d.tensors[1][:n])
    return as_image(train, n_train), as_image(test, n_test)


def sequences(n: int, seed: int, padded: bool = False) -> torch.Tensor:
    """Arithmetic progressions of tokens 1..15 (mod 15) with a random start and stride: the next token is
    predictable. ``padded``: each sequence keeps a random length of 8 to 17 tokens, then padding (0)."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(VOCAB - 1, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    tokens = 1 + (start + stride * torch.arange(LENGTH + 1)) % (VOCAB - 1)
    if padded:
        tokens[torch.arange(LENGTH + 1) >= torch.randint(8, LENGTH + 2, (n, 1), generator=g)] = 0
    return tokens


@functools.lru_cache(maxsize=1)
def _text(path=None):
    train, test = sequences(512, 0, padded=True), sequences(128, 1, padded=True)
    return TensorDataset(train[:, :-1], train[:, 1:]), TensorDataset(test[:, :-1], test[:, 1:])


@functools.lru_cache(maxsize=1)
def _mlm(path=None):
    from hasten.methods.data import mask_tokens

    train, test = sequences(512, 2)[:, :LENGTH], sequences(128, 3)[:, :LENGTH]
    masked, targets = mask_tokens(test, 0.15, VOCAB, VOCAB, torch.Generator().manual_seed(0))
    return TensorDataset(train, train), TensorDataset(masked, targets)


IMAGE = Task("toy-image", "digits as 1×8×8 images, small CNN with global pooling", _images, {"cnn": image_cnn},
             cross_entropy, accuracy, kind="image")
TEXT = Task("toy-text", "padded arithmetic progressions, causal transformer", _text,
            {"transformer": lambda: CharTransformer(VOCAB, LENGTH, dim=32, heads=2, layers=2)},
            cross_entropy, accuracy, kind="text")
MLM = Task("toy-mlm", "arithmetic progressions, masked-LM encoder", _mlm,
           {"encoder": lambda: MaskedLM(VOCAB, LENGTH, dim=32, heads=2, layers=2)},
           masked_cross_entropy, masked_accuracy, kind="text")
TASKS = (DIGITS, IMAGE, TEXT, MLM)
