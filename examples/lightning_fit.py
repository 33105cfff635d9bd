"""The gradient noise scale and a growing batch inside Lightning's ``trainer.fit``: an MLP on Fashion-MNIST.

    python examples/lightning_fit.py --epochs 6
    python examples/lightning_fit.py --task digits --epochs 20 --batch-size 32

NoiseScaleMonitor reads B_simple from the micro-batches of gradient accumulation (McCandlish et al. 2018,
arXiv:1812.06162); BatchSizeSchedule doubles the batch where a step LR decay would halve the LR (Smith et al. 2017,
"Don't Decay the Learning Rate, Increase the Batch Size"), by raising accumulate_grad_batches between steps.
"""
import argparse
import logging
import math
import warnings

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Subset

from hasten.integrations.lightning import BatchSizeSchedule, NoiseScaleMonitor
from hasten.schedules import increase_batch
from hasten.tasks import get_task

parser = argparse.ArgumentParser(description="noise scale and batch-size schedule of an MLP, in Lightning")
parser.add_argument("--task", default="fashion", choices=["fashion", "digits"], help="hasten task (data + MLP)")
parser.add_argument("--epochs", type=int, default=6, help="passes over the training set")
parser.add_argument("--batch-size", type=int, default=64, help="examples per dataloader batch (micro-batch)")
parser.add_argument("--accumulate", type=int, default=2, help="micro-batches per step at the start")
parser.add_argument("--max-batch", type=int, default=1024, help="largest batch; past it the LR decays instead")
parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (momentum 0.9)")
parser.add_argument("--train-size", type=int, default=0, help="use the first N training examples (0 = all)")
args = parser.parse_args()
logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", module="lightning")  # e.g. "the dataloader does not have many workers"

task = get_task(args.task)
train, test = task.load(None)
if args.train_size:
    train = Subset(train, range(min(args.train_size, len(train))))


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = task.make_model()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return task.loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", task.metric(self.net(x), y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=args.lr, momentum=0.9)


torch.manual_seed(0)
base = args.batch_size * args.accumulate
total = args.epochs * len(train)
# Where a step decay would divide the LR by 2 (at 50% and 75% of the run), the batch doubles instead; the
# "exact" rule holds the SGD noise ε(N/B − 1)/(1 − m) of that run, so it needs the training-set size N.
schedule = increase_batch(base, milestones=(total / 2, total * 3 / 4), factor=2, max_batch=args.max_batch,
                          multiple=args.batch_size, dataset_size=len(train))
monitor = NoiseScaleMonitor(small="all")
trainer = pl.Trainer(max_epochs=args.epochs, accumulate_grad_batches=args.accumulate, accelerator="auto", devices=1,
                     callbacks=[monitor, BatchSizeSchedule(schedule)], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
trainer.fit(Classifier(), DataLoader(train, batch_size=args.batch_size, shuffle=True),
            DataLoader(test, batch_size=1000))

est = monitor.estimate
low, high = est.interval
print(f"B_simple = {est.b_simple:.1f} examples (95% interval {low:.1f} to {high:.1f}) over {est.n_steps} steps")
for change in trainer.callbacks[1].history:
    print(f"from step {change['step']}: batch {change['batch_size']} (accumulate {change['accumulate']}), "
          f"LR ×{change['lr_mult']:.3g}")
accuracy = trainer.callback_metrics.get("val_accuracy", torch.tensor(math.nan))
print(f"{trainer.global_step} optimizer steps, validation accuracy {float(accuracy):.4f}")
