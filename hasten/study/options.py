"""What a batch-size study runs: its options, its goal(s), and the plan of trials (one ``fit()`` each).

Shallue et al. 2018 ("Measuring the Effects of Data Parallelism on Neural Network Training"): steps to result at a
batch size is the first step at which any tuned trial at that batch size reaches the goal, with the learning rate
(and momentum) re-tuned at every batch size. The LR grid at batch size B is centred on the task's tuned LR moved by
a scaling rule, lr0·(B/B0)^p with p = 1 (linear, Goyal et al. 2017), 1/2 (square root) or 0, times ``lr_factors``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass

from hasten.errors import HastenError
from hasten.train.config import TrainConfig

RULES = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}
BACKENDS = ("process", "ray")
KINDS = ("target", "smith_le", "noise")
# TrainConfig keys that do not change what a trial computes (left out of its id).
_NOT_IDENTITY = ("run_dir", "progress", "threads", "device", "checkpoint_every", "eval_every")


@dataclass(frozen=True)
class StudyOptions:
    """`hasten study batch-size TASK key=value ...`: these keys, plus any key of `hasten config TASK`.

    ``target``: goals joined by commas, all to be reached: ``loss:V`` (training loss averaged over about
    ``smooth_examples`` examples centred on the step, <= V), ``eval_loss:V`` (test loss <= V), ``metric:V`` or
    ``<metric name>:V`` (test metric >= V). Test goals are evaluated every max(1, resolution·step) steps, by the
    run's own evaluation: on ``eval_examples`` test examples (0 = all), with the weights it evaluates (EMA's average
    with ``methods=ema``).
    ``max_steps`` 0 budgets 3 × the task's steps × max(1, B0/B) steps at batch B (B0 = the task's batch_size).
    Trials use a constant LR (after any warmup) unless ``schedule=`` is given: a decaying schedule would tie the
    steps to the goal to the budget. A training-loss goal reached after the first epoch mixes in re-seen examples
    (the batch loss drops when they come round again): prefer a test goal there.
    """

    target: str = ""  # goal(s), e.g. loss:0.1 or accuracy:0.95 or loss:0.1,accuracy:0.95 (see above)
    batch_sizes: tuple[int, ...] = ()  # () = the task's batch_size × 2^k, k = -3..4, within the training set
    lr_rule: str = "sqrt"  # LR grid centre at batch B: lr·(B/B0)^p; p = 1 linear, 1/2 sqrt, 0 none
    lr_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)  # the LR grid at each batch size: these × the centre
    momenta: tuple[float, ...] = ()  # SGD momentum values to tune over too; () = the task's momentum only
    seeds: tuple[int, ...] = (0,)  # one trial per seed for every (batch, LR, momentum)
    max_steps: int = 0  # step budget per trial; 0 = automatic (see above)
    resolution: float = 0.05  # steps to the goal are resolved to this fraction of themselves
    smooth_examples: int = 2048  # examples averaged (centred) for the training-loss goal
    workers: int = 0  # trials at once (processes); 0 = one per CPU core; 1 = in this process
    backend: str = "process"  # process (spawned workers) | ray (Ray Tune; pip install 'hasten[ray]')
    noise_run: bool = True  # one more run at the task's batch size measuring B_simple, set beside B_crit
    smith_le_epochs: float = -1.0  # Smith & Le check: epochs per fixed-LR run; -1 = the task's default run; 0 = off
    smith_le_lrs: tuple[float, ...] = ()  # the Smith & Le check's fixed LRs; () = the task's lr and lr/4
    bootstrap: int = 1000  # bootstrap replicates for the B_crit interval (needs 4 or more batch sizes)


@dataclass(frozen=True)
class Goal:
    """One goal: ``name`` is loss (smoothed training loss), eval_loss, or metric (the task's test metric)."""

    name: str
    value: float

    @property
    def higher(self) -> bool:
        return self.name == "metric"

    def met(self, x: float) -> bool:
        return math.isfinite(x) and (x >= self.value if self.higher else x <= self.value)

    def label(self, metric_name: str) -> str:
        shown = {"loss": "training loss (smoothed) ≤", "eval_loss": "test loss ≤"}.get(self.name,
                                                                            f"test {metric_name} ≥")
        return f"{shown} {self.value:g}"


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a full training config (its run dir set) and what to watch for."""

    kind: str  # target (train to the goals) | smith_le (fixed epochs at a fixed LR) | noise (the B_simple run)
    trial_id: str
    cfg: TrainConfig
    goals: tuple[Goal, ...]
    resolution: float
    smooth_examples: int


def parse_target(text: str, metric_name: str) -> tuple[Goal, ...]:
    """``loss:0.1,accuracy:0.95`` -> goals; the metric may be named ``metric`` or by the task's metric name."""
    metric_key = metric_name.replace(" ", "_")
    if not text.strip():
        raise HastenError(f"give target=loss:VALUE (smoothed training loss) or target={metric_key}:VALUE "
                          "(test metric), e.g. target=loss:0.1; join several with commas")
    goals = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition(":")
        name = {"metric": "metric", metric_key: "metric", "loss": "loss", "eval_loss": "eval_loss"}.get(name)
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or name is None or not math.isfinite(number):
            raise HastenError(f"target part {part.strip()!r} is not NAME:NUMBER with NAME one of loss, eval_loss, "
                              f"{metric_key}: e.g. target=loss:0.1 or target={metric_key}:0.95")
        if name in goals:
            raise HastenError(f"target names {name} twice: give each goal once")
        goals[name] = Goal(name, number)
    return tuple(goals.values())


def geometric_grid(b0: int, train_size: int) -> tuple[int, ...]:
    """b0·2^k for k = -3..4, rounded, deduplicated, between 1 and the training-set size."""
    grid = sorted({max(1, round(b0 * 2.0**k)) for k in range(-3, 5)})
    return tuple(b for b in grid if b <= train_size)


def scaled_lr(lr0: float, b0: int, b: int, rule: str) -> float:
    """lr0·(B/B0)^p: p = 1 linear (Goyal et al. 2017), 1/2 square root (Krizhevsky 2014; Hoffer et al. 2017)."""
    return lr0 * (b / b0) ** RULES[rule]


def budget(opts: StudyOptions, base_steps: int, b0: int, b: int) -> int:
    """The step budget of a trial at batch ``b``: perfect scaling from the task's default run, with margin 3."""
    return opts.max_steps or int(math.ceil(3 * base_steps * max(1.0, b0 / b)))


def validate(opts: StudyOptions, train_size: int) -> None:
    """One-line errors for options that cannot run."""
    if opts.lr_rule not in RULES:
        raise HastenError(f"lr_rule={opts.lr_rule!r}: choose {', '.join(RULES)}")
    if opts.backend not in BACKENDS:
        raise HastenError(f"backend={opts.backend!r}: choose process or ray")
    bad = [b for b in opts.batch_sizes if not 1 <= b <= train_size]
    if bad:
        raise HastenError(f"batch_sizes {bad} are outside 1..{train_size} (the training-set size)")
    if opts.batch_sizes and len(set(opts.batch_sizes)) < 2:
        raise HastenError("batch_sizes needs 2 or more different sizes to fit the critical batch")
    checks = [(not opts.lr_factors or any(f <= 0 for f in opts.lr_factors), "lr_factors must be positive numbers"),
              (any(not 0 <= m < 1 for m in opts.momenta), "momenta must be in [0, 1)"),
              (not opts.seeds, "seeds must name at least one seed"),
              (opts.max_steps < 0, "max_steps must be positive (0 = automatic)"),
              (not 0 < opts.resolution < 1, "resolution must be between 0 and 1, e.g. 0.05"),
              (opts.smooth_examples < 0, "smooth_examples must be 0 or more"),
              (opts.workers < 0, "workers must be 0 (one per core) or more"),
              (opts.smith_le_epochs < 0 and opts.smith_le_epochs != -1, "smith_le_epochs must be >= 0, or -1"),
              (any(lr <= 0 for lr in opts.smith_le_lrs), "smith_le_lrs must be positive"),
              (opts.bootstrap < 0, "bootstrap must be 0 or more")]
    for failed, message in checks:
        if failed:
            raise HastenError(message)


def trial_id(kind: str, cfg: TrainConfig, goals: tuple[Goal, ...], resolution: float, smooth: int) -> str:
    """``target-b64-lr0.1-m0.9-s0-1a2b3c``: readable, plus a hash of everything that changes the result."""
    keys = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY}
    blob = json.dumps([kind, keys, [dataclasses.astuple(g) for g in goals], resolution, smooth], sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:6]
    return f"{kind}-b{cfg.batch_size}-lr{cfg.lr:.4g}-m{cfg.momentum:g}-s{cfg.seed}-{digest}"


def study_key(cfg: TrainConfig, goals: tuple[Goal, ...], opts: StudyOptions) -> str:
    """Hash naming the default study dir: the same command finds the same study (grids may grow inside it)."""
    per_trial = ("batch_size", "lr", "momentum", "steps", "seed")
    keys = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IDENTITY + per_trial}
    blob = json.dumps([keys, [dataclasses.astuple(g) for g in goals], opts.resolution, opts.smooth_examples],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _spec(kind, cfg, goals, opts, study_dir) -> TrialSpec:
    tid = trial_id(kind, cfg, goals, opts.resolution, opts.smooth_examples)
    cfg = dataclasses.replace(cfg, run_dir=str(study_dir / "trials" / tid))
    return TrialSpec(kind, tid, cfg, goals, opts.resolution, opts.smooth_examples)


def plan_trials(cfg: TrainConfig, opts: StudyOptions, goals, batch_sizes, train_size: int, study_dir):
    """The target trials (batch × LR × momentum × seed) and the Smith & Le trials, smallest batch first."""
    b0, lr0 = cfg.batch_size, cfg.lr
    cfg = dataclasses.replace(cfg, noise="off")  # only the noise run measures
    specs = []
    for b in sorted(batch_sizes):
        for factor in opts.lr_factors:
            for m in opts.momenta or (cfg.momentum,):
                for seed in opts.seeds:
                    trial = dataclasses.replace(cfg, batch_size=b, lr=scaled_lr(lr0, b0, b, opts.lr_rule) * factor,
                                                momentum=m, seed=seed, steps=budget(opts, cfg.steps, b0, b))
                    specs.append(_spec("target", trial, goals, opts, study_dir))
    epochs = smith_le_epochs(opts, cfg, train_size)
    for lr in (opts.smith_le_lrs or (lr0, lr0 / 4)) if epochs > 0 else ():
        for b in sorted(batch_sizes):
            steps = max(1, math.ceil(epochs * train_size / b))
            trial = dataclasses.replace(cfg, batch_size=b, lr=lr, seed=opts.seeds[0], steps=steps)
            specs.append(_spec("smith_le", trial, (), opts, study_dir))
    return specs


def smith_le_epochs(opts: StudyOptions, cfg: TrainConfig, train_size: int) -> float:
    """Epochs per Smith & Le run: as given, or (-1) those of the task's default run, steps·batch/N."""
    return opts.smith_le_epochs if opts.smith_le_epochs >= 0 else cfg.steps * cfg.batch_size / train_size


def noise_spec(cfg: TrainConfig, opts: StudyOptions, goals, b: int, lr: float, examples_to_target: float | None,
               study_dir) -> TrialSpec:
    """The one-run prediction: train at batch ``b`` with the meter on, to the same goals (McCandlish et al. 2018).

    The EMA horizon is a fifth of the examples the tuned trial at ``b`` took to reach the target, so B_simple read
    at the target reflects the end of that run rather than its start."""
    horizon = examples_to_target / 5 if examples_to_target else 0.0
    noise = cfg.noise if cfg.noise != "off" else "micro"
    # Measuring is this run's point: every step (noise_budget=0), not the training default's one step in N.
    trial = dataclasses.replace(cfg, batch_size=b, lr=lr, seed=opts.seeds[0], noise=noise, noise_horizon=horizon,
                                noise_budget=0.0, steps=budget(opts, cfg.steps, cfg.batch_size, b))
    return _spec("noise", trial, goals, opts, study_dir)
