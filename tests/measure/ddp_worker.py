"""torchrun worker for test_ddp.py: DDP on CPU (gloo) with the noise-scale comm hook, at fixed parameters.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py SETUP.pt OUT_DIR STEPS
Every rank draws the same random permutation per step and takes its own disjoint slice: the global batch is a draw
without replacement from the dataset. Local batch sizes alternate (48, 64, 32); every third step accumulates two
micro-batches under no_sync(); every fourth step gives the ranks different batch sizes (local ∓ 16), which enter the
estimate with harmonic-mean batch sizes. A last step runs two backwards without no_sync (the hook fires twice per
bucket): every rank must drop it.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from hasten.errors import HastenError
from hasten.measure import NoiseScale, attach_ddp_noise

LOCAL_BATCHES = (48, 64, 32)


class Recording(NoiseScale):
    def __init__(self):
        super().__init__()
        self.calls = []

    def update(self, **pair):
        self.calls.append(pair)
        return super().update(**pair)


def main(setup_path: str, out_dir: str, steps: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    setup = torch.load(setup_path)
    x, y = setup["x"], setup["y"]
    model = torch.nn.Linear(x.shape[1], setup["n_classes"])
    model.load_state_dict(setup["state"])
    ddp = DDP(model, bucket_cap_mb=0.0005)  # tiny buckets: the weight and the bias travel separately
    state = attach_ddp_noise(ddp, NoiseScale(dataset_size=len(x)))
    loss_fn = torch.nn.functional.cross_entropy
    gen = torch.Generator().manual_seed(1234)  # same on every rank
    accepted = []
    for step in range(steps):
        local = LOCAL_BATCHES[step % len(LOCAL_BATCHES)]
        sizes = [local - 16, local + 16] if step % 4 == 3 else [local] * world
        perm = torch.randperm(len(x), generator=gen)[: sum(sizes)]
        mine = perm[sum(sizes[:rank]) : sum(sizes[: rank + 1])]
        local = sizes[rank]
        ddp.zero_grad(set_to_none=True)
        if step % 3 == 2:  # gradient accumulation: the hook fires once, on the local mean of both halves
            half = local // 2
            with ddp.no_sync():
                (loss_fn(ddp(x[mine[:half]]), y[mine[:half]]) / 2).backward()
            (loss_fn(ddp(x[mine[half:]]), y[mine[half:]]) / 2).backward()
        else:
            loss_fn(ddp(x[mine]), y[mine]).backward()
        accepted.append(state.step(local))
    ddp.zero_grad(set_to_none=True)
    for _ in range(2):  # two synced backwards in one step: the hook fires twice per bucket
        loss_fn(ddp(x[:32]), y[:32]).backward()
    accepted_twice = state.step()  # 64 examples counted by the forward pre-hook
    estimate = state.noise.compute().as_dict()
    # An extra synced pass between steps (SAM's second backward) is forgotten by discard().
    loss_fn(ddp(x[:32]), y[:32]).backward()
    state.discard()
    ddp.zero_grad(set_to_none=True)
    loss_fn(ddp(x[32:64]), y[32:64]).backward()
    after_discard = state.step(32)
    ddp.zero_grad(set_to_none=True)
    loss_fn(ddp(x[:32]), y[:32]).backward()
    try:
        state.step(31)
        mismatch = ""
    except HastenError as e:
        mismatch = str(e)
    # every=2 measures steps 0 and 2 with the same pairs as a meter measuring every step, and skips 1 and 3.
    nets = [DDP(torch.nn.Linear(x.shape[1], setup["n_classes"]), bucket_cap_mb=0.0005) for _ in range(2)]
    meters = []
    for net, every in zip(nets, (2, 1)):
        net.module.load_state_dict(setup["state"])
        meters.append(attach_ddp_noise(net, Recording(), every=every))
    every_accepted = []
    for step in range(4):
        mine = torch.arange(32) + 64 * step + 32 * rank
        for net in nets:
            net.zero_grad(set_to_none=True)
            loss_fn(net(x[mine]), y[mine]).backward()
        every_accepted.append([meter.step(32) for meter in meters])
    every = dict(accepted=every_accepted, calls=[m.noise.calls for m in meters], steps=meters[0].state_dict()["steps"])
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(dict(estimate=estimate, accepted=accepted, twice=accepted_twice, after_discard=after_discard,
                       mismatch=mismatch, every=every), f)
    dist.barrier()  # no rank tears the group down while another still finishes its last collective
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
