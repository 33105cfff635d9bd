"""Cyclic cosine schedule (against hasten's own cosine restarted per cycle), Pareto frontier, time to target."""
import math

import pytest

from hasten.methods.tradeoff import cycle_ends, cycle_lengths, cyclic_cosine, pareto_front, time_to_target
from hasten.train.schedule import cosine


def test_cycle_lengths_grow_by_t_mult_and_add_up():
    assert cycle_lengths(700, 3, 2) == [100, 200, 400]
    assert cycle_lengths(1000, 4, 2) == [67, 133, 267, 533] and sum(cycle_lengths(1000, 4, 2)) == 1000
    assert cycle_lengths(300, 3, 1) == [100, 100, 100]
    assert cycle_ends([100, 200, 400]) == [100, 300, 700]
    with pytest.raises(ValueError):
        cycle_lengths(2, 3)


def test_each_cycle_is_a_full_cosine_run():
    lengths = [30, 60, 120]
    f = cyclic_cosine(lengths)
    start = 0
    for length in lengths:
        ref = cosine(length)  # a separate run of this length
        assert [f(start + u) for u in range(length)] == pytest.approx([ref(u) for u in range(length)])
        start += length
    assert f(0) == 1.0 and f(29) < 0.01 and f(30) == 1.0


def test_warmup_only_in_the_first_cycle():
    f = cyclic_cosine([100, 200], warmup=10)
    assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert f(100) == 1.0


def test_pareto_front_hand_example():
    pts = [(1.0, 0.5), (2.0, 0.7), (3.0, 0.6), (4.0, 0.9), (2.0, 0.4), (5.0, 0.9)]
    assert pareto_front(pts) == [0, 1, 3]
    assert pareto_front([(1.0, 2.0), (2.0, 1.0), (3.0, 1.5)], higher_is_better=False) == [0, 1]


def test_time_to_target():
    pts = [(3.0, 0.8), (1.0, 0.5), (2.0, 0.75)]
    assert time_to_target(pts, 0.75) == 2.0 and time_to_target(pts, 0.9) == math.inf


def test_eval_points_exclude_the_first_step_and_evaluations(monkeypatch):
    from types import SimpleNamespace

    from hasten.methods.tradeoff import EvalPoints

    ticks = iter([(10.0, 10.0), (13.0, 12.0), (20.0, 15.0), (26.0, 19.0), (30.0, 20.0)])
    monkeypatch.setattr(EvalPoints, "_now", staticmethod(lambda: next(ticks)))
    points = EvalPoints([2, 4])
    state = SimpleNamespace(step=0, examples=0, metrics={}, evaluate_now=False)
    for step in (1, 2, 3, 4):
        state.step, state.metrics = step, {"eval/accuracy": step / 10}
        points.on_batch_end(state)  # step 1 starts the clock at (10, 10)
        if state.evaluate_now:
            points.on_before_evaluate(state)
            points.on_evaluate(state)
            state.evaluate_now = False
    # Step 2 ends at (13, 12): 3 s wall, 2 s CPU; its evaluation runs until (20, 15); step 4 ends at (26, 19).
    assert [(p["steps"], p["seconds"], p["cpu_seconds"]) for p in points.points] == [(2, 3.0, 2.0), (4, 9.0, 6.0)]
    restored = EvalPoints([2, 4])
    restored.load_state_dict(points.state_dict())
    assert restored.points == points.points and restored.spent == points.spent


def test_tradeoff_run_on_digits(tmp_path, capsys):
    import torch

    from hasten.methods.tradeoff_run import run_tradeoff

    threads = torch.get_num_threads()
    try:
        result = run_tradeoff("digits", ["steps=45", "cycles=2", "t_mult=2", "noise=off", "threads=1",
                                         "methods=label_smoothing;ema,swish", "clock=cpu", f"run_dir={tmp_path}"])
    finally:
        torch.set_num_threads(threads)
    metric = result["metric"]
    assert result["lengths"] == [15, 30] and set(result["curves"]) == {"baseline", "label_smoothing", "ema,swish"}
    assert [p["steps"] for p in result["curves"]["baseline"]] == [15, 45]
    assert [p["steps"] for p in result["separate"]] == [15, 45]
    # The first cycle is exactly a cosine run of its length: same computation, same number.
    assert result["curves"]["baseline"][0][metric] == result["separate"][0][metric]
    assert result["cost_steps"] == {"one_run": 45, "separate_runs": 60}
    assert (tmp_path / "report.html").stat().st_size > 10_000 and (tmp_path / "tradeoff.json").exists()
    assert "report:" in capsys.readouterr().out
