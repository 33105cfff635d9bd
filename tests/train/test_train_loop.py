"""fit(): accumulation, non-finite steps, logging, checkpoints and exact resume on a tiny synthetic task."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from train_tiny_task import Crash, tiny_config, tiny_task, untimed_rows

from hasten.errors import HastenError
from hasten.train import EVENTS, Callback, fit, load_checkpoint
from hasten.train.logger import read_jsonl
from hasten.train.noise_callback import split_size


class GradCheck(Callback):
    """At each step, the accumulated .grad against one backward of the whole batch on a copy of the model."""

    def __init__(self):
        self.errors, self.sizes = [], []

    def on_before_optimizer_step(self, state):
        x, y = state.batch
        ref = copy.deepcopy(state.model)
        ref.zero_grad(set_to_none=True)
        state.task.loss(ref(x), y).backward()
        self.errors.append(max((p.grad - q.grad).abs().max().item()
                               for p, q in zip(state.model.parameters(), ref.parameters())))
        self.sizes.append(len(x))


@pytest.mark.parametrize("micro", [5, 1])
def test_accumulated_gradient_is_the_whole_batch_gradient(tmp_path, micro):
    check = GradCheck()
    fit(tiny_task(), tiny_config(steps=6, batch_size=20, micro_batch_size=micro), [check], run_dir=tmp_path)
    assert check.sizes == [20, 20, 20, 20, 16, 20]  # 96 examples: the epoch's last batch is truncated
    assert max(check.errors) < 1e-6


def test_micro_batch_size_rules(tmp_path):
    assert split_size(128, 0) == 128 and split_size(128, 16) == 16  # as configured (0 = the whole batch)
    assert split_size(128, 0, 4) == 32 and split_size(128, 16, 4) == 16  # a measured step: at least 4 parts
    assert split_size(13, 0, 4) == 4 and split_size(2, 0, 4) == 1  # a prime batch: 4+4+4+1, not 13 ones
    assert split_size(99999999999, 0, 4) == 25000000000  # no divisor search
    with pytest.raises(HastenError, match="batch_size=97 is larger than tiny's training set"):
        fit(tiny_task(), tiny_config(batch_size=97), run_dir=tmp_path)
    with pytest.raises(HastenError, match="batch_size=99999999999 is larger"):
        fit(tiny_task(), tiny_config(batch_size=99999999999), run_dir=tmp_path)
    for bad in (dict(batch_size=30, micro_batch_size=7), dict(batch_size=1, noise="micro"), dict(noise="sometimes"),
                dict(precision="16")):
        with pytest.raises(HastenError):
            fit(tiny_task(), tiny_config(**bad), run_dir=tmp_path)


def poisoned(nan_steps):
    """A task whose loss is NaN at the (0-based) steps in ``nan_steps``, and the callback that drives it."""
    flag = {"nan": False}
    task = tiny_task(loss=lambda out, y: F.cross_entropy(out, y) + (math.nan if flag["nan"] else 0.0))

    class Poison(Callback):
        def __init__(self):
            self.params = []

        def on_batch_start(self, state):
            flag["nan"] = state.step in nan_steps

        def on_batch_end(self, state):
            self.params.append([p.detach().clone() for p in state.model.parameters()])

    return task, Poison()


def test_nonfinite_steps_are_counted_and_skipped(tmp_path):
    task, poison = poisoned({3, 4})
    result = fit(task, tiny_config(steps=8), [poison], run_dir=tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 2, 2, 2, 2]
    assert rows[3]["train/loss"] is None and rows[5]["train/loss"] is not None
    after = poison.params
    assert all(torch.equal(a, b) for a, b in zip(after[2], after[4]))  # steps 3 and 4 left the weights alone
    assert not all(torch.equal(a, b) for a, b in zip(after[4], after[5]))
    assert result.steps == 8 and math.isfinite(result.loss)


def test_twenty_nonfinite_steps_in_a_row_stop_the_run(tmp_path):
    task, poison = poisoned(set(range(6, 100)))
    with pytest.raises(HastenError, match=r"not finite for 20 steps in a row at step 26: lower lr=0.1; .*kept in"):
        fit(task, tiny_config(steps=60), [poison], run_dir=tmp_path)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 27))
    ckpt = load_checkpoint(tmp_path / "checkpoint-latest.pt")
    assert ckpt["step"] == 4  # the last checkpoint before the streak; none is written inside it
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_jsonl_tensorboard_and_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = fit(tiny_task(), tiny_config(steps=12, keep_checkpoints=True), run_dir=tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["step"] for r in rows if "eval/loss" in r] == [4, 8, 12]
    assert rows[-1]["eval/accuracy"] == result.metrics["eval/accuracy"]
    assert rows[-1]["examples"] == result.examples == 12 * 16 and rows[-1]["epoch"] == 1
    assert json.loads((tmp_path / "config.json").read_text())["task"] == "tiny"
    kept = read_jsonl(tmp_path / "checkpoints.jsonl")
    assert [k["step"] for k in kept] == [4, 8, 12] and all((tmp_path / k["path"]).exists() for k in kept)
    assert kept[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 12)))  # LR of step 4 (index 3)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tb = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in tb] == [4, 8, 10, 12]  # every TB_EVERY-th (10th) step and every evaluated one
    assert [v for _, v in tb] == pytest.approx([rows[s - 1]["train/loss"] for s, _ in tb], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [4, 8, 12]


def final_state(run_dir):
    return load_checkpoint(run_dir / "checkpoint-latest.pt")["model"]


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(steps=14, micro_batch_size=4, eval_every=5)
    task = tiny_task(dropout=0.3)
    whole = fit(task, cfg, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(task, cfg, [Crash(at=11)], run_dir=tmp_path / "cut")
    assert [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")] == list(range(1, 11))
    resumed = fit(task, cfg, run_dir=tmp_path / "cut")  # resumes from step 8
    assert (resumed.metrics, resumed.loss, resumed.examples) == (whole.metrics, whole.loss, whole.examples)
    a, b = final_state(tmp_path / "whole"), final_state(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert untimed_rows(tmp_path / "cut") == untimed_rows(tmp_path / "whole")
    events = EventAccumulator(str(tmp_path / "cut" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 14]  # evaluated/10th steps, replays purged
    again = fit(task, cfg, run_dir=tmp_path / "cut")  # a finished run: nothing to do, same answer
    assert (again.metrics, again.steps) == (whole.metrics, whole.steps)


def test_changed_settings_need_a_new_run_dir(tmp_path):
    fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path)
    with pytest.raises(HastenError, match="lr=0.1, now 0.2.*new run_dir"):
        fit(tiny_task(), tiny_config(steps=4, lr=0.2), run_dir=tmp_path)
    fit(tiny_task(), tiny_config(steps=4, eval_every=2, progress=True), run_dir=tmp_path)  # harmless changes
    with pytest.raises(HastenError, match="resume=False never overwrites one: use a new run_dir"):
        fit(tiny_task(), tiny_config(steps=3, lr=0.2), run_dir=tmp_path, resume=False)  # refused, nothing deleted
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


class Recorder(Callback):
    def __init__(self):
        self.events = []


for _event in EVENTS:
    setattr(Recorder, f"on_{_event}", lambda self, state, e=_event: self.events.append(e))


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_batch_end(self, state):
        state.should_stop = state.step == self.step


def test_callbacks_see_events_in_order_and_can_stop(tmp_path):
    rec = Recorder()
    result = fit(tiny_task(), tiny_config(steps=10, micro_batch_size=8, eval_every=0, noise_every=100),
                 [rec, StopAt(2)], run_dir=tmp_path)  # no step measured: 2 micro-batches each
    step = ["batch_start", "batch_ready", "after_backward", "after_backward", "before_optimizer_step", "batch_end"]
    assert rec.events == ["fit_start", *step, *step, "before_evaluate", "evaluate", "checkpoint", "fit_end"]
    assert result.steps == 2 and "eval/loss" in result.metrics
    assert fit(tiny_task(), tiny_config(steps=10, micro_batch_size=8, eval_every=0, noise_every=100),
               run_dir=tmp_path).steps == 2


def test_evaluating_and_checkpointing_draw_nothing_from_the_training_rng(tmp_path):
    task = tiny_task(dropout=0.5)
    runs = [dict(eval_every=0, checkpoint_every=0), dict(eval_every=1, checkpoint_every=3)]
    results = [fit(task, tiny_config(steps=9, **kw), run_dir=tmp_path / str(i)) for i, kw in enumerate(runs)]
    assert results[0].metrics == results[1].metrics and results[0].loss == results[1].loss
    a, b = final_state(tmp_path / "0"), final_state(tmp_path / "1")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_examples_evaluates_a_fixed_subset(tmp_path):
    from hasten.train.loop import eval_subset

    task = tiny_task()
    test = task.load(None)[1]
    subset = eval_subset(test, 10)
    assert len(subset) == 10 and len(set(subset.indices)) == 10 and subset.indices == eval_subset(test, 10).indices
    assert eval_subset(test, 0) is test and eval_subset(test, len(test) + 5) is test
    seen = {}

    class Reference(Callback):
        def on_evaluate(self, state):  # the mean loss over the subset, one example at a time
            losses = [state.task.loss(state.model(x[None]), y[None]).item() for x, y in subset]
            seen[state.step] = (state.metrics["eval/loss"], sum(losses) / len(losses))

    fit(task, tiny_config(steps=4, eval_every=2, eval_examples=10), [Reference()], run_dir=tmp_path)
    assert len(seen) == 2 and all(got == pytest.approx(ref, rel=1e-5) for got, ref in seen.values())
    with pytest.raises(HastenError, match="eval_examples"):
        fit(task, tiny_config(steps=1, eval_examples=-1), run_dir=tmp_path / "bad")
