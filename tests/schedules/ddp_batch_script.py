"""Run under ``torchrun --nproc_per_node=2``: DDP training with batch changes; writes OUT/rank{r}.json.

Each rank draws the same global batch from its own sampler and trains on its shard; the batch grows from 8 to 24
examples mid-epoch (stages schedule). Every rank also trains a plain copy of the model on the whole global batch
and feeds a reference NoiseScale from the shards' gradients, to compare with DDP and its noise-scale hook.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

from hasten.measure.ddp import attach_ddp_noise  # noqa: E402
from hasten.measure.noise_scale import NoiseScale  # noqa: E402
from hasten.schedules import stages  # noqa: E402
from hasten.train.sampler import EpochSampler, shard  # noqa: E402

N, STEPS = 40, 9


def grad_vector(model, x, y) -> torch.Tensor:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    x, y = torch.randn(N, 5), torch.randint(0, 3, (N,))
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.00005)  # several buckets after step 1
    noise_state = attach_ddp_noise(ddp, NoiseScale())
    ref_noise = NoiseScale()
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    schedule = stages([(24, 8, 1.0), (64, 16, 1.0), (float("inf"), 24, 1.0)])
    schedule.validate(dataset_size=N, multiple=world)
    sampler, examples, seen, batches = EpochSampler(N, seed=3), 0, [], []
    for _ in range(STEPS):
        plan = schedule.plan(examples)
        global_idx = sampler.next_batch(plan.batch_size)
        mine = shard(global_idx, rank, world)
        seen.append((sampler.epoch, mine.tolist()))
        batches.append(len(global_idx))
        opt.zero_grad()
        F.cross_entropy(ddp(x[mine]), y[mine]).backward()
        noise_state.step(len(mine))
        opt.step()
        # Reference: the global-batch gradient on a plain model, and the meter fed with the shards' gradients.
        shards = [grad_vector(reference, x[s], y[s]) for s in (shard(global_idx, r, world) for r in range(world))]
        g_big = grad_vector(reference, x[global_idx], y[global_idx])
        ref_noise.update(torch.stack([g.square().sum() for g in shards]).mean().item(), len(mine),
                         g_big.square().sum().item(), len(global_idx))
        ref_opt.step()
        examples += len(global_idx)
    params_match = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(model.parameters(), reference.parameters()))
    est, ref = noise_state.noise.compute(), ref_noise.compute()
    result = {"seen": seen, "batches": batches, "params_match": params_match, "n_steps": est.n_steps,
              "b_simple": est.b_simple, "ref_b_simple": ref.b_simple, "grad_sq": est.grad_sq,
              "ref_grad_sq": ref.grad_sq}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
