"""The shared test every registered method must pass, on the small tasks of toy_tasks.py, in hasten's own loop:

- it applies to a task of its domain (and refuses the others in one line, tested in test_registry.py);
- it leaves the model trainable: the test loss after 40 steps is below the untrained model's;
- it composes with every method it declares compatible (all compatible ones train together), and such a
  composition round-trips through a checkpoint: a run killed after its checkpoint and resumed ends bit-identical
  to an uninterrupted one (model, optimizer, the methods' states, metrics).
"""
import dataclasses
import itertools

import pytest
import torch

from hasten.config import apply_overrides
from hasten.errors import HastenError
from hasten.methods import METHODS, build_methods
from hasten.train import TrainConfig, evaluate, fit, load_checkpoint
from hasten.train.loop import CHECKPOINT, seed_everything

from .toy_tasks import TASKS

STEPS = 40
# Options that make a method act within a 40-step run on 8×8 images (its defaults suit longer runs).
OPTIONS = {"ema": "half_life=3", "selective_backprop": "start=0:end=1:interval=1",
           "progressive_resizing": "initial=0.75:multiple=2:delay=0.25:finetune=0.5"}
# Refusals that need the data, so they come when training starts rather than from applies_to.
REFUSED_AT_START = {("sortagrad", "toy-mlm"): "same length"}


def spec(name: str) -> str:
    return f"{name}:{OPTIONS[name]}" if name in OPTIONS else name


def applicable(task) -> list[str]:
    model = task.make_model()
    return [n for n, info in METHODS.items() if info.cls().applies_to(task, model) is None]


def config(task, methods: str, checkpoint_every: int = 0) -> TrainConfig:
    lr = 1e-2 if task.name == "toy-image" else 3e-3
    return dataclasses.replace(apply_overrides(TrainConfig(task=task.name), task.defaults), steps=STEPS,
                               batch_size=32, lr=lr, optimizer="adam", warmup=0, eval_every=0, noise="off",
                               checkpoint_every=checkpoint_every, progress=False, methods=methods, threads=1)


def untrained_loss(task, cfg) -> float:
    """The test loss of the model exactly as `fit` builds it (same seed, same module swaps)."""
    seed_everything(cfg.seed)
    model = task.make_model()
    for method in build_methods(cfg.methods, task, model):
        method.prepare_model(model)
    return evaluate(model, task, task.load(None)[1])["eval/loss"]


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # configs use threads=1: tiny models run faster without thread handoffs
    yield
    torch.set_num_threads(threads)


def test_every_method_applies_to_a_task_of_its_domain():
    by_task = {task.name: set(applicable(task)) for task in TASKS}
    for name, info in METHODS.items():
        tasks = {t for t, names in by_task.items() if name in names and (name, t) not in REFUSED_AT_START}
        assert tasks, f"{name} applies to none of the toy tasks"
        if info.domain == "vision":
            assert "toy-image" in tasks, name
        if info.domain == "text":
            assert tasks & {"toy-text", "toy-mlm"}, name


CASES = [(name, task) for task in TASKS for name in applicable(task)]


@pytest.mark.parametrize("name,task", CASES, ids=[f"{n}-{t.name}" for n, t in CASES])
def test_method_leaves_the_model_trainable(name, task, tmp_path):
    cfg = config(task, spec(name))
    if (name, task.name) in REFUSED_AT_START:
        with pytest.raises(HastenError, match=REFUSED_AT_START[name, task.name]):
            fit(task, cfg, run_dir=tmp_path)
        return
    before = untrained_loss(task, cfg)
    result = fit(task, cfg, run_dir=tmp_path)
    assert result.metrics["eval/loss"] < before - 0.03, (name, task.name, before, result.metrics)


def test_compatible_pairs_build_and_conflicting_ones_are_refused():
    for task in TASKS:
        model = task.make_model()
        for a, b in itertools.combinations(applicable(task), 2):
            if METHODS[a].compatible_with(METHODS[b]):
                assert len(build_methods(f"{a},{b}", task, model)) == 2 + (a != "mask_schedule" != b
                                                                            and hasattr(model, "mask_id"))
            else:
                with pytest.raises(HastenError, match="cannot be combined"):
                    build_methods(f"{a},{b}", task, model)


def greedy_group(names: list[str]) -> list[str]:
    """The methods of ``names`` taken in order, skipping any that conflicts with one already taken."""
    group = []
    for n in names:
        if all(METHODS[n].compatible_with(METHODS[g]) for g in group):
            group.append(n)
    return group


GROUPS = []
for _task in TASKS:
    _names = [n for n in applicable(_task) if (n, _task.name) not in REFUSED_AT_START]
    for _group in (greedy_group(_names), greedy_group(_names[::-1])):  # together, each conflicting method once
        if sorted(_group) not in [sorted(g) for t, g in GROUPS if t is _task]:
            GROUPS.append((_task, _group))


class Crash(Exception):
    pass


class CrashAfterCheckpoint:
    def __init__(self, step: int):
        self.step = step

    def on_checkpoint(self, state):
        if state.step == self.step:
            raise Crash


@pytest.mark.parametrize("task,group", GROUPS, ids=[f"{t.name}-{len(g)}" for t, g in GROUPS])
def test_composition_trains_and_resumes_bit_identical(task, group, tmp_path):
    cfg = config(task, ",".join(spec(n) for n in group), checkpoint_every=STEPS // 2)
    full = fit(task, cfg, run_dir=tmp_path / "full")
    assert full.metrics["eval/loss"] < untrained_loss(task, cfg), group  # everything at once learns slower
    with pytest.raises(Crash):
        fit(task, cfg, [CrashAfterCheckpoint(STEPS // 2)], run_dir=tmp_path / "resumed")
    resumed = fit(task, cfg, run_dir=tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / d / CHECKPOINT) for d in ("full", "resumed"))
    assert a["step"] == b["step"] == STEPS and resumed.metrics == full.metrics and resumed.loss == full.loss
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert str(a["optimizer"]["state"]) == str(b["optimizer"]["state"])
    assert str(a["callbacks"]) == str(b["callbacks"])
