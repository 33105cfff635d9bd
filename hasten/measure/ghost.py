"""Per-example gradient norms of common layers from their inputs and output gradients, without forming gradients.

Every function here takes, for n examples, a layer's input (or what the forward computed from it) and
δ = ∂L/∂(layer output), the gradient one ordinary backward already computes (Goodfellow 2015, "Efficient
per-example gradient computations", arXiv:1510.01799). Each example's gradient is a function of its own rows only,
so squared norms and dot products come out exactly, in one backward, for every layer (not only the last).

Linear, y = W x + b at positions t = 1..T (a sequence axis, or T = 1): g_i = Σ_t δ_it x_itᵀ, bias gradient Σ_t δ_it.
For two examples a and b

    g_a · g_b = Σ_{t,t'} (x_at · x_bt' + 1)(δ_at · δ_bt')        (the "+ 1" only when the layer has a bias)

which for T = 1 is the element-wise product of two Gram matrices, (X_a X_bᵀ + 1) ⊙ (Δ_a Δ_bᵀ): the last-layer
factorization of TracIn (Pruthi et al. 2020, practical heuristics), valid for every Linear layer. With a long
sequence the double sum over (t, t') can cost more than forming g; :func:`prefer_dense` picks the cheaper form.
A convolution is the Linear case over spatial positions once its input is unfolded (:func:`conv_patches`).
Embeddings and element-wise affine parameters (LayerNorm, GroupNorm, RMSNorm) have their own small formulas
(:func:`embedding_sqnorm`, :func:`affine_sqnorm`). :func:`layer_rule` maps a module to the formula for its type.

Shapes: ``x`` is (n, T, n_in) and ``delta`` is (n, T, n_out) unless said otherwise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

MAX_ELEMENTS = 1 << 24  # bound on temporaries (the (t, t') sums, per-example gradients formed): 64 MB in float32


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
    out = x.new_empty(n)
    if prefer_dense(t, x.shape[2], delta.shape[2], bias):
        step = max(1, MAX_ELEMENTS // (delta.shape[2] * x.shape[2]))  # per-example gradients formed at once
        for s in range(0, n, step):
            out[s : s + step] = sum(g.square().sum(1) for g in dense(x[s : s + step], delta[s : s + step], bias))
        return out
    step = max(1, MAX_ELEMENTS // (t * t))
    for s in range(0, n, step):
        xs, ds = x[s : s + step], delta[s : s + step]
        gram = xs @ xs.transpose(1, 2)
        if bias:
            gram += 1
        out[s : s + step] = (gram * (ds @ ds.transpose(1, 2))).sum((1, 2))
    return out


def affine_sqnorm(xhat: torch.Tensor | None, delta: torch.Tensor, weight: bool = True, bias: bool = True):
    """(n,) ‖Σ_t x̂_it ⊙ δ_it‖² (weight, if ``weight``) + ‖Σ_t δ_it‖² (bias, if ``bias``) of y = w ⊙ x̂ + b.

    ``xhat`` and ``delta`` are (n, T, P) with P the parameter's size: for LayerNorm/RMSNorm x̂ is the normalized
    input and T every position; for GroupNorm P is the channels and T the spatial positions. It is also the bias
    part of a Linear layer (``weight=False``, ``xhat=None``).
    """
    out = delta.new_zeros(delta.shape[0])
    if weight:
        out += (xhat * delta).sum(1).square().sum(1)
    if bias:
        out += delta.sum(1).square().sum(1)
    return out


def embedding_sqnorm(ids: torch.Tensor, delta: torch.Tensor, padding_idx: int | None = None) -> torch.Tensor:
    """(n,) squared norms of an Embedding's per-example weight gradients, ``ids`` (n, T) and ``delta`` (n, T, d).

    g_i = Σ_t e_{id_it} δ_itᵀ, so ‖g_i‖² = Σ_{t,t'} [id_it = id_it'] (δ_it · δ_it'): repeated tokens of one example
    add up before squaring, and positions holding ``padding_idx`` get no gradient. Computed as Σ over each example's
    distinct ids of ‖Σ_{t: id_it = v} δ_it‖², by sorting each row (O(n·T·d), no host sync).
    """
    n = ids.shape[0]
    ids = ids.reshape(n, -1)
    t = ids.shape[1]
    delta = delta.reshape(n, t, -1)
    if padding_idx is not None:
        delta = delta * (ids != padding_idx).unsqueeze(-1).to(delta.dtype)
    if t == 1:
        return delta[:, 0].square().sum(1)
    d = delta.shape[2]
    sorted_ids, order = ids.sort(1)
    new = torch.ones_like(sorted_ids, dtype=torch.bool)
    new[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    segment = new.cumsum(1) - 1 + torch.arange(n, device=ids.device).unsqueeze(1) * t  # one row per (i, id)
    rows = delta.gather(1, order.unsqueeze(-1).expand(-1, -1, d)).reshape(n * t, d)
    sums = delta.new_zeros(n * t, d).index_add_(0, segment.reshape(-1), rows)
    return sums.square().sum(1).view(n, t).sum(1)


def conv_patches(x, kernel_size, stride, dilation, pad, padding_mode: str = "zeros") -> torch.Tensor:
    """(n, L, C·∏kernel_size) im2col patches of a Conv1d (n, C, W) or Conv2d (n, C, H, W) input.

    A convolution (groups = 1) is then a Linear layer applied at the L output positions, with the patches as its
    input and δ reshaped to (n, L, out_channels): :func:`sqnorm` applies. ``pad`` is in ``F.pad`` order (last
    dimension first), as in the module's ``_reversed_padding_repeated_twice``.
    """
    if any(pad):
        x = F.pad(x, tuple(pad), mode="constant" if padding_mode == "zeros" else padding_mode)
    if x.dim() == 3:  # Conv1d: a height-1 Conv2d
        x, kernel_size, stride, dilation = x.unsqueeze(2), (1, *kernel_size), (1, *stride), (1, *dilation)
    return F.unfold(x, kernel_size, dilation=dilation, stride=stride).transpose(1, 2)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.dtype in _LOW_PRECISION else t


def trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


# Layer rules: (module, input or None, δ) -> (n,) per-example squared norms of its trainable parameters.
def _linear(m, x, d):  # positions = all dims between the batch and the features
    n, b = d.shape[0], trainable(m, "bias")
    d = _f32(d).reshape(n, -1, d.shape[-1])
    if x is None:  # weight frozen: the bias only
        return affine_sqnorm(None, d, weight=False, bias=b)
    return sqnorm(_f32(x).reshape(n, -1, x.shape[-1]), d, b)


def _conv(m, x, d):  # a Linear layer over the output positions, on im2col patches
    n, b = d.shape[0], trainable(m, "bias")
    d = _f32(d).reshape(n, d.shape[1], -1).transpose(1, 2)  # (n, positions, out_channels)
    if x is None:
        return affine_sqnorm(None, d, weight=False, bias=b)
    pad = m._reversed_padding_repeated_twice
    patches = conv_patches(_f32(x), m.kernel_size, m.stride, m.dilation, pad, m.padding_mode)
    return sqnorm(patches, d, b)


def _embedding(m, ids, d):  # Σ_{t,t'} [id_t = id_t'] δ_t·δ_t'
    return embedding_sqnorm(ids, _f32(d), m.padding_idx)


def _normalized(m, x, d, xhat):
    n, p = d.shape[0], math.prod(m.normalized_shape)
    xhat = xhat(_f32(x)).reshape(n, -1, p) if x is not None else None
    return affine_sqnorm(xhat, _f32(d).reshape(n, -1, p), weight=x is not None, bias=trainable(m, "bias"))


def _layer_norm(m, x, d):  # x̂ recomputed from the saved input
    return _normalized(m, x, d, lambda x: F.layer_norm(x, m.normalized_shape, eps=m.eps))


def _rms_norm(m, x, d):  # y = w ⊙ x/rms(x): like LayerNorm, no bias
    eps = m.eps if m.eps is not None or x is None else torch.finfo(x.dtype).eps  # the forward's default eps
    return _normalized(m, x, d, lambda x: F.rms_norm(x, m.normalized_shape, eps=eps))


def _group_norm(m, x, d):  # weight and bias per channel: positions are the spatial axes
    n, c = d.shape[:2]
    d = _f32(d).reshape(n, c, -1).transpose(1, 2)
    xhat = F.group_norm(_f32(x), m.num_groups, eps=m.eps).reshape(n, c, -1).transpose(1, 2) if x is not None else None
    return affine_sqnorm(xhat, d, weight=x is not None, bias=trainable(m, "bias"))


_RULES = [  # (type, rule, fewest input dimensions that still have a batch dimension)
    (nn.Linear, _linear, lambda m: 2), (nn.Conv1d, _conv, lambda m: 3), (nn.Conv2d, _conv, lambda m: 4),
    (nn.Embedding, _embedding, lambda m: 1), (nn.LayerNorm, _layer_norm, lambda m: len(m.normalized_shape) + 1),
    (nn.GroupNorm, _group_norm, lambda m: 2),
]
if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    _RULES.append((nn.RMSNorm, _rms_norm, lambda m: len(m.normalized_shape) + 1))


def layer_rule(module: nn.Module):
    """(rule, min_dim) for a layer with a per-example formula here, else a string saying why it has none.

    ``rule(module, x, delta)`` gives the (n,) squared norms of the per-example gradients of the module's trainable
    parameters from its input ``x`` (None when its weight is frozen) and output gradient ``delta``, in float32 or
    wider; ``min_dim`` is the fewest input dimensions that still include a batch dimension. Covered: Linear,
    Conv1d/Conv2d with groups = 1, Embedding without scale_grad_by_freq, LayerNorm, RMSNorm, GroupNorm, and
    subclasses that keep their forward.
    """
    for cls, rule, min_dim in _RULES:
        if isinstance(module, cls) and type(module).forward is cls.forward:
            if getattr(module, "groups", 1) != 1:
                return f"{type(module).__name__} with groups={module.groups}"
            if getattr(module, "scale_grad_by_freq", False):
                return "Embedding(scale_grad_by_freq=True) couples the examples of a batch"
            return rule, min_dim(module)
    return type(module).__name__
