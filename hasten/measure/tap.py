"""Noise scale from gradient accumulation, in one process, at no extra backward pass.

With k micro-batches per optimizer step, each backward's own gradient is a batch of B/k examples (B_small) and the
accumulated ``.grad`` is the batch of B (B_big), both measured at the same parameters (McCandlish et al. 2018,
arXiv:1812.06162, App. A.1). A tensor hook on each trainable parameter sees the gradient of one backward before it is
added into ``.grad``; it only queues that gradient's norm (no host sync); :meth:`MicroBatchTap.step` reduces them and
reads two scalars (one sync per optimizer step).

>>> tap = MicroBatchTap(model)                     # doctest: +SKIP
>>> for x, y in micro_batches:                      # doctest: +SKIP
...     (loss_fn(model(x), y) / len(micro_batches)).backward()
>>> tap.step(batch_size)                            # before clipping and optimizer.step()   # doctest: +SKIP
>>> tap.noise.compute().b_simple                    # doctest: +SKIP

By default (``small="first"``) only the first backward's gradient is read (B_small = one micro-batch): one extra
read of the gradient per optimizer step whatever k is, still unbiased (every micro-batch is a uniform draw of B/k
examples). ``small="all"`` reads every backward's gradient and averages their k squared norms: lower variance, k reads.

The number of micro-batches k is the most gradients any one parameter received since the last ``step``: parameters
unused in some micro-batches and activation checkpointing are fine, and every backward (or ``torch.autograd.grad``)
through the model counts. Zero ``.grad`` (or set it to None) before the first micro-batch, as usual. With
``torch.amp.GradScaler`` call ``step`` before ``scaler.unscale_(optimizer)`` and pass ``loss_scale=scaler.get_scale()``.
With DistributedDataParallel use :func:`hasten.measure.attach_ddp_noise` instead.
"""
from __future__ import annotations

import torch

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, load_meter_state, meter_state
from hasten.measure.precondition import AdamPreconditioner

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def micro_batch_pair(
    sq_micro_sum: torch.Tensor | float,
    sq_accumulated: torch.Tensor | float,
    k: int,
    divisor: float,
    loss_scale: float = 1.0,
    measured: int | None = None,
) -> tuple:
    """(|G_small|², |G_big|²) from k micro-batch backwards of a loss divided by ``divisor``.

    ``sq_micro_sum`` = Σ_j |∇(L_j/divisor)|² over the ``measured`` backwards read (default all k),
    ``sq_accumulated`` = |Σ_j ∇(L_j/divisor)|² (the accumulated ``.grad``); both still multiplied by
    ``loss_scale``. Micro-batch j's mean gradient is divisor·∇(L_j/divisor) and the batch's is (divisor/k)·.grad.
    """
    unscale = 1.0 / (loss_scale * loss_scale)
    sq_small = sq_micro_sum * (divisor * divisor / (measured or k) * unscale)
    sq_big = sq_accumulated * ((divisor / k) ** 2 * unscale)
    return sq_small, sq_big


def check_meter_options(every, small: str = "first", *, names: tuple[str, str] = ("every", "small")) -> None:
    """One-line errors for a meter's ``every`` (a positive int) and ``small`` ("first" or "all"); ``names`` are the
    keys as the caller's user writes them (e.g. ``noise_every``)."""
    if not (isinstance(every, int) and every >= 1):
        raise HastenError(f"{names[0]}={every!r}: give a positive number of steps (1 = measure every step)")
    if small not in ("first", "all"):
        raise HastenError(f"{names[1]}={small!r}: choose 'first' (one micro-batch read per step) or 'all' (every "
                          "micro-batch's)")


class MicroBatchTap:
    """Feeds a :class:`NoiseScale` from the micro-batches of gradient accumulation.

    Args:
        model: the module being trained (not a DistributedDataParallel wrapper).
        noise: the estimator to feed; a running-mean ``NoiseScale()`` if None.
        precondition: an Adam/AdamW optimizer: measure P⊙g with P = 1/(√v̂+ε) from its state (steps are skipped
            until it has state).
        every: measure one optimizer step in ``every``; on the others the hooks return at once. The overhead
            (one extra read of the gradient, and one host sync, per measured step) shrinks by that factor; the
            estimate stays unbiased.
        small: "first" reads the first micro-batch's gradient only (one read per step); "all" reads every
            micro-batch's (k reads, lower variance).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        noise: NoiseScale | None = None,
        *,
        precondition=None,
        every: int = 1,
        small: str = "first",
    ):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise HastenError(
                "MicroBatchTap sees one process's micro-batches: with DistributedDataParallel use "
                "hasten.measure.attach_ddp_noise(ddp_model)"
            )
        self._params = [p for p in model.parameters() if p.requires_grad]
        if not self._params:
            raise HastenError("the model has no trainable parameters: there is no gradient noise to measure")
        self.noise = noise if noise is not None else NoiseScale()
        self._precondition = AdamPreconditioner(precondition, self._params) if precondition is not None else None
        devices = {p.device for p in self._params}
        self._device = self._params[0].device if len(devices) > 1 else None  # gather here if spread out
        self._norm_dtype = torch.float32 if any(p.dtype in _LOW_PRECISION for p in self._params) else None
        self._norms: list[torch.Tensor] = []  # one per (backward, parameter): that backward's own gradient norm
        self._backwards: list[int] = []  # which backward (0, 1, ...) each of those norms is from
        self._counts = [0] * len(self._params)  # gradients each parameter received since the last step
        self._scales: dict[int, torch.Tensor | None] = {}  # preconditioner per parameter, read once per step
        check_meter_options(every, small)
        self.small = small
        self.every, self._steps = every, 0
        self._active = [True]  # whether the hooks measure this step (a list: the hooks hold it)
        self._handles = [p.register_hook(self._make_hook(i, p)) for i, p in enumerate(self._params)]

    @property
    def steps(self) -> int:
        """Optimizer steps seen (measured or not): the phase of ``every``, kept in :meth:`state_dict`."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps = value
        self._active[0] = value % self.every == 0

    def _make_hook(self, index: int, param: torch.Tensor):
        norms, counts, active, norm = self._norms, self._counts, self._active, torch.linalg.vector_norm
        backwards = self._backwards
        dtype = torch.float32 if param.dtype in _LOW_PRECISION else None
        reads = 1 if self.small == "first" else None  # backwards read per step (None = all)
        if self._precondition is None:

            def hook(grad):
                if active[0]:
                    if reads is None or counts[index] < reads:
                        norms.append(norm(grad.coalesce().values() if grad.is_sparse else grad, dtype=dtype))
                        backwards.append(counts[index])
                    counts[index] += 1

        else:

            def hook(grad):
                if active[0]:
                    if reads is None or counts[index] < reads:
                        scale = self._scale(index)
                        norms.append(norm((grad.to_dense() if grad.is_sparse else grad) * scale, dtype=dtype))
                        backwards.append(counts[index])
                    counts[index] += 1

        return hook

    def discard(self) -> None:
        """Forget the gradients read since the last :meth:`step` (e.g. extra backwards that are not micro-batches
        of the next step, such as SAM's second pass): call before the next step's first backward."""
        self._norms.clear()
        self._backwards.clear()
        self._counts[:] = [0] * len(self._counts)
        self._scales = {}

    def _scale(self, index: int) -> torch.Tensor:
        if index not in self._scales:
            self._scales[index] = self._precondition(self._params[index])
        scale = self._scales[index]
        return scale if scale is not None else torch.nan  # optimizer not stepped yet: this step is skipped

    def step(
        self,
        batch_size: int,
        *,
        loss_scale: float = 1.0,
        accumulation_steps: int | None = None,
        micro_batch_sizes=None,
        micro_batch_weights=None,
    ) -> bool:
        """Measure the micro-batches since the last call; call after the last backward, before clipping.

        Args:
            batch_size: examples in this optimizer step (all micro-batches together).
            loss_scale: the factor the loss was multiplied by before backward (AMP: ``scaler.get_scale()``).
            accumulation_steps: what each micro-batch loss was divided by (default: the number of backward passes
                counted since the last call; pass 1 if the losses were not divided).
            micro_batch_sizes: the micro-batch sizes, if known; the step is skipped when they differ, unless
                ``micro_batch_weights`` are given too.
            micro_batch_weights: the factor each micro-batch's *mean* loss was multiplied by before backward, in
                place of ``accumulation_steps`` (hasten's loop: the micro-batch's share of the batch's examples, or
                of its loss terms for a token-mean loss). Then micro-batches of unequal sizes are measured too:
                micro-batch j's mean gradient is its backward's gradient divided by its weight, ``.grad`` is the
                batch's, and B_small is the harmonic mean of the sizes read (E|g_j|² = |G|² + tr Σ/b_j, averaged).

        Returns whether the step was measured: False (no error) with fewer than two backwards, unequal micro-batches,
        or an optimizer without state yet when preconditioning; also False for non-finite norms, which the
        estimator counts as skipped steps.
        """
        norms, k, scales, read = self._norms[:], max(self._counts), self._scales, self._backwards[:]
        self.discard()
        self.steps += 1
        if not loss_scale > 0:
            raise HastenError(f"loss_scale must be positive, got {loss_scale}")
        if micro_batch_sizes is not None:
            sizes = [int(s) for s in micro_batch_sizes]
            if sum(sizes) != batch_size:
                raise HastenError(f"micro_batch_sizes sum to {sum(sizes)}, not batch_size={batch_size}")
            if len(sizes) != k or (micro_batch_weights is None and len(set(sizes)) != 1):
                return False
        elif micro_batch_weights is not None:
            raise HastenError("micro_batch_weights needs micro_batch_sizes too")
        if k < 2 or not norms or (micro_batch_weights is None and batch_size % k):
            return False
        grads = []
        for i, p in enumerate(self._params):
            if p.grad is not None:
                g = p.grad.to_dense() if p.grad.is_sparse else p.grad
                if self._precondition is not None:
                    scale = scales[i] if i in scales else self._precondition(p)
                    if scale is None:  # the optimizer has not stepped yet
                        return False
                    g = g * scale
                grads.append(g)
        big = torch._foreach_norm(grads, 2, dtype=self._norm_dtype) if grads else []
        values = self._host_values([*norms, *big])  # the one host sync; squares summed there, in double
        sq_micro = sum(v * v for v in values[: len(norms)])
        sq_accumulated = sum(v * v for v in values[len(norms) :])
        if micro_batch_weights is not None:
            weights, unscale = [float(w) for w in micro_batch_weights], 1.0 / (loss_scale * loss_scale)
            sq_micro = sum((v / weights[j]) ** 2 for v, j in zip(values[: len(norms)], read))
            measured = sorted(set(read))
            b_small = len(measured) / sum(1.0 / sizes[j] for j in measured)
            return self.noise.update(sq_small=sq_micro / len(measured) * unscale, b_small=b_small,
                                     sq_big=sq_accumulated * unscale, b_big=batch_size)
        divisor = accumulation_steps if accumulation_steps is not None else k
        measured = 1 if self.small == "first" else k
        sq_small, sq_big = micro_batch_pair(sq_micro, sq_accumulated, k, divisor, loss_scale, measured)
        return self.noise.update(sq_small=sq_small, b_small=batch_size // k, sq_big=sq_big, b_big=batch_size)

    def _host_values(self, norms: list) -> list[float]:
        if self._device is not None:
            norms = [n.to(self._device) for n in norms]
        return torch.stack(norms).tolist()

    def remove(self) -> None:
        """Remove the hooks (the estimator keeps its state)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return meter_state(self.noise, self.steps)

    def load_state_dict(self, state: dict) -> None:
        self.steps = load_meter_state(self.noise, state)
