"""Noise scale from DistributedDataParallel at the cost of one extra scalar all-reduce per step.

Each rank's gradient before the all-reduce is a batch of the local B examples (B_small); the averaged gradient after
it is the global batch of B·world examples (B_big), at the same parameters (McCandlish et al. 2018,
arXiv:1812.06162, App. A.1). A DDP communication hook reads both on every bucket, around the usual averaging
all-reduce (what ``default_hooks.allreduce_hook`` does: divide by the world size, sum-all-reduce):

>>> state = attach_ddp_noise(ddp_model)           # before the first backward       # doctest: +SKIP
>>> loss_fn(ddp_model(x), y).backward()                                             # doctest: +SKIP
>>> state.step(len(x))                            # every rank, before optimizer.step()   # doctest: +SKIP
>>> state.noise.compute().b_simple               # identical on every rank          # doctest: +SKIP

With gradient accumulation wrap all but the last micro-step in ``ddp_model.no_sync()`` (the hook then fires once,
on the accumulated local mean) and pass the whole local batch to ``step``. Every rank must use the same local batch
size within a step (else DDP's average is not the global mean and the step is skipped); it may change between steps.
"""
# No `from __future__ import annotations`: DDP checks the hook's annotations against dist.GradBucket at runtime.
import torch
import torch.distributed as dist

from hasten.measure.noise_scale import NoiseScale


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None
    return torch.linalg.vector_norm(t, dtype=dtype).square()


class DDPNoiseState:
    """State of :func:`noise_scale_hook`: per-bucket squared norms of this step, and the estimator they feed."""

    def __init__(self, noise: NoiseScale | None = None, process_group=None):
        self.noise = noise if noise is not None else NoiseScale()
        self.process_group = process_group
        self.device: torch.device | None = None  # where the scalar all-reduce runs (the gradients' device)
        self._local: dict[int, torch.Tensor] = {}  # bucket index -> |local mean gradient|² (before the all-reduce)
        self._global: dict[int, torch.Tensor] = {}  # bucket index -> |averaged gradient|² (after it)
        self._fires: dict[int, int] = {}  # bucket index -> all-reduces since the last step (must be 1)

    def _group(self):
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def step(self, local_batch_size: int) -> bool:
        """Feed this step's pair to ``noise``; call on every rank after backward, before ``optimizer.step()``.

        Returns False (no measurement, no error) when the hook did not fire exactly once per bucket, the ranks'
        batch sizes differ, or there is one rank; non-finite norms are counted as skips by the estimator.
        """
        local, glob, fires = self._local, self._global, self._fires
        self._local, self._global, self._fires = {}, {}, {}
        group = self._group()
        world = dist.get_world_size(group)
        if world < 2:
            return False
        device = self.device or _collective_device(group)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        bad = not local or set(local) != set(glob) or max(fires.values()) != 1
        sq_local = zero if bad else torch.stack(list(local.values())).sum().to(device, torch.float64)
        sq_global = zero if bad else torch.stack(list(glob.values())).sum().to(device, torch.float64)
        b = float(local_batch_size)
        flags = torch.tensor([b, b * b, float(bad)], dtype=torch.float64, device=device)
        packed = torch.cat([torch.stack([sq_local, sq_global]), flags])
        dist.all_reduce(packed, group=group)  # the one extra collective: 5 numbers
        sq_small, sq_big, mean_b, mean_b_sq, any_bad = (packed / world).tolist()
        if any_bad > 0 or abs(mean_b_sq - mean_b * mean_b) > 1e-9 * mean_b * mean_b:
            return False  # a rank missed its measurement, or the ranks' batch sizes differ
        return self.noise.update(sq_small=sq_small, b_small=b, sq_big=sq_big, b_big=b * world)

    def state_dict(self) -> dict:
        return self.noise.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.noise.load_state_dict(state)


def _collective_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def noise_scale_hook(state: DDPNoiseState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the default averaging all-reduce, recording |g|² before and after it."""
    group = state._group()
    buffer, index = bucket.buffer(), bucket.index()
    state.device = buffer.device
    state._local[index] = _sq_norm(buffer)  # the local mean gradient: DDP leaves averaging to the hook
    state._fires[index] = state._fires.get(index, 0) + 1
    buffer.div_(dist.get_world_size(group))
    future = dist.all_reduce(buffer, group=group, async_op=True).get_future()

    def record(fut):
        averaged = fut.value()[0]
        state._global[index] = _sq_norm(averaged)
        return averaged

    return future.then(record)


def attach_ddp_noise(ddp_model, noise: NoiseScale | None = None) -> DDPNoiseState:
    """Register :func:`noise_scale_hook` on a DistributedDataParallel model (before its first backward)."""
    state = DDPNoiseState(noise, process_group=getattr(ddp_model, "process_group", None))
    params = [p for p in ddp_model.parameters() if p.requires_grad]
    if params:
        state.device = params[0].device
    ddp_model.register_comm_hook(state, noise_scale_hook)
    return state
