"""Per-example gradient features of one batch, enough to form every gradient dot product exactly.

- ``nn.Linear`` layers are kept as factors (x, δ): the layer inputs from a forward hook and δ = ∂ℓ_i/∂y from a
  tensor hook during one backward of the *summed* loss, so each δ_i is example i's own gradient (Goodfellow 2015).
  Dot products then come from Gram matrices (:mod:`hasten.measure.ghost`). A layer applied to a long sequence
  is stored as its dense per-example gradient instead, when that is cheaper.
- Every other selected parameter gets its per-example gradient from ``torch.func`` (vmap of grad), chunked.

The model must treat examples independently (the caller puts it in eval mode; see :func:`check_independent`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from hasten.errors import HastenError
from hasten.influence.projection import GaussianProjection
from hasten.measure import ghost

MAX_ELEMENTS = 1 << 24  # per-example gradient entries formed at once (64 MB in float32)


@dataclass
class Features:
    """Factors of Linear layers {name: (x (n,T,in), δ (n,T,out), has_bias)} and dense gradients {param: (n, numel)}."""

    n: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)

    @staticmethod
    def cat(parts: list["Features"]) -> "Features":
        first = parts[0]
        factors = {k: (torch.cat([p.factors[k][0] for p in parts]), torch.cat([p.factors[k][1] for p in parts]), b)
                   for k, (_, _, b) in first.factors.items()}
        dense = {k: torch.cat([p.dense[k] for p in parts]) for k in first.dense}
        return Features(sum(p.n for p in parts), factors, dense)

    def sqnorm(self) -> torch.Tensor:
        """(n,) squared norms of the per-example gradients over all selected parameters."""
        out = _zeros(self, self.n)
        for x, d, bias in self.factors.values():
            out += ghost.sqnorm(x, d, bias)
        for g in self.dense.values():
            out += g.square().sum(1)
        return out

    def project(self, proj: GaussianProjection) -> torch.Tensor:
        """(n, proj.dim): P times each example's full gradient; Linear gradients are formed a block at a time."""
        out = _zeros(self, self.n, proj.dim)
        for name, (x, d, bias) in self.factors.items():
            n_in, n_out = x.shape[2], d.shape[2]

            def weight_columns(a: int, b: int, x=x, d=d, n_in=n_in) -> torch.Tensor:
                rows = slice(a // n_in, -(-b // n_in))  # the rows of W that hold flat columns a..b-1
                g = torch.einsum("nto,nti->noi", d[:, :, rows], x).reshape(self.n, -1)
                return g[:, a - rows.start * n_in : b - rows.start * n_in]

            out += proj.project_columns(join(name, "weight"), n_out * n_in, weight_columns)
            if bias:
                out += proj.project(join(name, "bias"), d.sum(1))
        for name, g in self.dense.items():
            out += proj.project(name, g)
        return out


def dot(a: Features, b: Features) -> torch.Tensor:
    """(n_a, n_b) exact dot products of per-example gradients; a layer absent from one side contributes zero."""
    out = _zeros(a, a.n, b.n)
    for name, (xa, da, bias) in a.factors.items():
        if name in b.factors:
            xb, db, _ = b.factors[name]
            out += ghost.dot(xa, da, xb, db, bias)
        elif join(name, "weight") in b.dense:
            raise HastenError(f"Linear layer {name!r} saw sequences of different lengths in two batches: "
                              "give every example the same length")
    for name, g in a.dense.items():
        if name in b.dense:
            out += g @ b.dense[name].T
    return out


def _zeros(f: Features, *shape: int) -> torch.Tensor:
    like = next(iter([*(x for x, _, _ in f.factors.values()), *f.dense.values()]), None)
    if like is None:
        return torch.zeros(*shape)
    return like.new_zeros(*shape)


def check_independent(model: nn.Module) -> None:
    """Per-example gradients need examples that do not interact: BatchNorm must use running statistics."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (not m.track_running_stats or m.running_mean is None):
            raise HastenError(f"BatchNorm layer {name!r} has no running statistics, so it couples the examples of a "
                              "batch and per-example gradients are undefined: use track_running_stats=True or "
                              "GroupNorm/LayerNorm")


class Extractor:
    """``extractor(inputs, targets) -> Features`` for the model's current weights."""

    def __init__(self, model: nn.Module, loss_fn: Callable, linear: dict[str, nn.Linear],
                 dense: dict[str, nn.Parameter]):
        self.model, self.loss_fn, self.linear, self.dense = model, loss_fn, linear, dense
        self.verified = False  # the first batch checks that the factors add up to each layer's batch gradient

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> Features:
        n = len(targets)
        feats = Features(n)
        if self.linear:
            for name, (x, d, bias) in self._factors(inputs, targets, n).items():
                if ghost.prefer_dense(x.shape[1], x.shape[2], d.shape[2], bias):
                    for suffix, g in zip(("weight", "bias"), ghost.dense(x, d, bias)):
                        feats.dense[join(name, suffix)] = g
                else:
                    feats.factors[name] = (x, d, bias)
        if self.dense:
            feats.dense.update(self._vmap_grads(inputs, targets))
        return feats

    def _factors(self, inputs, targets, n):
        inputs_seen: dict[str, list] = {k: [] for k in self.linear}
        deltas: dict[str, list] = {k: [] for k in self.linear}

        def hook(name):
            def fn(module, args, output):
                x = args[0]
                if x.shape[0] != n:
                    raise HastenError(f"Linear layer {name!r} got input of shape {tuple(x.shape)} for a batch of {n}: "
                                      "TracIn needs batch-first inputs (or restrict layers= to other layers)")
                inputs_seen[name].append(x.detach())
                slot = len(deltas[name])
                deltas[name].append(None)
                output.register_hook(lambda g: deltas[name].__setitem__(slot, g.detach()))
            return fn

        handles = [m.register_forward_hook(hook(k)) for k, m in self.linear.items()]
        try:
            with torch.enable_grad():
                loss = self.loss_fn(self.model(inputs), targets)
                if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                    raise HastenError("loss_fn must return the mean loss of the batch (one number), "
                                      f"got shape {tuple(getattr(loss, 'shape', ()))}: use reduction='mean'")
                loss = loss * n  # the sum of the per-example losses
                # Any parameter of each layer makes the backward pass through its output and fire the δ hooks; the
                # bias gradient (Σδ) is the cheap one, the weight gradient is needed once, for the check below.
                wrt = [m.weight if m.bias is None or not self.verified else m.bias for m in self.linear.values()]
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        out = {}
        for (name, m), total in zip(self.linear.items(), grads):
            if not inputs_seen[name]:
                if total is not None:
                    raise _outside(name)
                continue  # layer unused: zero gradient
            xs = [x.reshape(n, -1, m.in_features) for x in inputs_seen[name]]
            ds = [x.new_zeros(n, x.shape[1], m.out_features) if d is None else d.reshape(n, -1, m.out_features)
                  for d, x in zip(deltas[name], xs)]  # no δ: that call's output did not reach the loss
            out[name] = (torch.cat(xs, 1), torch.cat(ds, 1), m.bias is not None)
            if not self.verified and total is not None:  # Σ_i g_i must be the batch's weight gradient
                summed = torch.einsum("nto,nti->oi", out[name][1], out[name][0])
                if (summed - total).norm() > 1e-2 * total.norm() + 1e-12:  # loose: a miss is O(1), not rounding
                    raise _outside(name)
        self.verified = True
        return out

    def _vmap_grads(self, inputs, targets) -> dict[str, torch.Tensor]:
        from torch.func import functional_call, grad, vmap

        params = {k: p.detach() for k, p in self.dense.items()}
        rest = {k: p.detach() for k, p in self.model.named_parameters() if k not in params}
        rest.update(dict(self.model.named_buffers()))
        loss_fn, model = self.loss_fn, self.model

        def loss_one(p, x, y):
            out = functional_call(model, (p, rest), (x.unsqueeze(0),))
            return loss_fn(out, y.unsqueeze(0))

        chunk = max(1, MAX_ELEMENTS // max(1, sum(p.numel() for p in params.values())))
        try:
            with torch.enable_grad():
                grads = vmap(grad(loss_one), in_dims=(None, 0, 0), chunk_size=chunk)(params, inputs, targets)
        except RuntimeError as e:  # e.g. data-dependent control flow or .item() in forward()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise HastenError(f"per-example gradients with torch.func failed for {', '.join(list(params)[:3])}"
                              f"{'…' if len(params) > 3 else ''} ({first}): pass layers= naming Linear layers only")
        return {k: g.reshape(len(targets), -1) for k, g in grads.items()}


def join(module: str, param: str) -> str:
    """The parameter's name as ``model.named_parameters()`` gives it (the root module has the empty name)."""
    return f"{module}.{param}" if module else param


def _outside(name: str) -> HastenError:
    return HastenError(f"Linear layer {name!r} gets gradient from outside its forward() (its weight is used "
                       "directly elsewhere): restrict layers= to other modules")
