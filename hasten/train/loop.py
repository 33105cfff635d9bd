"""The training loop: one function, read top to bottom (nanoGPT-style).

Per step: set LR (schedule) → ``batch_start`` → ``batch_ready`` (methods may change the batch) → micro-batch loop
(forward under autocast with precision=bf16|fp16, loss × share of the batch, backward, ``after_backward``; the noise
scale is measured at the last one) → unscale (fp16) → ``before_optimizer_step`` → clip → optimizer step (skipped when
the loss is not finite) → ``batch_end`` → evaluate when due → log the row → checkpoint when due. Evaluating and
checkpointing at the *end* of step N puts the eval numbers in row N and lets a resumed run start at step N+1
without repeating anything.

A batch is one backward unless ``micro_batch_size`` splits it; the micro noise source splits only the steps it
measures. A micro-batch's loss is weighted by its share of the batch's examples, or of its loss terms for a loss
that declares them (``loss.terms(targets)``: a masked LM's scored tokens), so the split leaves the objective alone.

Under ``torchrun`` (see :mod:`hasten.train.distributed`) ``batch_size`` is the global batch: every rank draws it
from its own sampler (same seed) and trains on its shard, its loss weighted so that DDP's average of the ranks'
gradients is the global batch-mean gradient; only rank 0 writes files.

Exact resume: the checkpoint holds the model, optimizer, sampler position, every global RNG state and the
callbacks' states, taken between two steps; evaluation runs under ``fork_rng`` so it draws nothing from the
training RNG. A run killed at any point and started again with the same call ends bit-identical (same device,
same thread count); with noise_budget > 0 the steps the meter measures depend on timings (see
:mod:`hasten.train.noise_callback`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScaleEstimate
from hasten.methods import build_methods
from hasten.schedules import INCREASE_RULES
from hasten.tasks.base import Task
from hasten.train import distributed as dist
from hasten.train.batch_callback import BatchScheduleCallback
from hasten.train.checkpoint import encode_checkpoint, rng_state, set_rng_state, write_atomic
from hasten.train.config import TrainConfig, default_run_dir
from hasten.train.events import Callbacks, LoopState
from hasten.train.logger import RunLogger, Stopwatch, write_json
from hasten.train.noise_callback import NoiseScaleCallback, horizon_from_config, noise_source, resolve_source
from hasten.train.noise_callback import split_size
from hasten.train.data import Batches, load_data, ordered_batches
from hasten.train.rundir import CHECKPOINT, CHECKPOINTS_LOG, lock_run_dir, prepare_run_dir
from hasten.train.sampler import EpochSampler, shard
from hasten.train.schedule import make_schedule

MAX_NONFINITE = 20  # consecutive non-finite steps before giving up
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision= → torch.autocast dtype
EVAL_BATCH = 1024
# LoopState fields saved in a checkpoint and restored on resume.
SAVED_STATE = ("step", "examples", "epoch", "batch_size", "micro_batch_size", "lr", "loss", "should_stop",
               "nonfinite_steps")


@dataclass(frozen=True)
class FitResult:
    metrics: dict  # the last evaluation: {"eval/loss": ..., "eval/<metric>": ...}
    loss: float  # training loss of the last step
    steps: int
    examples: int
    noise: NoiseScaleEstimate | None  # None with noise=off
    run_dir: Path
    wall_time: float  # seconds, summed over resumed segments
    micro_batch_size: int  # examples per backward pass (0 = the whole batch)
    noise_source: str = "off"  # the noise-scale source used (noise=auto resolved)


def fit(task: Task, cfg: TrainConfig, callbacks: Iterable[Any] = (), *, run_dir: str | Path | None = None,
        resume: bool = True) -> FitResult:
    """Train ``task``'s model under ``cfg``, resuming from ``run_dir``'s checkpoint when there is one. The run
    directory is locked while it runs (:mod:`hasten.train.rundir`): a second process there gets a one-line error."""
    run_dir = Path(run_dir or cfg.run_dir or default_run_dir(cfg))
    with lock_run_dir(run_dir):
        return _fit(task, cfg, callbacks, run_dir, resume)


def _fit(task: Task, cfg: TrainConfig, callbacks: Iterable[Any], run_dir: Path, resume: bool) -> FitResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, world = resolve_device(cfg.device), dist.world_size()
    noise_source(cfg.noise, world)  # a bad noise= or precision= fails before any work
    if cfg.batch_increase_rule not in INCREASE_RULES:
        raise HastenError(f"batch_increase_rule={cfg.batch_increase_rule!r}: choose {' or '.join(INCREASE_RULES)}")
    amp = autocast_dtype(cfg.precision)
    micro = cfg.micro_batch_size
    check_micro(cfg.batch_size, micro)
    train, test = load_data(task, cfg.data or None)  # checked: map-style datasets of (input, target) pairs
    test = eval_subset(test, cfg.eval_examples)
    if cfg.batch_size > len(train):
        raise HastenError(f"batch_size={cfg.batch_size} is larger than {task.name}'s training set ({len(train)} "
                          f"examples): use batch_size <= {len(train)}")
    if cfg.noise != "off" and cfg.batch_size < 2:
        raise HastenError(f"noise={cfg.noise} compares the gradients of two batch sizes: it needs batch_size >= 2 "
                          f"(got {cfg.batch_size}); set noise=off")
    if cfg.batch_size < world:
        raise HastenError(f"batch_size={cfg.batch_size} (the global batch) is smaller than the {world} processes: "
                          f"use batch_size >= {world}")
    schedule = make_schedule(cfg.schedule, cfg.steps, cfg.warmup)
    dist.init_from_env(device)  # after the checks above, which fail alike on every rank
    rank, main = dist.rank(), dist.is_main()
    seed_everything(cfg.seed)
    model = task.make_model(cfg.model or None).to(device)
    methods = build_methods(cfg.methods, task, model)  # speedup methods (`hasten methods`), in stage order
    for method in methods:
        method.prepare_model(model)  # module swaps, before the optimizer and the checkpoint see the model
    source, source_why = resolve_source(cfg.noise, model, world, cfg.precondition,  # auto: hooks or micro
                                        lambda: first_examples(train, 2, device), task.loss)
    optimizer = make_optimizer(cfg, model.parameters())
    sampler = EpochSampler(len(train), cfg.seed)
    loader = Batches(train, sampler, device, rank=rank, world=world, workers=cfg.data_workers,
                     pin_memory=cfg.pin_memory)

    run_dir.mkdir(parents=True, exist_ok=True)  # rank 0's lock made it; other ranks may get here first
    ckpt = prepare_run_dir(run_dir, cfg, resume, main)  # every rank reads the checkpoint
    callbacks = list(callbacks)
    if source != "off" and not any(isinstance(c, NoiseScaleCallback) for c in callbacks):
        callbacks.append(NoiseScaleCallback(source, horizon_from_config(cfg), cfg.precondition, cfg.noise_every,
                                            cfg.noise_small, cfg.noise_budget))
    if cfg.batch != "fixed" and not any(isinstance(c, BatchScheduleCallback) for c in callbacks):
        callbacks.append(BatchScheduleCallback())  # sets batch size, LR and momentum at batch_start
    meters = [c for c in callbacks if isinstance(c, NoiseScaleCallback)]  # last: they see the batch methods made
    callbacks = Callbacks([*(c for c in callbacks if not isinstance(c, NoiseScaleCallback)), *methods, *meters])
    state = LoopState(model, optimizer, cfg, task, run_dir, device, len(train), cfg.batch_size, micro,
                      loss_fn=task.loss, train_set=train)
    state.noise_bias = "; ".join(f"{getattr(c, 'name', '') or type(c).__name__} {c.noise_bias}"
                                 for c in callbacks.callbacks if getattr(c, "noise_bias", ""))
    state.scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None  # fp16: scale the loss
    state.net = net = dist.wrap(model)  # DDP with several processes: it copies rank 0's weights to every rank
    if world > 1:
        seed_everything(cfg.seed + rank)  # rank r draws its own dropout and augmentations (model init is shared)
    weight = 1.0  # this rank's loss weight, set each step (1 in one process)

    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext

    def forward_backward(fire: bool = False, scale: bool = False) -> torch.Tensor:
        """Forward and backward of ``state.batch`` in micro-batches: adds the gradient of the batch-mean loss to
        ``.grad`` (times the fp16 loss scale with ``scale``); returns that loss. Also ``state.closure``, so a callback
        can redo it (SAM). Micro-batches of ``micro_batch_size``, or smaller on a step the noise meter splits."""
        inputs, targets = state.batch[:2]
        total, micro = None, split_size(len(inputs), state.micro_batch_size, state.split)
        chunks = list(zip(inputs.split(micro), targets.split(micro)))
        shares = micro_batch_shares(state.loss_fn, inputs, [y for _, y in chunks])
        state.micro_batches = ([len(x) for x, _ in chunks], shares)
        for i, (x, y) in enumerate(chunks):
            with dist.sync_if(net, last=i == len(chunks) - 1):  # DDP all-reduces on the last micro-batch only
                with autocast():
                    # Each micro-batch's share of the rank's batch mean, times the rank's weight (1 in one process;
                    # a factor of exactly 1 is not applied: one op and one backward node less on a plain step).
                    loss = state.loss_fn(net(x), y) if len(x) else net(x).sum()
                    factor = shares[i] * weight if len(x) else 1.0
                    loss = loss if isinstance(factor, float) and factor == 1.0 else loss * factor
                # An empty shard (the last examples of an epoch) still joins the all-reduce.
                (state.scaler.scale(loss) if scale else loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
            if fire:
                state.last_backward = i == len(chunks) - 1
                callbacks.fire("after_backward", state)
        return total

    state.closure = forward_backward
    last_eval: dict = {}
    stopwatch = Stopwatch()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        sampler.load_state_dict(ckpt["sampler"])
        for key in SAVED_STATE:
            setattr(state, key, ckpt[key])
        last_eval, stopwatch = ckpt["last_eval"], Stopwatch(ckpt["time"])
        if state.scaler is not None:
            state.scaler.load_state_dict(ckpt["scaler"])
    if main:
        write_json(run_dir / "config.json", {**dataclasses.asdict(cfg), "task": task.name, "micro_batch_size": micro,
                                             "device": str(device), "train_size": len(train), "test_size": len(test),
                                             "world_size": world, "noise_source": source,
                                             "noise_source_why": source_why, "noise_bias": state.noise_bias,
                                             "torch_version": torch.__version__})

    model.train()
    nonfinite_streak = 0
    logger = RunLogger(run_dir, cfg.steps, state.step, cfg.progress) if main else dist.NullLogger()
    with logger:
        callbacks.fire("fit_start", state)
        if ckpt is not None:
            callbacks.load_state_dict(ckpt["callbacks"])
            set_rng_state(dist.own_rng_state(ckpt))
        while state.step < cfg.steps and not state.should_stop:
            state.metrics = {"step": state.step + 1}  # the row logged for this step
            state.skewed_batch, state.split = "", 0
            state.lr = cfg.lr * schedule(state.step)
            callbacks.fire("batch_start", state)  # may change state.batch_size / state.lr
            for group in optimizer.param_groups:
                group["lr"] = state.lr
            check_micro(state.batch_size, state.micro_batch_size)
            indices = sampler.next_batch(state.batch_size)  # the global batch: the same on every rank
            mine = shard(indices, rank, world)
            state.batch = loader.fetch(mine, state.batch_size)  # on the device; read by workers if cfg.data_workers
            n = len(indices)  # examples drawn (methods may train on fewer, or on changed ones)
            weight = world * len(mine) / n  # DDP averages the ranks: mean_r(weight_r·mean_r) = the batch mean
            callbacks.fire("batch_ready", state)  # may replace state.batch
            try:
                loss_sum = forward_backward(fire=True, scale=state.scaler is not None)
            except (RuntimeError, NotImplementedError) as e:  # e.g. an op without a float16 kernel on this device
                if amp is None or not any(t in str(e) for t in ("Half", "BFloat16", "float16", "bfloat16")):
                    raise
                raise HastenError(f"precision={cfg.precision} on {device.type}: {str(e).splitlines()[0][:200]}; use "
                                  "precision=32 (or bf16)") from e
            if state.scaler is not None:
                state.scaler.unscale_(optimizer)  # the noise meter read its scaled gradients at after_backward
            callbacks.fire("before_optimizer_step", state)

            state.loss = reduce_loss(state, loss_sum) / world  # the global batch-mean loss
            finite = math.isfinite(state.loss)
            if finite and cfg.grad_clip > 0:
                grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                state.metrics["grad_norm"] = grad_norm
                finite = math.isfinite(grad_norm) or state.scaler is not None  # fp16 overflow: the scaler skips
            if finite:
                state.scaler.step(optimizer) if state.scaler is not None else optimizer.step()
                nonfinite_streak = 0
            else:
                nonfinite_streak += 1
                state.nonfinite_steps += 1
            if state.scaler is not None:
                state.scaler.update()  # lowers the scale after an overflow, raises it after a run of good steps
            optimizer.zero_grad(set_to_none=True)
            state.step, state.examples, state.epoch = state.step + 1, state.examples + n, sampler.epoch
            state.metrics.update({"step": state.step, "examples": state.examples, "epoch": state.epoch,
                                  "lr": state.lr, "batch_size": n, "train/loss": state.loss,
                                  "nonfinite_steps": state.nonfinite_steps, "time": stopwatch()})
            callbacks.fire("batch_end", state)

            final = state.step == cfg.steps or state.should_stop
            if (cfg.eval_every and state.step % cfg.eval_every == 0) or final or state.evaluate_now:
                callbacks.fire("before_evaluate", state)  # e.g. EMA swaps in its averaged weights
                last_eval = evaluate(model, task, test, sharded=True, workers=cfg.data_workers,
                                     pin_memory=cfg.pin_memory)
                state.metrics.update(last_eval)
                callbacks.fire("evaluate", state)
                state.evaluate_now = False
            logger.log(state.metrics)
            if nonfinite_streak >= MAX_NONFINITE:
                raise HastenError(f"loss is not finite for {MAX_NONFINITE} steps in a row at step {state.step}: "
                                  f"lower lr={cfg.lr}; the last good checkpoint is kept in {run_dir}")
            # No checkpoint inside a non-finite streak, so the latest one is always a good one.
            if ((cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0) or final) and not nonfinite_streak:
                payload = snapshot(state, sampler, callbacks, last_eval, stopwatch())  # every rank: gathers RNGs
                if main:
                    save(run_dir, payload, cfg.keep_checkpoints)
                dist.barrier()  # the file exists for every rank's "checkpoint" callbacks
                callbacks.fire("checkpoint", state)
        callbacks.fire("fit_end", state)
    loader.close()  # stops the data workers
    dist.barrier()  # returns on every rank once rank 0's files are written

    noise = callbacks.find(NoiseScaleCallback)
    return FitResult(last_eval, state.loss, state.step, state.examples, noise.estimate() if noise else None,
                     run_dir, stopwatch(), state.micro_batch_size, noise.source if noise else "off")


def micro_batch_shares(loss_fn, inputs: torch.Tensor, targets: list[torch.Tensor]) -> list:
    """What each micro-batch's mean loss is multiplied by so that their sum is the batch's loss: its share of the
    examples, or, for a loss that averages a varying number of terms per example (it has ``loss_fn.terms(targets)``,
    e.g. a masked LM's masked tokens), its share of the terms (tensors, not read on the host)."""
    terms = getattr(loss_fn, "terms", None)
    if terms is None or len(targets) < 2:
        return [len(y) / max(len(inputs), 1) for y in targets]  # an empty shard: one empty micro-batch
    counts = [terms(y).sum() for y in targets]
    total = sum(counts)
    return [c / total for c in counts]


def first_examples(dataset, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of the dataset's first ``n`` examples, on ``device``."""
    batch = torch.utils.data.default_collate([dataset[i] for i in range(min(n, len(dataset)))])
    return tuple(t.to(device) for t in batch[:2])


def reduce_loss(state: LoopState, loss_sum: torch.Tensor) -> float:
    """The loss summed over the ranks, with callbacks' ``state.shared`` numbers summed in the same all-reduce."""
    if not state.shared or dist.world_size() == 1:
        return dist.all_reduce_sum(loss_sum).item()
    keys = list(state.shared)
    sums = dist.all_reduce_sum(torch.stack([loss_sum, *(loss_sum.new_tensor(float(state.shared[k])) for k in keys)]))
    total, *rest = sums.tolist()
    state.shared.update(zip(keys, rest))
    return total


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, dataset, batch_size: int = EVAL_BATCH, *, sharded: bool = False,
             workers: int = 0, pin_memory: bool = True) -> dict:
    """Mean loss and mean metric over ``dataset`` in eval mode; draws nothing from the global RNGs. ``sharded``:
    each rank evaluates its part and the sums are all-reduced (call it on every rank). ``workers``: processes
    reading a dataset that is not a TensorDataset (``pin_memory`` on CUDA)."""
    if len(dataset) == 0:
        return {}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss × examples, metric, metric count
    indices = torch.arange(len(dataset))
    if sharded:
        indices = shard(indices, dist.rank(), dist.world_size())
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        pin = pin_memory and device.type == "cuda"
        for batch in ordered_batches(dataset, indices.split(batch_size), workers=workers, pin_memory=pin):
            x, y = (t.to(device, non_blocking=True) for t in batch[:2])
            outputs = model(x)
            metric = task.metric(outputs, y)
            sums += torch.stack([task.loss(outputs, y).double() * len(x),  # task.loss is a batch mean
                                 metric.double().sum(), sums.new_tensor(metric.numel())])
    model.train(was_training)
    if sharded:
        dist.all_reduce_sum(sums)
    loss_sum, metric_sum, metric_count = sums.tolist()
    return {"eval/loss": loss_sum / len(dataset), f"eval/{task.metric_name}": metric_sum / metric_count}


def eval_subset(test, n: int):
    """``n`` test examples (a fixed random subset, the same for every run and rank), or all of them if n is 0."""
    if n < 0:
        raise HastenError(f"eval_examples={n} must be 0 (the whole test set) or a positive number of examples")
    if n == 0 or n >= len(test):
        return test
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return torch.utils.data.Subset(test, keep.tolist())


def snapshot(state: LoopState, sampler: EpochSampler, callbacks: Callbacks, last_eval: dict, time: float) -> dict:
    """Everything a resumed run needs to continue exactly from between two steps."""
    rngs = dist.all_gather(rng_state())  # every rank's RNGs (ranks draw apart), rank 0's also under "rng"
    return {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
            "sampler": sampler.state_dict(), "rng": rngs[0], "rng_ranks": rngs, "callbacks": callbacks.state_dict(),
            "cfg": dataclasses.asdict(state.cfg), "last_eval": last_eval, "time": time,
            "scaler": state.scaler.state_dict() if state.scaler is not None else None,
            **{k: getattr(state, k) for k in SAVED_STATE}}


def save(run_dir: Path, payload: dict, keep: bool) -> None:
    """Write checkpoint-latest.pt atomically; with ``keep`` also checkpoint-step{N}.pt, logged with its LR."""
    data = encode_checkpoint(payload)
    write_atomic(run_dir / CHECKPOINT, data)
    if keep:
        name = f"checkpoint-step{payload['step']}.pt"
        write_atomic(run_dir / name, data)
        with open(run_dir / CHECKPOINTS_LOG, "a") as f:
            f.write(json.dumps({"step": payload["step"], "path": name, "lr": payload["lr"]}) + "\n")


def autocast_dtype(precision) -> torch.dtype | None:
    """The torch.autocast dtype for ``precision`` (None = float32, no autocast)."""
    if str(precision) not in PRECISIONS:
        raise HastenError(f"precision={precision!r}: choose 32, bf16 or fp16")
    return PRECISIONS[str(precision)]


def check_micro(batch_size: int, micro: int) -> None:
    if batch_size < 1:
        raise HastenError(f"batch_size={batch_size} must be at least 1")
    if micro < 0 or micro > batch_size or (micro and batch_size % micro):
        raise HastenError(f"micro_batch_size={micro} must divide batch_size={batch_size} (0 = the whole batch)")


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":  # L2 weight decay, heavy-ball momentum
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":  # decoupled weight decay (Loshchilov & Hutter 2019)
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    raise HastenError(f"optimizer={cfg.optimizer!r}: choose sgd or adam")


def resolve_device(name: str) -> torch.device:
    """``name`` ("" = cuda if available, else cpu); plain cuda is cuda:LOCAL_RANK under torchrun."""
    device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HastenError(f"device={name} but no CUDA GPU is visible: use device=cpu or leave device unset")
    return dist.local_device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
