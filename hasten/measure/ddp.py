"""Noise scale from DistributedDataParallel, riding on DDP's own gradient all-reduce: no collective of its own.

Each rank's gradient before the all-reduce is a batch of its b_r local examples (B_small); the averaged gradient
after it is the global batch (B_big), at the same parameters (McCandlish et al. 2018, arXiv:1812.06162, App. A.1).
A DDP communication hook does the usual averaging all-reduce (``default_hooks.allreduce_hook``: divide by the world
size, sum) and reads |g_r|² of every bucket before it; ``step`` reads |ḡ|² from the averaged ``.grad`` (one fused
pass). The ranks' mean of |g_r|² and of 1/b_r travel as three extra numbers appended to the last bucket of the step,
so the meter adds no collective and no wait:

>>> state = attach_ddp_noise(ddp_model)           # before the first backward       # doctest: +SKIP
>>> loss_fn(ddp_model(x), y).backward()                                             # doctest: +SKIP
>>> state.step(len(x))                            # every rank, before optimizer.step()   # doctest: +SKIP
>>> state.noise.compute().b_simple               # identical on every rank          # doctest: +SKIP

The local batch size b_r is counted by a forward pre-hook on the DDP module (the first dimension of its first tensor
argument, summed over the forwards with gradients since the last step; pass ``batch_size_fn`` for other layouts) and
checked against ``step(local_batch_size)``. Ranks may hold different b_r (the last, uneven shard of an epoch): DDP's
equal-weight average ḡ then has E|ḡ|² = |G|² + tr Σ·h/W and the ranks' mean E|g_r|² = |G|² + tr Σ·h, with
h = mean_r 1/b_r over W ranks, so the pair enters eq. A.2 with B_small = 1/h (the harmonic mean) and B_big = W/h.

With gradient accumulation wrap all but the last micro-step in ``ddp_model.no_sync()`` (the hook then fires once,
on the accumulated local mean) and pass the whole local batch to ``step``. A step whose hook fired more than once per
bucket (several synced backwards) is dropped by every rank.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations against dist.GradBucket at runtime.
from typing import Callable

import torch
import torch.distributed as dist

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale

_EXTRA = 3  # numbers appended to the last bucket: |g_r|² (all buckets), 1/b_r, "this rank's step is bad"


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dtype=dtype).square()


def first_dim(args: tuple, kwargs: dict) -> int:
    """Examples in a forward call: the first dimension of its first tensor argument (0 if there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 0


class DDPNoiseState:
    """State of :func:`noise_scale_hook`: this step's squared norms and examples, and the estimator they feed."""

    def __init__(self, noise: NoiseScale | None = None, process_group=None, params=()):
        self.noise = noise if noise is not None else NoiseScale()
        self.process_group = process_group
        self.params = list(params)  # whose averaged .grad step() reads
        self.examples = 0  # counted by the forward pre-hook since the last step
        self._local: dict[int, torch.Tensor] = {}  # bucket index -> |local mean gradient|² (before the all-reduce)
        self._fires: dict[int, int] = {}  # bucket index -> all-reduces since the last step (must be 1)
        self._extra: torch.Tensor | None = None  # the ranks' means of the _EXTRA numbers, once all-reduced

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def step(self, local_batch_size: int | None = None) -> bool:
        """Feed this step's pair to ``noise``; call on every rank after backward, before ``optimizer.step()``.

        ``local_batch_size`` (optional) is checked against the examples the forward pre-hook counted. Returns False
        (no measurement, no error) with one rank or when some rank's hook did not fire exactly once per bucket;
        non-finite norms are counted as skips by the estimator. Waits for nothing but DDP's own all-reduce.
        """
        extra, examples = self._extra, self.examples
        self.discard()
        world = dist.get_world_size(self._group())
        if local_batch_size is not None and local_batch_size != examples:
            raise HastenError(
                f"step(local_batch_size={local_batch_size}) but the DDP model's forwards since the last step held "
                f"{examples} examples: pass batch_size_fn=... to attach_ddp_noise if the batch is not dimension 0"
            )
        if world < 2 or extra is None:
            return False
        grads = [p.grad for p in self.params if p.grad is not None]
        dtype = torch.float32 if any(g.dtype in (torch.float16, torch.bfloat16) for g in grads) else None
        big_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=dtype)))
        sq_small, inv_b, any_bad, big_norm = torch.cat([extra, big_norm.to(extra).view(1)]).tolist()  # one sync
        sq_big = big_norm**2
        if any_bad > 0:
            return False  # some rank's hook fired twice in a bucket, or its forwards saw no examples
        b_small = 1.0 / inv_b  # harmonic mean of the local batch sizes
        return self.noise.update(sq_small=sq_small, b_small=b_small, sq_big=sq_big, b_big=world * b_small)

    def discard(self) -> None:
        """Forget the forwards and all-reduces since the last :meth:`step` (e.g. SAM's second pass, which would
        count as a second all-reduce of the next step); call on every rank before the next step's first forward."""
        self._local, self._fires, self._extra, self.examples = {}, {}, None, 0

    def _extras(self, device: torch.device) -> torch.Tensor:
        """This rank's _EXTRA numbers, in float64, when its last bucket is ready."""
        bad = self.examples <= 0 or max(self._fires.values()) != 1
        sq_local = torch.stack(list(self._local.values())).sum().to(device, torch.float64)
        flags = torch.tensor([1.0 / max(self.examples, 1), float(bad)], dtype=torch.float64, device=device)
        return torch.cat([sq_local.view(1), flags])

    def state_dict(self) -> dict:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state)


def _value(fut: torch.futures.Future) -> torch.Tensor:
    return fut.value()[0]  # a Python hook's future must hold the tensor itself, not c10d's list of tensors


def noise_scale_hook(state: DDPNoiseState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the default averaging all-reduce, recording |g_r|² before it; the last bucket of the
    step carries the rank's :data:`_EXTRA` numbers appended to its gradients."""
    group = state._group()
    world = dist.get_world_size(group)
    buffer, index = bucket.buffer(), bucket.index()
    state._local[index] = _sq_norm(buffer)  # the local mean gradient: DDP leaves averaging to the hook
    state._fires[index] = state._fires.get(index, 0) + 1
    if not bucket.is_last() or buffer.dtype not in (torch.float32, torch.float64):
        if bucket.is_last():  # a half-precision bucket cannot hold squared norms: their own small all-reduce
            extra = state._extras(buffer.device).div_(world)
            dist.all_reduce(extra, group=group)
            state._extra = extra
        return dist.all_reduce(buffer.div_(world), group=group, async_op=True).get_future().then(_value)
    n = buffer.numel()
    packed = torch.cat([buffer, state._extras(buffer.device).to(buffer.dtype)]).div_(world)  # one copy
    # The last bucket has no backward left to overlap with: all-reduce it in place of waiting for a callback.
    dist.all_reduce(packed, group=group)
    state._extra = packed[n:].double()
    future = torch.futures.Future()
    future.set_result(packed[:n])
    return future


def attach_ddp_noise(
    ddp_model, noise: NoiseScale | None = None, *, batch_size_fn: Callable[[tuple, dict], int] = first_dim
) -> DDPNoiseState:
    """Register :func:`noise_scale_hook` (and an example-counting forward pre-hook) on a DistributedDataParallel
    model, before its first backward. ``batch_size_fn(args, kwargs)`` gives a forward call's number of examples."""
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    state = DDPNoiseState(noise, process_group=getattr(ddp_model, "process_group", None), params=params)

    def count(module, args, kwargs):
        if torch.is_grad_enabled() and module.training:
            state.examples += batch_size_fn(args, kwargs)

    ddp_model.register_forward_pre_hook(count, with_kwargs=True)
    ddp_model.register_comm_hook(state, noise_scale_hook)
    return state
