"""Exact per-example gradient dot products of ``nn.Linear`` layers without forming the gradients.

A Linear layer y = W x + b applied at positions t = 1..T (a sequence axis, or T = 1) gives example i the weight
gradient g_i = Σ_t δ_it x_itᵀ and the bias gradient Σ_t δ_it, where x_it is the layer input and δ_it = ∂ℓ_i/∂y_it
(Goodfellow 2015, "Efficient per-example gradient computations"). Hence, for two examples a and b,

    g_a · g_b = Σ_{t,t'} (x_at · x_bt' + 1)(δ_at · δ_bt')        (the "+ 1" only when the layer has a bias)

which for T = 1 is the element-wise product of two Gram matrices, (X_a X_bᵀ + 1) ⊙ (Δ_a Δ_bᵀ): the last-layer
factorization of TracIn (Pruthi et al. 2020, practical heuristics), valid for every Linear layer. With a long
sequence the double sum over (t, t') can cost more than the dense dot product; :func:`prefer_dense` picks the
cheaper form.

Shapes: ``x`` is (n, T, n_in) and ``delta`` is (n, T, n_out).
"""
from __future__ import annotations

import torch

MAX_ELEMENTS = 1 << 24  # bound on temporaries of the (t, t') sum: 16M elements (64 MB in float32)


def prefer_dense(t: int, n_in: int, n_out: int, bias: bool) -> bool:
    """True when forming g (n_out·n_in per pair) is cheaper than the (t, t') double sum (t²·(n_in+n_out) per pair)."""
    return t > 1 and t * t * (n_in + n_out) > n_out * (n_in + bias)


def dense(x: torch.Tensor, delta: torch.Tensor, bias: bool) -> list[torch.Tensor]:
    """Per-example gradients [weight (n, n_out·n_in), bias (n, n_out)], laid out like ``W.grad`` and ``b.grad``."""
    n = x.shape[0]
    weight = torch.einsum("nto,nti->noi", delta, x).reshape(n, -1)
    return [weight, delta.sum(1)] if bias else [weight]


def dot(xa: torch.Tensor, da: torch.Tensor, xb: torch.Tensor, db: torch.Tensor, bias: bool) -> torch.Tensor:
    """(n_a, n_b) matrix of per-example gradient dot products g_a · g_b of one Linear layer."""
    na, ta, _ = xa.shape
    nb, tb, _ = xb.shape
    if ta == 1 and tb == 1:  # (X_a X_bᵀ + 1) ⊙ (Δ_a Δ_bᵀ)
        gram = xa[:, 0] @ xb[:, 0].T
        if bias:
            gram += 1
        return gram * (da[:, 0] @ db[:, 0].T)
    out = xa.new_empty(na, nb)
    step = max(1, MAX_ELEMENTS // max(1, na * ta * tb))
    xa2, da2 = xa.reshape(na * ta, -1), da.reshape(na * ta, -1)
    for s in range(0, nb, step):
        xs, ds = xb[s : s + step], db[s : s + step]
        m = xs.shape[0]
        gram = (xa2 @ xs.reshape(m * tb, -1).T).view(na, ta, m, tb)
        if bias:
            gram += 1
        gram *= (da2 @ ds.reshape(m * tb, -1).T).view(na, ta, m, tb)
        out[:, s : s + m] = gram.sum((1, 3))
    return out


def sqnorm(x: torch.Tensor, delta: torch.Tensor, bias: bool) -> torch.Tensor:
    """(n,) squared norms ‖g_i‖² = Σ_{t,t'} (x_it·x_it' + 1)(δ_it·δ_it'); for T = 1, (‖x_i‖² + 1)‖δ_i‖²."""
    n, t, _ = x.shape
    if t == 1:
        xx = x[:, 0].square().sum(1)
        if bias:
            xx += 1
        return xx * delta[:, 0].square().sum(1)
    if prefer_dense(t, x.shape[2], delta.shape[2], bias):
        return sum(g.square().sum(1) for g in dense(x, delta, bias))
    out = x.new_empty(n)
    step = max(1, MAX_ELEMENTS // (t * t))
    for s in range(0, n, step):
        xs, ds = x[s : s + step], delta[s : s + step]
        gram = xs @ xs.transpose(1, 2)
        if bias:
            gram += 1
        out[s : s + step] = (gram * (ds @ ds.transpose(1, 2))).sum((1, 2))
    return out
