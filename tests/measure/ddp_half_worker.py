"""torchrun worker for test_ddp.py: the DDP meter on float16 and bfloat16 models (gloo, CPU).

A half-precision bucket cannot carry the squared norms, so the meter sends them in their own small all-reduce; the
estimate must agree with the same run in float32. Usage: ddp_half_worker.py OUT_DIR
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from hasten.measure import attach_ddp_noise


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    x = torch.randn(4096, 20)
    y = (x @ torch.randn(20, 5) + torch.randn(4096, 5)).argmax(1)
    out = {}
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(1)
        ddp = DDP(torch.nn.Linear(20, 5).to(dtype))
        meter = attach_ddp_noise(ddp)
        gen = torch.Generator().manual_seed(5)  # the same batches for every dtype, split between the ranks
        accepted = []
        for _ in range(300):
            mine = torch.randperm(len(x), generator=gen)[rank * 64 : (rank + 1) * 64]
            ddp.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(ddp(x[mine].to(dtype)).float(), y[mine]).backward()
            accepted.append(meter.step(64))
        out[str(dtype)] = dict(b_simple=meter.noise.compute().b_simple, accepted=all(accepted))
    with open(f"{out_dir}/half{rank}.json", "w") as f:
        json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
