"""Data parallelism for :func:`hasten.train.fit` under ``torchrun``: the process group, rank helpers, the DDP wrap,
gradient sync on the last micro-batch only, and the few collectives the loop needs. In one process every helper is
a no-op, so the loop has no ``if distributed:`` branches.

Launch: ``torchrun --nproc_per_node=N -m hasten.cli.main train TASK ...`` (or any script calling ``fit``). ``fit``
joins torchrun's group from its environment (``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...) when ``WORLD_SIZE`` > 1
and no group exists yet (gloo on CPU, nccl on ``cuda:LOCAL_RANK``); the group then lasts as long as the process and
later fits reuse it (re-creating a destroyed group under the same torchrun store can hang).

Errors: settings are checked before the group is joined, identically on every rank, so a bad setting fails every
rank at once. An error raised on one rank only ends that process; torchrun then stops the others (and a peer's
closed connection fails their pending collective), so nothing waits for the group's timeout.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import os

import torch
import torch.distributed as dist
from torch import nn

from hasten._gloo import settle_at_exit
from hasten.errors import HastenError

TIMEOUT = datetime.timedelta(minutes=10)  # a collective waiting this long for a peer fails instead of hanging


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group; before it exists, torchrun's ``WORLD_SIZE`` (1 without torchrun)."""
    return dist.get_world_size() if initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one process that writes files, logs and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """``cuda`` without an index becomes ``cuda:LOCAL_RANK`` under torchrun (one GPU per process)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        local, visible = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
        if local >= visible:
            raise HastenError(f"process {local} of this node has no GPU of its own ({visible} visible): use "
                              f"torchrun --nproc_per_node={visible}, or device=cpu")
        return torch.device("cuda", local)
    return device


def init_from_env(device: torch.device) -> None:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 and none is initialized."""
    if initialized() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    if not dist.is_available():
        raise HastenError("WORLD_SIZE > 1 but this torch build has no torch.distributed: run in one process")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    settle_at_exit()  # gloo: see hasten._gloo


def wrap(model: nn.Module) -> nn.Module:
    """``model`` in DistributedDataParallel with several processes (its constructor copies rank 0's parameters and
    buffers to every rank), else ``model`` itself."""
    if world_size() < 2:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sync_if(net: nn.Module, last: bool):
    """Context for one micro-batch's backward: DDP all-reduces the accumulated gradient on the ``last`` one only
    (``no_sync`` on the others)."""
    if isinstance(net, nn.parallel.DistributedDataParallel) and not last:
        return net.no_sync()
    return contextlib.nullcontext()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place; returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


def all_gather(obj) -> list:
    """Every rank's ``obj`` (anything ``torch.save`` takes), in rank order, on every rank."""
    if world_size() < 2:
        return [obj]
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # tensors travel as torch.save bytes: all_gather_object cannot unpickle CPU tensors
    out = [None] * world_size()
    dist.all_gather_object(out, buffer.getvalue())
    return [torch.load(io.BytesIO(data), weights_only=True) for data in out]


def own_rng_state(ckpt: dict) -> dict:
    """This rank's RNG states from a checkpoint (``rng_ranks``); rank 0's (``rng``) when the checkpoint was written
    by another number of processes."""
    rngs = ckpt.get("rng_ranks", [])
    return rngs[rank()] if len(rngs) == world_size() else ckpt["rng"]


def barrier() -> None:
    if world_size() > 1 and initialized():
        dist.barrier()


class NullLogger:
    """Stands in for the RunLogger on ranks other than 0: writes nothing."""

    def log(self, row: dict) -> None: ...

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc) -> None: ...
