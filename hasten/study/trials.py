"""One trial of a batch-size study: a ``fit()`` run that stops at the goal, and the record it leaves.

When is the goal reached (Shallue et al. 2018: steps to result)?

- Training loss: the per-step batch loss is noisy, so the goal reads the mean over a window centred on each step
  c, ±h(c) steps with h(c) = min(⌈smooth_examples/(2B)⌉, ⌊resolution·c⌋). A centred window has no lag, so the
  step is not biased by the smoothing (a trailing EMA would add about its horizon to every trial); the run goes
  on h(c) steps past c to see the window's right half. Horizon in examples: the same noise level at every B.
- Test metric / test loss: the run's own evaluation (the loop's, asked for at steps 1, 2, ... spaced by
  max(1, ⌊resolution·step⌋)), so the first step at which the goal holds is found within a fraction ``resolution``
  of itself, and the goal is judged on what the run reports: its ``eval_examples`` subset of the test set, and the
  weights its evaluation uses (the averaged ones with ``methods=ema``).

Several goals: each one's first step is recorded; the trial is done at the latest of them. A window mean above 3×
the first step's loss, or a non-finite loss, ends the trial as diverged. A trial that can no longer reach the goal
before the fastest finished trial at its batch size and seed (``bounds.json``, kept by the study process) stops
as pruned: it could not change the steps to result. Wall time is training time only (forward, backward,
optimizer step), summed over resumed segments; evaluation and logging are left out.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path

import torch

from hasten.errors import HastenError
from hasten.study.options import Goal, TrialSpec
from hasten.train.events import Callback, LoopState

DIVERGE_FACTOR = 3.0
PRUNE_EVERY = 50  # steps between looks at bounds.json
TRAJECTORY_POINTS = 20  # B_simple samples evenly spaced in steps, for its mean and the adaptive gain
RESULTS = "results.jsonl"
BOUNDS = "bounds.json"


class TargetCallback(Callback):
    """Stops the run once every goal is reached; records step, examples and training time at that step."""

    name = "study_target"

    def __init__(self, goals: tuple[Goal, ...], resolution: float, smooth_examples: int, batch_size: int,
                 bounds: Path | None = None, key: str = ""):
        self.goals, self.resolution = goals, resolution
        self.bounds, self.key = bounds, key  # pruning: see on_batch_end
        self.max_half = math.ceil(smooth_examples / (2 * batch_size))
        self.cum = [0.0]  # prefix sums of the per-step training loss
        self.examples: list[int] = []  # cumulative examples after each step
        self.times: list[float] = []  # cumulative training seconds after each step
        self.next_center, self.next_eval = 1, 1
        self.reached: dict[str, int] = {}
        self.status, self.train_time, self._t0 = "running", 0.0, 0.0

    def half_width(self, c: int) -> int:
        return min(self.max_half, int(self.resolution * c))

    def window_mean(self, c: int) -> float:
        h = self.half_width(c)
        return (self.cum[c + h] - self.cum[c - h - 1]) / (2 * h + 1)

    def on_batch_start(self, state: LoopState) -> None:
        self._t0 = time.perf_counter()

    def on_batch_end(self, state: LoopState) -> None:
        self.train_time += time.perf_counter() - self._t0
        self.cum.append(self.cum[-1] + state.loss)
        self.examples.append(state.examples)
        self.times.append(self.train_time)
        step = len(self.examples)
        if not math.isfinite(state.loss):
            self.status = "diverged"
        loss_goal = next((g for g in self.goals if g.name == "loss"), None)
        while self.status == "running" and self.next_center + self.half_width(self.next_center) <= step:
            c, mean = self.next_center, self.window_mean(self.next_center)
            if mean > DIVERGE_FACTOR * self.cum[1]:
                self.status = "diverged"
            elif loss_goal is not None and "loss" not in self.reached and loss_goal.met(mean):
                self.reached["loss"] = c
            self.next_center += 1
        if self.status == "running" and any(g.name != "loss" and g.name not in self.reached for g in self.goals):
            if step >= self.next_eval:
                self.next_eval = step + max(1, int(self.resolution * step))
                state.evaluate_now = True  # the loop evaluates after batch_end: see on_evaluate
        self._settle(state)
        if self.status == "running" and step % PRUNE_EVERY == 0 and self._beaten():
            self.status, state.should_stop = "pruned", True

    def on_evaluate(self, state: LoopState) -> None:
        """Test goals, judged on the evaluation the loop just made (its test subset, its weights: EMA's average
        when that method runs), whether this callback asked for it or not."""
        values = {"eval_loss": state.metrics.get("eval/loss", math.nan),
                  "metric": state.metrics.get(f"eval/{state.task.metric_name}", math.nan)}
        for g in self.goals:
            if self.status == "running" and g.name != "loss" and g.name not in self.reached and g.met(values[g.name]):
                self.reached[g.name] = state.step
        self._settle(state)

    def _settle(self, state: LoopState) -> None:
        if self.status == "running" and len(self.reached) == len(self.goals):
            self.status = "reached"
        state.should_stop = state.should_stop or self.status != "running"

    def _beaten(self) -> bool:
        """Another trial at this batch size and seed reached the goal in fewer steps than this one still can:
        this trial cannot change the steps to result (Shallue et al. 2018 take the fastest), so it stops."""
        bound = read_bounds(self.bounds).get(self.key)
        earliest = [self.next_center if g.name == "loss" else self.next_eval for g in self.goals
                    if g.name not in self.reached]  # the soonest each goal still to come can be met
        return bound is not None and max(earliest + list(self.reached.values())) > bound

    def result(self) -> dict:
        """Step, examples and training seconds at the goal (None when it was not reached)."""
        step = max(self.reached.values()) if self.status == "reached" else None
        at = (lambda xs: xs[step - 1]) if step else (lambda xs: None)
        return {"status": self.status, "steps": step, "examples": at(self.examples), "time": at(self.times),
                "goal_steps": dict(self.reached), "train_time": self.train_time}

    def state_dict(self) -> dict:
        return {"cum": torch.tensor(self.cum, dtype=torch.float64), "examples": torch.tensor(self.examples),
                "times": torch.tensor(self.times, dtype=torch.float64), "next_center": self.next_center,
                "next_eval": self.next_eval, "reached": dict(self.reached), "status": self.status,
                "train_time": self.train_time}

    def load_state_dict(self, state: dict) -> None:
        self.cum, self.examples = state["cum"].tolist(), state["examples"].tolist()
        self.times = state["times"].tolist()
        self.next_center, self.next_eval = state["next_center"], state["next_eval"]
        self.reached, self.status, self.train_time = dict(state["reached"]), state["status"], state["train_time"]


def watch_parent(parent_pid: int, every: float = 0.5) -> None:
    """Worker initializer: end this process once the study process that started it is gone (SIGKILL, OOM), busy
    or idle, so an orphan never keeps writing to a trial that the study's rerun resumes."""
    def loop() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every)
        os._exit(70)

    threading.Thread(target=loop, name="hasten-watch-parent", daemon=True).start()


def read_bounds(path: Path | None) -> dict:
    """``bounds.json``: per "batch-seed", the fewest steps to the goal any finished trial took so far."""
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def run_trial(spec: TrialSpec) -> dict:
    """Run (or resume) one trial in its own run dir; return its record (one line of results.jsonl).

    The training log goes to ``train.log`` in the run dir; each start is logged to ``attempts.jsonl`` there."""
    from hasten.tasks import get_task
    from hasten.train.loop import fit

    cfg = spec.cfg
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "start": time.time()}) + "\n")
    target = None
    if spec.goals:
        bounds = run_dir.parents[1] / BOUNDS if spec.kind == "target" else None
        target = TargetCallback(spec.goals, spec.resolution, spec.smooth_examples, cfg.batch_size, bounds,
                                f"{cfg.batch_size}-{cfg.seed}")
    record = {"trial_id": spec.trial_id, "kind": spec.kind, "batch_size": cfg.batch_size, "lr": cfg.lr,
              "momentum": cfg.momentum, "seed": cfg.seed, "budget": cfg.steps}
    with open(run_dir / "train.log", "a") as log, contextlib.redirect_stdout(log):
        try:
            result = fit(get_task(cfg.task), cfg, [target] if target else [], run_dir=run_dir)
        except HastenError as e:
            if "not finite" not in str(e):  # a settings problem: the study stops with its message
                raise
            # The loop gave up on a run whose loss stayed non-finite.
            return {**record, "status": "diverged", "error": str(e), "steps": None, "examples": None, "time": None}
    record.update({"steps_run": result.steps, "examples_run": result.examples, "train_time": result.wall_time,
                   "final": dict(result.metrics)})
    if target is not None:
        record.update(target.result())
        if record["status"] == "running":
            record["status"] = "budget"  # the step budget ran out first
    else:
        record.update({"status": "done", "steps": result.steps, "examples": result.examples,
                       "time": result.wall_time})
    if spec.kind == "noise":
        record.update(noise_summary(run_dir, record["steps"] or result.steps, cfg))
    return record


def noise_summary(run_dir: Path, last_step: int, cfg) -> dict:
    """B_simple at ``last_step`` (the goal) and its trajectory sampled evenly in steps up to there, with its mean
    and the adaptive-batch gain γ (McCandlish et al. 2018, eq. 2.9 and App. D)."""
    from hasten.study.gain import adaptive_batch_gain
    from hasten.train.logger import read_jsonl

    rows = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    b_at = lambda s: rows.get(s, {}).get("noise/b_simple")  # noqa: E731
    steps = sorted({max(1, round(k * last_step / TRAJECTORY_POINTS)) for k in range(1, TRAJECTORY_POINTS + 1)})
    trajectory = [[s, b_at(s)] for s in steps]
    valid = [b for _, b in trajectory if b is not None and math.isfinite(b) and b > 0]
    at_target = rows.get(last_step, {})
    return {"b_simple_at_target": at_target.get("noise/b_simple"), "b_simple_se": at_target.get("noise/b_simple_se"),
            "b_simple_lo": at_target.get("noise/b_simple_lo"), "b_simple_hi": at_target.get("noise/b_simple_hi"),
            "b_simple_mean": sum(valid) / len(valid) if valid else None, "trajectory": trajectory,
            "trajectory_dropped": len(trajectory) - len(valid),
            "adaptive_gain": adaptive_batch_gain(valid) if valid else None,
            "noise_source": cfg.noise, "noise_horizon": cfg.noise_horizon}


class ResultsLog:
    """``results.jsonl``: one line per finished trial, appended, flushed and fsync'ed by the study process alone.

    A line cut short by a crash is dropped on open, so the rerun appends after whole lines only."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            whole = data[: data.rfind(b"\n") + 1]
            if len(whole) != len(data):
                self.path.write_bytes(whole)
            for line in whole.decode().splitlines():
                record = json.loads(line)
                self.records[record["trial_id"]] = record

    def append(self, record: dict) -> None:
        record = clean(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(clean(record)) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records[record["trial_id"]] = record


def clean(value):
    """``value`` with non-finite floats as None (standard JSON), through dicts and lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
