"""Each layer's per-example squared-norm formula (hasten.measure.ghost) against torch.func per-example gradients.

The loss of example i is ⟨layer(x_i), r_i⟩ with a random r, so the output gradient δ_i = r_i is known exactly and
the reference gradient comes from vmap(grad(...)) of the layer itself, not from any formula.
"""
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from hasten.measure import ghost

DT = torch.float64
N = 5


def reference_sqnorms(layer: nn.Module, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in layer.named_parameters() if not p.requires_grad}

    def loss(p, xi, ri):
        return (functional_call(layer, (p, frozen), (xi.unsqueeze(0),)) * ri.unsqueeze(0)).sum()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, r)
    return sum(g.flatten(1).square().sum(1) for g in grads.values())


def check(layer: nn.Module, x: torch.Tensor, seed: int = 0):
    layer = layer.to(DT)
    with torch.no_grad():  # non-trivial affine parameters (norm layers start at w = 1, b = 0)
        for p in layer.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=DT, generator=torch.Generator().manual_seed(seed)))
    out = layer(x)
    r = torch.randn(out.shape, dtype=DT, generator=torch.Generator().manual_seed(seed + 1))
    found = ghost.layer_rule(layer)
    assert not isinstance(found, str), found
    rule, min_dim = found
    assert x.dim() >= min_dim
    saved = x if layer.weight.requires_grad else None
    torch.testing.assert_close(rule(layer, saved, r), reference_sqnorms(layer, x, r), rtol=1e-10, atol=0)


def randn(*shape):
    return torch.randn(*shape, dtype=DT, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(5, 3), (N, 5)),                      # T = 1: (‖x‖² + 1)‖δ‖²
    (nn.Linear(16, 16, bias=False), (N, 2, 16)),    # short sequence: the (t, t') Gram sum
    (nn.Linear(3, 2), (N, 10, 3)),                  # long sequence: per-example gradients formed
    (nn.Linear(4, 2), (N, 3, 2, 4)),                # several position axes
])
def test_linear(layer, shape):
    assert ghost.prefer_dense(10, 3, 2, True) and not ghost.prefer_dense(2, 16, 16, False)
    check(layer, randn(*shape))


def test_linear_with_frozen_weight_counts_the_bias_only():
    layer = nn.Linear(4, 3)
    layer.weight.requires_grad_(False)
    check(layer, randn(N, 6, 4))


def test_dense_path_in_chunks(monkeypatch):
    monkeypatch.setattr(ghost, "MAX_ELEMENTS", 7)  # 1 example per chunk
    check(nn.Linear(3, 2), randn(N, 10, 3))


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (N, 3, 6, 6)),
    (nn.Conv2d(3, 4, (3, 2), stride=2, padding=(1, 0), dilation=(2, 1), bias=False), (N, 3, 9, 7)),
    (nn.Conv2d(2, 3, 4, padding="same"), (N, 2, 5, 5)),  # even kernel: asymmetric padding
    (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"), (N, 2, 5, 4)),
    (nn.Conv1d(3, 4, 5, stride=2, padding=2, padding_mode="circular"), (N, 3, 11)),
    (nn.Conv1d(3, 4, 1), (N, 3, 40)),
])
def test_conv(layer, shape):
    check(layer, randn(*shape))


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("shape", [(N, 12), (N,), (N, 3, 4)])
def test_embedding_with_repeated_tokens(padding_idx, shape):
    ids = torch.randint(0, 4, shape, generator=torch.Generator().manual_seed(1))  # 4 ids: many repeats
    assert len(shape) == 1 or (ids == 0).any()
    check(nn.Embedding(6, 3, padding_idx=padding_idx), ids)


@pytest.mark.parametrize("layer, shape", [
    (nn.LayerNorm(5), (N, 4, 5)),
    (nn.LayerNorm((3, 5)), (N, 2, 3, 5)),
    (nn.LayerNorm(5, bias=False), (N, 5)),
    (nn.GroupNorm(2, 4), (N, 4, 3, 3)),
    (nn.GroupNorm(1, 4), (N, 4)),
    (nn.RMSNorm(5), (N, 4, 5)),
    (nn.RMSNorm(5, eps=1e-3), (N, 2, 5)),
])
def test_normalization_layers(layer, shape):
    check(layer, randn(*shape) * 2 + 1)


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("layer, why", [
    (nn.Conv2d(4, 4, 3, groups=2), "groups=2"),
    (nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (OwnForward(3, 3), "OwnForward"),
    (nn.BatchNorm1d(3), "BatchNorm1d"),
    (nn.MultiheadAttention(4, 2), "MultiheadAttention"),
])
def test_layers_without_a_rule_say_why(layer, why):
    found = ghost.layer_rule(layer)
    assert isinstance(found, str) and why in found
