"""Run under ``torchrun --nproc_per_node=2``: ``fit`` with DDP, batch changes and noise=ddp; writes OUT/rank{r}.json.

Two runs of the same config (:data:`CONFIG`): OUT/run straight through, and OUT/resumed interrupted after step
:data:`STOP_AT` on both ranks, then resumed by calling ``fit`` again. Each rank records its final parameters and the
noise estimate; the test compares them with a single-process fit over the same global batches.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny_task import tiny_config, tiny_task  # noqa: E402

from hasten.train import Callback, fit  # noqa: E402
from hasten.train.distributed import rank  # noqa: E402

N_TRAIN = 97  # 97 = 8·12 + 1: an epoch ends on a 1-example batch (one rank's shard is empty)
# Global batches 12, 1 (empty shard), 12, 18 (mid-epoch), 13 (shards of 7 and 6), 24; micro-batches of 3; noise=ddp.
CONFIG = dict(steps=20, batch_size=12, micro_batch_size=3, batch="stages",
              batch_stages=("0.45:12", "0.7:18", "1:24:1.5"), noise="ddp", noise_horizon=60.0,
              schedule="cosine", eval_every=3, checkpoint_every=4, lr=0.05)
STOP_AT = 6


class Interrupt(Callback):
    def on_batch_end(self, state) -> None:
        if state.step == STOP_AT:
            raise KeyboardInterrupt


class Record(Callback):
    """Keeps the model's final parameters (as this rank holds them)."""

    def on_fit_end(self, state) -> None:
        self.params = {k: v.tolist() for k, v in state.model.state_dict().items()}


def main(out: Path) -> None:
    task, cfg = tiny_task(n_train=N_TRAIN), tiny_config(**CONFIG)
    record = Record()
    result = fit(task, cfg, [record], run_dir=out / "run")
    try:
        fit(task, cfg, [Interrupt()], run_dir=out / "resumed")
        raise AssertionError("the interrupted run went through")
    except KeyboardInterrupt:
        pass
    resumed = Record()
    fit(task, cfg, [resumed], run_dir=out / "resumed")
    noise = result.noise.as_dict()
    (out / f"rank{rank()}.json").write_text(json.dumps({
        "params": record.params, "resumed_params": resumed.params, "metrics": result.metrics, "steps": result.steps,
        "examples": result.examples, "loss": result.loss, "noise": noise}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
