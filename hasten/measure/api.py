"""Measure the gradient noise scale of a model at its current parameters, without training it.

Each step draws a batch uniformly at random without replacement from the dataset and measures two squared gradient
norms at the same parameters (McCandlish et al. 2018, arXiv:1812.06162, App. A): micro-batches of that batch vs the
whole batch, or single examples vs the whole batch. The estimator applies the finite-population term of eq. A.1
(batches drawn without replacement from D examples).
"""
from __future__ import annotations

import contextlib

import torch
from torch.func import functional_call
from torch.utils.data import TensorDataset, default_collate

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate
from hasten.measure.per_example import check_no_batchnorm, per_example_grads_stats


def _batch(dataset, index: torch.Tensor, device: torch.device):
    """(inputs, targets) of the examples at ``index``, on ``device``."""
    if isinstance(dataset, TensorDataset):
        x, y = (t[index.to(t.device)] for t in dataset.tensors[:2])
    else:
        x, y = default_collate([dataset[i] for i in index.tolist()])[:2]
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@contextlib.contextmanager
def _seeded_rng(device: torch.device, seed: int):
    """Dropout and other random layers draw from a fork of the global RNG seeded by ``seed``; it is restored after."""
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


@contextlib.contextmanager
def _buffers_restored(model: torch.nn.Module):
    """Forward passes in training mode update buffers (e.g. BatchNorm running statistics): put them back."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def _micro_batch_pair(model, loss_fn, x, y, micro: int, leaves: dict):
    """(|G_small|², |G_big|², all losses finite): mean micro-batch squared norm and the batch's squared norm.

    Gradients are taken with respect to ``leaves``, detached aliases of the trainable parameters, so ``.grad`` and
    any hooks on the parameters (e.g. a :class:`MicroBatchTap`) are untouched.
    """
    inputs = list(leaves.values())
    sq_sum, total, finite = 0.0, None, True
    k = len(x) // micro
    for j in range(k):
        part = slice(j * micro, (j + 1) * micro)
        loss = loss_fn(functional_call(model, leaves, (x[part],)), y[part])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        finite = finite and bool(torch.isfinite(loss.detach()))
        sq_sum = sq_sum + torch.stack(torch._foreach_norm(grads)).square().sum()
        total = list(grads) if total is None else torch._foreach_add(total, grads)
    sq_big = torch.stack(torch._foreach_norm(total)).square().sum() / (k * k)
    return sq_sum / k, sq_big, finite


def measure_noise_scale(
    model: torch.nn.Module,
    loss_fn,
    dataset,
    *,
    batch_size: int,
    micro_batch_size: int | None = None,
    per_example: bool = False,
    steps: int = 100,
    seed: int = 0,
    noise: NoiseScale | None = None,
) -> NoiseScaleEstimate:
    """B_simple = tr(Σ)/|G|² of ``model`` on ``dataset`` at the current parameters.

    Args:
        loss_fn: ``loss_fn(model(inputs), targets)``, the mean loss over a batch.
        dataset: a map-style dataset of (input, target) pairs (a TensorDataset is indexed directly).
        batch_size: B_big, examples drawn without replacement per step.
        micro_batch_size: B_small for the micro-batch source (must divide batch_size), or
        per_example: True for the per-example source (B_small = 1; not with BatchNorm in training mode).
        steps: batches to draw; the standard error shrinks as 1/√steps.
        seed: seeds the batch draws and random layers (the global RNG is left as it was).
        noise: an estimator to feed (default: a running mean with the dataset size for the finite-population term).

    Parameters, ``.grad``, buffers and the train/eval mode are left as they were. The model is measured in the mode
    the caller set: in training mode dropout noise counts as gradient noise (as it does during training).
    Steps with a non-finite loss or gradient are skipped and counted in ``n_skipped``.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    if (micro_batch_size is None) == (not per_example):
        raise HastenError(
            "choose exactly one noise source: micro_batch_size=N (gradient accumulation) or per_example=True"
        )
    n = len(dataset)
    if batch_size < 2:
        raise HastenError(f"batch_size must be at least 2 to compare two batch sizes, got {batch_size}")
    if n < batch_size:
        raise HastenError(f"the dataset has {n} examples, fewer than batch_size={batch_size}: use a smaller batch_size")
    if micro_batch_size is not None and not (0 < micro_batch_size < batch_size and batch_size % micro_batch_size == 0):
        raise HastenError(
            f"micro_batch_size={micro_batch_size} must divide batch_size={batch_size} and be smaller than it"
        )
    if steps < 1:
        raise HastenError(f"steps must be at least 1, got {steps}")
    if per_example:
        check_no_batchnorm(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise HastenError("the model has no trainable parameters: there is no gradient noise to measure")
    device = params[0].device
    noise = noise if noise is not None else NoiseScale(dataset_size=n)
    generator = torch.Generator().manual_seed(seed)
    b_small = 1 if per_example else micro_batch_size
    leaves = {name: p.detach().requires_grad_() for name, p in model.named_parameters() if p.requires_grad}
    with _seeded_rng(device, seed), _buffers_restored(model):
        for _ in range(steps):
            x, y = _batch(dataset, torch.randperm(n, generator=generator)[:batch_size], device)
            if per_example:
                sq_norms, sq_big, losses = per_example_grads_stats(model, loss_fn, x, y)
                sq_small, finite = sq_norms.mean(), bool(torch.isfinite(losses).all())
            else:
                sq_small, sq_big, finite = _micro_batch_pair(model, loss_fn, x, y, micro_batch_size, leaves)
            if not finite:
                sq_small = float("nan")  # counted as a skipped step by the estimator
            noise.update(sq_small=sq_small, b_small=b_small, sq_big=sq_big, b_big=batch_size)
    return noise.compute()
