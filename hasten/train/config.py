"""Training configuration: one flat set of named defaults, overridable as ``key=value``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    task: str = "digits"  # registered task name (`hasten tasks`)
    model: str = ""  # model variant of the task ("" = the task's default, e.g. fashion: mlp or cnn)
    data: str = ""  # data location for tasks that read files ("" = the task's default location)
    steps: int = 1000  # optimizer steps to train
    batch_size: int = 128  # global batch size (examples per optimizer step)
    micro_batch_size: int = 0  # examples per backward pass; must divide batch_size. 0 = the whole batch (the
    #   micro noise source splits the steps it measures into 4 micro-batches, or this size if smaller)
    lr: float = 0.1  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam
    momentum: float = 0.9  # SGD momentum (Adam: beta1)
    weight_decay: float = 0.0  # decoupled for adam (AdamW), L2 for sgd
    schedule: str = "cosine"  # constant | cosine | step  (LR multiplier as a function of step)
    warmup: int = 0  # linear LR warmup steps
    # Batch-size schedule (hasten.schedules). With any but fixed, the run is steps × batch_size examples long and
    # progress is counted in steps of batch_size examples: bigger batches mean fewer optimizer steps.
    batch: str = "fixed"  # fixed | increase (grow the batch where `schedule` decays the LR) | adaptive | stages
    batch_max: int = 0  # increase, adaptive: largest global batch (0 = the training set); increase: LR decays past it
    batch_increase_rule: str = "exact"  # increase: exact (hold g = ε(N/B − 1)/(1 − m)) | approx (hold ε/B, B ≪ N)
    batch_min: int = 0  # adaptive: smallest global batch (0 = batch_size)
    batch_rule: str = "linear"  # adaptive: linear (B = c·B_simple) | sqrt (B = c·√(batch_size·B_simple))
    batch_scale: float = 1.0  # adaptive: c in batch_rule (B_simple ≈ B_crit within ~10×, McCandlish et al.)
    batch_gain: float = 0.05  # adaptive: change the batch only for at least this predicted relative gain
    batch_lr_rule: str = "adascale"  # adaptive: none | linear | sqrt | adascale | noise_lr | noise_momentum
    batch_stages: tuple[str, ...] = ()  # stages: rows until:batch[:lr_mult[:momentum]], until a fraction of the run
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (noise is measured before clipping)
    eval_every: int = 200  # steps between evaluations on the test set (0 = only at the end)
    eval_examples: int = 0  # evaluate on this many test examples (a fixed, seeded random subset); 0 = all of them
    checkpoint_every: int = 200  # steps between atomic checkpoints (0 = only at the end)
    keep_checkpoints: bool = False  # also keep a copy of every checkpoint (with its LR) for `hasten influence`
    seed: int = 0  # seeds model init, data order and every random draw
    noise: str = "auto"  # noise-scale source: auto (torchrun: ddp; else hooks if they cover the model, else micro)
    #   | hooks (per-example norms from layer hooks) | micro (micro-batches) | per_example (torch.func) | ddp | off
    noise_horizon: float = 0.0  # EMA horizon in examples for the noise scale; 0 = auto (a fifth of the run's examples); -1 = running mean over the whole run
    noise_every: int = 1  # measure one step in this many (the first is step noise_every): less overhead, same
    #   mean, more variance. With noise_budget: the fewest steps between measurements
    noise_budget: float = 0.03  # the meter times itself and measures one step in N so that it takes at most about
    #   this share of the training time (0 = exactly one step in noise_every). 0.03 keeps the default run within
    #   1.05x of a loop without the meter with room for timing noise (BENCHMARKS.md, bench_meter_cost.py)
    noise_small: str = "first"  # micro: read the first micro-batch's gradient (first) or every one's (all)
    precondition: bool = False  # measure Adam-preconditioned gradients g/(sqrt(v_hat)+eps) instead of raw
    run_dir: str = ""  # where metrics, checkpoints and the report go ("" = runs/<task>-<seed>)
    progress: bool = True  # show a progress bar
    threads: int = 0  # torch intra-op threads; 0 = leave as is
    data_workers: int = 0  # DataLoader processes reading a task's data that is not a TensorDataset (0 = this
    #   one); the batches are the same for any number
    pin_memory: bool = True  # with data_workers on CUDA: batches in page-locked memory, copied asynchronously
    device: str = ""  # torch device to train on ("" = cuda if available, else cpu)
    precision: str = "32"  # 32 | bf16 | fp16: torch.autocast of forward and loss (fp16 with a GradScaler; the
    #   noise meter reads unscaled gradients; evaluation stays in float32)
    methods: str = ""  # speedup methods to compose, e.g. label_smoothing,ema:half_life=200 (`hasten methods`)


def task_config(task_name: str, overrides) -> TrainConfig:
    """The task's defaults (its tuned hyper-parameters) under the user's ``key=value`` overrides."""
    from hasten.config import apply_overrides
    from hasten.tasks import get_task

    task = get_task(task_name)
    return apply_overrides(apply_overrides(TrainConfig(task=task.name), task.defaults), overrides)


def default_run_dir(cfg: TrainConfig, kind: str = "train") -> str:
    """runs/<kind>-<task>-<hash of the config>: the same command finds (and resumes) the same run."""
    import dataclasses
    import hashlib
    import json

    keys = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("run_dir", "progress", "threads", "data_workers", "pin_memory")}
    digest = hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"runs/{kind}-{cfg.task}-{digest}"
