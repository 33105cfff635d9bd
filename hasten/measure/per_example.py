"""Per-example squared gradient norms (B_small = 1), the lowest-variance source of tr(Σ).

With B_small = 1 the tr(Σ) estimate of McCandlish et al. 2018 (arXiv:1812.06162, eq. A.2) is the Bessel-corrected
variance of the per-example gradients. Per-example gradients come from torch.func (``vmap`` of ``grad`` over a
``functional_call``), a chunk of examples at a time so memory stays bounded.
"""
from __future__ import annotations

import torch
from torch.func import functional_call, grad_and_value, vmap

from hasten.errors import HastenError

_CHUNK_ELEMENTS = 2**26  # per-example gradient elements held at once (256 MiB in fp32)


def check_no_batchnorm(model: torch.nn.Module) -> None:
    """Per-example gradients are undefined when BatchNorm couples the examples of a batch (training mode)."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.training:
            raise HastenError(
                "per-example gradients are undefined with BatchNorm (examples are coupled in a batch): "
                "use the micro-batch source (micro_batch_size=...) or replace BatchNorm with GroupNorm/LayerNorm"
            )


def per_example_grads_stats(model, loss_fn, inputs, targets, *, chunk_size: int | None = None):
    """(per-example squared norms (B,), squared norm of the batch-mean gradient, per-example losses (B,)).

    ``loss_fn(model(x), y)`` must be the mean over the batch (so that on one example it is that example's loss).
    """
    check_no_batchnorm(model)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise HastenError("the model has no trainable parameters: there is no gradient noise to measure")
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))

    def example_loss(params, x, y):
        out = functional_call(model, (params, fixed), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_example = vmap(grad_and_value(example_loss), in_dims=(None, 0, 0), randomness="different")
    n = len(inputs)
    if chunk_size is None:
        numel = sum(p.numel() for p in trainable.values())
        chunk_size = max(1, _CHUNK_ELEMENTS // numel)
    sq_norms, losses, total = [], [], None
    for start in range(0, n, chunk_size):
        grads, loss = per_example(trainable, inputs[start : start + chunk_size], targets[start : start + chunk_size])
        flat = [g.flatten(1).to(torch.promote_types(g.dtype, torch.float32)) for g in grads.values()]
        sq_norms.append(sum(f.square().sum(1) for f in flat))
        losses.append(loss.detach())
        chunk_sum = [f.sum(0) for f in flat]
        total = chunk_sum if total is None else torch._foreach_add(total, chunk_sum)
    mean_sq = torch.stack([(t / n).square().sum() for t in total]).sum()
    return torch.cat(sq_norms), mean_sq, torch.cat(losses)


def per_example_sq_norms(model, loss_fn, inputs, targets, *, chunk_size: int | None = None):
    """(|g_i|² for each example (B,), |mean_i g_i|²) at the model's current parameters; ``.grad`` is untouched.

    ``loss_fn(model(x), y)`` must average over the batch. Raises HastenError for BatchNorm in training mode.
    """
    sq_norms, mean_sq, _ = per_example_grads_stats(model, loss_fn, inputs, targets, chunk_size=chunk_size)
    return sq_norms, mean_sq
