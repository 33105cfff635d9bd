"""The gradient noise scale in a plain PyTorch loop: an MLP on scikit-learn's digits, 4 micro-batches per step.

    python examples/plain_loop.py --steps 500

Each step's loss is split into micro-batches (gradient accumulation); hasten.MicroBatchTap reads the first
micro-batch's own gradient as backward runs and the accumulated one at tap.step(), before clipping
(McCandlish et al. 2018, arXiv:1812.06162). With --micro-batches 1 there is one backward per step and
hasten.PerExampleTap reads every example's gradient norm from layer hooks instead (B_small = 1).
B_simple is in examples, averaged over the run.
"""
import argparse

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import hasten

parser = argparse.ArgumentParser(description="noise scale of an MLP on digits, measured in a plain loop")
parser.add_argument("--steps", type=int, default=500, help="optimizer steps")
parser.add_argument("--batch-size", type=int, default=128, help="examples per optimizer step")
parser.add_argument("--micro-batches", type=int, default=4, help="gradient accumulation: backwards per step (1: per-example norms from layer hooks)")
args = parser.parse_args()

torch.manual_seed(0)
digits = load_digits()  # 1,797 8x8 images, bundled with scikit-learn
data = TensorDataset(torch.tensor(digits.data, dtype=torch.float32) / 16, torch.tensor(digits.target))
loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
noise = hasten.NoiseScale(dataset_size=len(data))  # the finite-population term: batches drawn without replacement
tap = hasten.MicroBatchTap(model, noise) if args.micro_batches > 1 else hasten.PerExampleTap(model, noise)

step, k = 0, args.micro_batches
while step < args.steps:
    for x, y in loader:
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            (nn.functional.cross_entropy(model(xm), ym) / k).backward()
        tap.step(batch_size=len(x))  # after the last backward, before clipping and the optimizer step
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        step += 1
        if step == args.steps:
            break

est = tap.noise.compute()
low, high = est.interval
print(f"B_simple = {est.b_simple:.1f} examples (95% interval {low:.1f} to {high:.1f}) over {est.n_steps} steps; "
      f"|G|² = {est.grad_sq:.3g}, tr Σ = {est.trace_cov:.3g}")
