"""Study goals on the test set are judged on the evaluation the run itself makes: its ``eval_examples`` subset and
the weights it evaluates (EMA's average with methods=ema), at steps resolved to 5% of themselves."""
import math
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))

from train_tiny_task import tiny_config, tiny_task  # noqa: E402

import hasten.train.loop as loop  # noqa: E402
from hasten.study.options import Goal  # noqa: E402
from hasten.study.trials import TargetCallback  # noqa: E402
from hasten.train import fit  # noqa: E402
from hasten.train.logger import read_jsonl  # noqa: E402


def trial(tmp_path, goals, **overrides):
    cfg = tiny_config(steps=60, batch_size=8, eval_every=0, checkpoint_every=0, noise="off", **overrides)
    target = TargetCallback(goals, 0.05, 64, cfg.batch_size)
    fit(tiny_task(), cfg, [target], run_dir=tmp_path)
    return target.result(), read_jsonl(tmp_path / "metrics.jsonl")


def first_met(rows, key, goal):
    return next((r["step"] for r in rows if key in r and goal.met(r[key])), None)


def test_goal_is_judged_on_the_ema_weights(tmp_path):
    """With an EMA that never moves from the initial weights (half-life 10⁹ steps) the evaluated model never
    reaches a test loss the live weights pass within a few steps: the goal must not count as reached."""
    goal = Goal("eval_loss", 0.8)
    live, live_rows = trial(tmp_path / "live", (goal,))
    assert live["status"] == "reached" and live["steps"] < 30  # the live weights get there quickly
    assert live["steps"] == first_met(live_rows, "eval/loss", goal)
    ema, rows = trial(tmp_path / "ema", (goal,), methods="ema:half_life=1e9")
    assert ema["status"] == "running" and ema["steps"] is None  # the budget ran out; judged on the average
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) > 10 and min(evals) > 0.8  # every evaluation the run made was of the (initial) average


def test_goal_is_judged_on_eval_examples(tmp_path, monkeypatch):
    """eval_examples=12 of the 40 test examples: every evaluation, the goal's included, sees those 12. Test
    accuracy 0.85 is reached on all 40 (step 13 here) but never on these 12 (at most 10/12): not reached."""
    sizes = []
    real = loop.evaluate

    def spy(model, task, dataset, *args, **kwargs):
        sizes.append(len(dataset))
        return real(model, task, dataset, *args, **kwargs)

    monkeypatch.setattr(loop, "evaluate", spy)
    goal = Goal("metric", 0.85)
    whole, rows = trial(tmp_path / "whole", (goal,))
    assert whole["status"] == "reached" and whole["steps"] == first_met(rows, "eval/accuracy", goal)
    assert set(sizes) == {40}
    sizes.clear()
    subset, rows = trial(tmp_path / "subset", (goal,), eval_examples=12)
    assert len(sizes) > 10 and set(sizes) == {12}
    accuracies = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    assert all(math.isclose(a * 12, round(a * 12)) for a in accuracies)  # accuracies of 12 examples
    assert subset["status"] == "running" and max(accuracies) < 0.85  # as the run itself reports
