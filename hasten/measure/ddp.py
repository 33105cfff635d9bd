"""Noise scale from DistributedDataParallel, riding on DDP's own gradient all-reduce: no collective of its own.

Each rank's gradient before the all-reduce is a batch of its b_r local examples (B_small); the averaged gradient
after it is the global batch (B_big), at the same parameters (McCandlish et al. 2018, arXiv:1812.06162, App. A.1).
A DDP communication hook does the usual averaging all-reduce (``default_hooks.allreduce_hook``: divide by the world
size, sum) and reads |g_r|² of every bucket before it and |ḡ|² after it. The buckets' all-reduces overlap with the
rest of backward as usual; the last bucket's hook waits for them and completes their futures on the training thread,
so no Python runs on the backend's threads (see :mod:`hasten._gloo` for why that matters at exit). The
ranks' mean of |g_r|² and of 1/b_r travel as three
extra numbers appended to a copy of the last bucket of the step (the copy fused with the division, into a buffer kept
between steps), so the meter adds no collective of its own; per measured step it reads the gradient three times and
writes it once. With ``every=N`` the other steps run the plain all-reduce:

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

from hasten._gloo import outside_backward_tls, settle_at_exit
from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale, load_meter_state, meter_state

_EXTRA = 3  # numbers appended to the last bucket: |g_r|² (all buckets), 1/b_r, "this rank's step is bad"


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """|t|² of a flat bucket: one dot product (half precision: a float32 norm, squared)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.vector_norm(t, dtype=torch.float32).square()
    return torch.dot(t, t)


def first_dim(args: tuple, kwargs: dict) -> int:
    """Examples in a forward call: the first dimension of its first tensor argument (0 if there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return 0


class DDPNoiseState:
    """State of :func:`noise_scale_hook`: this step's squared norms and examples, and the estimator they feed.

    ``every``: measure one optimizer step in ``every``; on the others the hook is DDP's plain averaging all-reduce
    (the estimate stays unbiased; its variance grows by about that factor). Every rank counts the same steps.
    """

    def __init__(self, noise: NoiseScale | None = None, process_group=None, every: int = 1):
        if every < 1:
            raise HastenError(f"every must be a positive number of steps, got {every}")
        self.noise = noise if noise is not None else NoiseScale()
        self.process_group = process_group
        self.every, self._steps = every, 0
        self.measuring = True  # whether the hook records this step (one step in `every`)
        self.examples = 0  # counted by the forward pre-hook since the last step
        self._world: int | None = None
        self._local: list[torch.Tensor] = []  # |local mean gradient|² of each bucket (before the all-reduce)
        self._big: list[torch.Tensor] = []  # |averaged gradient|² of each bucket (after the all-reduce)
        self._pending: list[tuple] = []  # this backward's earlier buckets: (work, future, buffer, measured)
        self._fires: dict[int, int] = {}  # bucket index -> all-reduces since the last step (must be 1)
        self._extra: torch.Tensor | None = None  # the ranks' sums of the _EXTRA numbers, once all-reduced
        self._packed: dict[tuple, torch.Tensor] = {}  # reused buffer for the last bucket plus the _EXTRA numbers

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def world(self) -> int:
        if self._world is None:
            self._world = dist.get_world_size(self._group())
        return self._world

    @property
    def steps(self) -> int:
        """Optimizer steps seen (measured or not): the phase of ``every``, kept in :meth:`state_dict`."""
        return self._steps

    @steps.setter
    def steps(self, value: int) -> None:
        self._steps, self.measuring = value, value % self.every == 0

    def step(self, local_batch_size: int | None = None, *, loss_scale: float = 1.0) -> bool:
        """Feed this step's pair to ``noise``; call on every rank after backward, before ``optimizer.step()``.

        ``local_batch_size`` (optional) is checked against the examples the forward pre-hook counted.
        ``loss_scale``: the factor the gradients carry (AMP: ``scaler.get_scale()``, before ``unscale_``). Returns False
        (no measurement, no error) with one rank, on the steps ``every`` skips, or when some rank's hook did not
        fire exactly once per bucket; non-finite norms are counted as skips by the estimator. Waits for nothing but
        DDP's own all-reduce.
        """
        extra, big, examples, measured = self._extra, self._big, self.examples, self.measuring
        self.discard()
        self.steps += 1
        if local_batch_size is not None and local_batch_size != examples:
            raise HastenError(
                f"step(local_batch_size={local_batch_size}) but the DDP model's forwards since the last step held "
                f"{examples} examples: pass batch_size_fn=... to attach_ddp_noise if the batch is not dimension 0"
            )
        world = self.world()
        if world < 2 or extra is None or not measured:
            return False
        values = torch.cat([extra, torch.stack(big).to(extra)]).tolist()  # the one host sync
        sq_small, inv_b, any_bad = (v / world for v in values[:_EXTRA])  # the ranks' means
        if any_bad > 0:
            return False  # some rank's hook fired twice in a bucket, or its forwards saw no examples
        b_small = 1.0 / inv_b  # harmonic mean of the local batch sizes
        if not loss_scale > 0:
            raise HastenError(f"loss_scale must be positive, got {loss_scale}")
        unscale = 1.0 / (loss_scale * loss_scale)
        return self.noise.update(sq_small=sq_small * unscale, b_small=b_small, sq_big=sum(values[_EXTRA:]) * unscale,
                                 b_big=world * b_small)

    def discard(self) -> None:
        """Forget the forwards and all-reduces since the last :meth:`step` (e.g. SAM's second pass, which would
        count as a second all-reduce of the next step); call on every rank before the next step's first forward."""
        self._local, self._big, self._fires, self._extra = [], [], {}, None
        self.examples = 0

    def _write_extras(self, out: torch.Tensor) -> None:
        """This rank's _EXTRA numbers into ``out`` (3 elements), when its last bucket is ready."""
        out[0] = torch.stack(self._local).sum()
        out[1] = 1.0 / max(self.examples, 1)
        out[2] = float(self.examples <= 0 or max(self._fires.values()) != 1)

    def _packed_buffer(self, bucket_buffer: torch.Tensor) -> torch.Tensor:
        key = (bucket_buffer.numel(), bucket_buffer.dtype, bucket_buffer.device)
        if key not in self._packed:  # DDP copies the result out into .grad before the next step writes here
            self._packed[key] = bucket_buffer.new_empty(bucket_buffer.numel() + _EXTRA)
        return self._packed[key]

    def state_dict(self) -> dict:
        return meter_state(self.noise, self.steps)

    def load_state_dict(self, state: dict) -> None:
        self.steps = load_meter_state(self.noise, state)


def _completed(tensor: torch.Tensor) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(tensor)  # a Python hook's future must hold the tensor itself
    return future


def _defer(state: DDPNoiseState, buffer: torch.Tensor, record: bool) -> torch.futures.Future:
    """DDP's default for a bucket that is not the last: all-reduce it divided by the world size, asynchronously
    (it overlaps with the rest of backward). The future returned is completed by the last bucket's hook, on the
    training thread: no Python ``then`` callbacks, which gloo runs and destroys on its own threads."""
    work = dist.all_reduce(buffer.div_(state.world()), group=state._group(), async_op=True)
    future = torch.futures.Future()
    state._pending.append((work, future, buffer, record))
    return future


def _finish_pending(state: DDPNoiseState) -> None:
    """Wait for the other buckets' all-reduces (DDP launches buckets in index order, so they were all issued before
    the last one), read |ḡ|² of those being measured, and complete their futures."""
    for work, future, buffer, record in state._pending:
        work.wait()
        if record:
            state._big.append(_sq_norm(buffer))
        future.set_result(buffer)
    state._pending = []


def noise_scale_hook(state: DDPNoiseState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the default averaging all-reduce, recording |g_r|² before it and |ḡ|² after it; the
    last bucket of a measured step carries the rank's :data:`_EXTRA` numbers appended to its gradients."""
    with outside_backward_tls():
        return _reduce_bucket(state, bucket)


def _reduce_bucket(state: DDPNoiseState, bucket: dist.GradBucket) -> torch.futures.Future:
    buffer, index, measured = bucket.buffer(), bucket.index(), state.measuring
    if index == 0:
        state._pending = []  # a new backward (buckets left by one that failed midway are dropped)
    if measured:
        state._local.append(_sq_norm(buffer))  # the local mean gradient: DDP leaves averaging to the hook
        state._fires[index] = state._fires.get(index, 0) + 1
    if not bucket.is_last():
        return _defer(state, buffer, record=measured)
    group, world = state._group(), state.world()
    if not measured or buffer.dtype not in (torch.float32, torch.float64):
        if measured:  # a half-precision bucket cannot hold squared norms: they get their own small all-reduce
            state._extra = torch.empty(_EXTRA, dtype=torch.float64, device=buffer.device)
            state._write_extras(state._extra)
            extra_work = dist.all_reduce(state._extra, group=group, async_op=True)
        work = dist.all_reduce(buffer.div_(world), group=group, async_op=True)
        _finish_pending(state)
        work.wait()
        if measured:
            extra_work.wait()
            state._big.append(_sq_norm(buffer))
        return _completed(buffer)
    n = buffer.numel()
    packed = state._packed_buffer(buffer)
    torch.mul(buffer, 1.0 / world, out=packed[:n])  # the copy and DDP's division in one pass
    state._write_extras(packed[n:])  # summed, not averaged: step() divides by the world size on the host
    work = dist.all_reduce(packed, group=group, async_op=True)
    _finish_pending(state)
    work.wait()
    state._extra = packed[n:].clone()  # the buffer is reused next step
    state._big.append(_sq_norm(packed[:n]))
    return _completed(packed[:n])


def attach_ddp_noise(
    ddp_model,
    noise: NoiseScale | None = None,
    *,
    batch_size_fn: Callable[[tuple, dict], int] = first_dim,
    every: int = 1,
) -> DDPNoiseState:
    """Register :func:`noise_scale_hook` (and an example-counting forward pre-hook) on a DistributedDataParallel
    model, before its first backward. ``batch_size_fn(args, kwargs)`` gives a forward call's number of examples;
    ``every`` measures one step in that many (see :class:`DDPNoiseState`)."""
    state = DDPNoiseState(noise, process_group=getattr(ddp_model, "process_group", None), every=every)

    def count(module, args, kwargs):
        if torch.is_grad_enabled() and module.training:
            state.examples += batch_size_fn(args, kwargs)

    ddp_model.register_forward_pre_hook(count, with_kwargs=True)
    ddp_model.register_comm_hook(state, noise_scale_hook)
    settle_at_exit(state.process_group)
    return state
