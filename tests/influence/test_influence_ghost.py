"""The Linear-layer Gram identities and the seeded projection, against dense per-example gradients."""
import math

import pytest
import torch

from hasten.influence import projection as proj_mod
from hasten.influence.projection import GaussianProjection
from hasten.measure import ghost


def dense_reference(x, d, bias):
    """g_i = Σ_t δ_it x_itᵀ (+ Σ_t δ_it), built by an explicit loop over positions."""
    w = sum(d[:, t, :, None] * x[:, t, None, :] for t in range(x.shape[1])).reshape(len(x), -1)
    return torch.cat([w, d.sum(1)], 1) if bias else w


@pytest.mark.parametrize("t", [1, 2, 5])
@pytest.mark.parametrize("bias", [True, False])
def test_dot_and_sqnorm_match_dense_gradients(t, bias):
    g = torch.Generator().manual_seed(t)
    shapes = ((7, 6), (7, 4), (5, 6), (5, 4))
    xa, da, xb, db = (torch.randn(n, t, k, generator=g, dtype=torch.float64) for n, k in shapes)
    ga, gb = dense_reference(xa, da, bias), dense_reference(xb, db, bias)
    torch.testing.assert_close(ghost.dot(xa, da, xb, db, bias), ga @ gb.T)
    torch.testing.assert_close(ghost.sqnorm(xa, da, bias), ga.square().sum(1))
    torch.testing.assert_close(torch.cat(ghost.dense(xa, da, bias), 1), ga)


def test_pair_sum_is_chunked_without_changing_the_result(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, d = (torch.randn(9, 3, k, generator=g, dtype=torch.float64) for k in (4, 2))
    full = ghost.dot(x, d, x, d, True)
    monkeypatch.setattr(ghost, "MAX_ELEMENTS", 20)
    torch.testing.assert_close(ghost.dot(x, d, x, d, True), full)
    torch.testing.assert_close(ghost.sqnorm(x, d, True), torch.diagonal(full))


def test_prefer_dense_compares_flops():
    assert not ghost.prefer_dense(1, 512, 512, True)  # one position: Gram form always
    assert not ghost.prefer_dense(4, 256, 256, True)  # 16·512 < 256·257
    assert ghost.prefer_dense(128, 128, 384, True)  # transformer layer: 128²·512 > 384·129


def test_projection_blocks_compose_to_one_matrix(monkeypatch):
    monkeypatch.setattr(proj_mod, "BLOCK_ELEMENTS", 16 * 3)  # 3 rows of Pᵀ per block: blocks cross parameters
    p = GaussianProjection(16, seed=5)
    g = {"a": torch.randn(4, 10, dtype=torch.float64), "b": torch.randn(4, 7, dtype=torch.float64)}
    full = p.matrix({"a": 10, "b": 7}).double()
    projected = p.project("a", g["a"]) + p.project("b", g["b"])
    torch.testing.assert_close(projected, torch.cat([g["a"], g["b"]], 1) @ full.T)
    again = GaussianProjection(16, seed=5, cache_bytes=0).project("a", g["a"])  # regenerated, not cached
    torch.testing.assert_close(again, p.project("a", g["a"]))
    assert not torch.allclose(GaussianProjection(16, seed=6).project("a", g["a"]), again)


def test_projection_entries_are_standard_gaussian_over_d():
    d = 256
    m = GaussianProjection(d, seed=1).matrix({"w": 4000})
    assert abs(m.mean().item()) < 5 / math.sqrt(d * m.numel())  # 5 standard errors
    assert abs(m.var().item() * d - 1) < 0.01  # variance 1/d
    # E[PᵀP] = I: squared norms are preserved on average
    v = torch.randn(4000)
    ratios = torch.stack([(GaussianProjection(d, seed=s).matrix({"w": 4000}) @ v).square().sum() for s in range(20)])
    assert abs(ratios.mean().item() / v.square().sum().item() - 1) < 0.05
