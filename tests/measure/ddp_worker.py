"""torchrun worker for test_ddp.py: DDP on CPU (gloo) with the noise-scale comm hook, at fixed parameters.

Usage: python -m torch.distributed.run --nproc_per_node=2 ddp_worker.py SETUP.pt OUT_DIR STEPS
Every rank draws the same random permutation per step and takes its own disjoint slice: the global batch is a draw
without replacement from the dataset. Local batch sizes alternate (48, 64, 32); every third step accumulates two
micro-batches under no_sync(); one extra step gives the ranks different batch sizes, which must be skipped.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from hasten.measure import NoiseScale, attach_ddp_noise

LOCAL_BATCHES = (48, 64, 32)


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
        perm = torch.randperm(len(x), generator=gen)[: local * world]
        mine = perm[rank * local : (rank + 1) * local]
        ddp.zero_grad(set_to_none=True)
        if step % 3 == 2:  # gradient accumulation: the hook fires once, on the local mean of both halves
            half = local // 2
            with ddp.no_sync():
                (loss_fn(ddp(x[mine[:half]]), y[mine[:half]]) / 2).backward()
            (loss_fn(ddp(x[mine[half:]]), y[mine[half:]]) / 2).backward()
        else:
            loss_fn(ddp(x[mine]), y[mine]).backward()
        accepted.append(state.step(local))
    # Unequal local batch sizes: DDP's average is not the global mean, so the step must be skipped on every rank.
    ddp.zero_grad(set_to_none=True)
    uneven = 16 if rank == 0 else 24
    loss_fn(ddp(x[:uneven]), y[:uneven]).backward()
    accepted_uneven = state.step(uneven)
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(dict(estimate=state.noise.compute().as_dict(), accepted=accepted, uneven=accepted_uneven), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
