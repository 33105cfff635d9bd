"""The noise-scale callback inside fit(), against squared norms recomputed by brute force at every step."""
import copy
import math

import pytest
import torch
from train_tiny_task import tiny_config, tiny_task

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale
from hasten.train import Callback, NoiseScaleCallback, fit
from hasten.train.logger import read_jsonl
from hasten.train.noise_callback import horizon_from_config


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class BruteForce(Callback):
    """Feeds a reference NoiseScale with |G_small|² (mean over chunks of ``small`` examples, each gradient from its
    own backward on a copy of the model; only the first chunk with ``first``, as the micro source reads) and |G_big|²
    of the whole batch, at the parameters of each step."""

    def __init__(self, small: int, horizon, first: bool = False, every: int = 1):
        self.small, self.horizon, self.first, self.every, self.ref = small, horizon, first, every, None

    def on_fit_start(self, state):
        self.ref = NoiseScale(horizon=self.horizon, dataset_size=state.train_size)

    def on_before_optimizer_step(self, state):
        if state.step % self.every:
            return
        x, y = state.batch
        model = copy.deepcopy(state.model)

        def sq_norm(xs, ys):
            model.zero_grad(set_to_none=True)
            state.task.loss(model(xs), ys).backward()
            return sum((p.grad.double() ** 2).sum() for p in model.parameters()).item()

        small = [sq_norm(a, b) for a, b in zip(x.split(self.small), y.split(self.small))]
        small = small[:1] if self.first else small
        self.ref.update(sum(small) / len(small), self.small, sq_norm(x, y), len(x))


def close(estimate, reference, rel=1e-4):
    ref = reference.compute()
    for key in ("b_simple", "grad_sq", "trace_cov", "b_simple_se"):
        assert getattr(estimate, key) == pytest.approx(getattr(ref, key), rel=rel), key
    assert (estimate.n_steps, estimate.n_skipped) == (ref.n_steps, ref.n_skipped)


@pytest.mark.parametrize("source, micro", [("micro", 4), ("per_example", 0)])
def test_noise_scale_matches_brute_force(tmp_path, source, micro):
    # 96 examples in batches of 16: no truncated batch, so every step has equal micro-batches.
    cfg = tiny_config(steps=15, micro_batch_size=micro, noise=source, noise_horizon=-1.0)
    check = BruteForce(small=micro or 1, horizon=None, first=source == "micro")
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    close(result.noise, check.ref)
    assert result.noise.n_steps == 15 and math.isfinite(result.noise.b_simple)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows[-1]["noise/b_simple"] == pytest.approx(result.noise.b_simple)
    assert {"noise/b_simple_se", "noise/grad_sq", "noise/trace_cov", "noise/skipped"} <= rows[-1].keys()


@pytest.mark.parametrize("source, micro, small", [("micro", 4, "first"), ("micro", 4, "all"), ("per_example", 0, "first")])
def test_noise_every_and_small_keys_match_brute_force(tmp_path, source, micro, small):
    cfg = tiny_config(steps=15, micro_batch_size=micro, noise=source, noise_horizon=-1.0, noise_every=3,
                      noise_small=small)
    check = BruteForce(small=micro or 1, horizon=None, first=small == "first" and source == "micro", every=3)
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    close(result.noise, check.ref)
    assert result.noise.n_steps == 5  # steps 0, 3, 6, 9, 12


def test_noise_every_resumes_in_phase(tmp_path):
    class Crash(Callback):
        def on_batch_end(self, state):
            if state.step == 7:  # the last checkpoint is at step 4: 4 % 3 != 0, the phase must come back with it
                raise KeyboardInterrupt

    cfg = tiny_config(steps=14, micro_batch_size=4, noise_every=3, noise_horizon=-1.0)
    whole = fit(tiny_task(), cfg, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), cfg, [Crash()], run_dir=tmp_path / "cut")
    resumed = fit(tiny_task(), cfg, run_dir=tmp_path / "cut")
    assert resumed.noise == whole.noise and whole.noise.n_steps == 5


def test_bad_noise_every_or_small_is_one_clear_error(tmp_path):
    with pytest.raises(HastenError, match="noise_every=0"):
        fit(tiny_task(), tiny_config(noise_every=0), run_dir=tmp_path)
    with pytest.raises(HastenError, match="noise_small='some'"):
        fit(tiny_task(), tiny_config(noise_small="some"), run_dir=tmp_path)


def test_ema_horizon_and_default_micro(tmp_path):
    cfg = tiny_config(steps=10, batch_size=16, noise="micro", noise_horizon=0.0)  # auto: a fifth of the examples
    assert horizon_from_config(cfg) == 10 * 16 / 5
    check = BruteForce(small=4, horizon=horizon_from_config(cfg), first=True)  # micro_batch_size=0 -> 16/4
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    assert result.micro_batch_size == 4
    close(result.noise, check.ref)


def test_nonfinite_steps_are_skipped_by_the_meter(tmp_path):
    flag = {"nan": False}

    class Poison(Callback):
        def on_batch_start(self, state):
            flag["nan"] = state.step in (2, 5)

    task = tiny_task(loss=lambda out, y: torch.nn.functional.cross_entropy(out, y) * (math.nan if flag["nan"] else 1))
    result = fit(task, tiny_config(steps=8, micro_batch_size=4, noise="micro"), [Poison()], run_dir=tmp_path)
    assert (result.noise.n_steps, result.noise.n_skipped) == (6, 2)
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["noise/skipped"] == 2


def test_precondition_needs_adam(tmp_path):
    with pytest.raises(HastenError, match="optimizer=adam"):
        fit(tiny_task(), tiny_config(steps=2, micro_batch_size=4, noise="micro", precondition=True), run_dir=tmp_path)
    result = fit(tiny_task(), tiny_config(steps=6, micro_batch_size=4, noise="micro", precondition=True,
                                          optimizer="adam", lr=0.01), run_dir=tmp_path / "adam")
    assert result.noise.n_steps == 5 and math.isfinite(result.noise.grad_sq)  # step 1: Adam has no v̂ yet


def test_a_callback_passed_in_replaces_the_default_one(tmp_path):
    mine = NoiseScaleCallback("per_example", horizon=None)
    result = fit(tiny_task(), tiny_config(steps=3, noise="micro", micro_batch_size=4), [mine], run_dir=tmp_path)
    assert result.noise == mine.estimate() and result.noise.n_steps == 3


def test_sam_with_the_micro_source_measures_every_step(tmp_path):
    """SAM's second backward (after the measurement) must not be taken for the next step's first micro-batch."""
    cfg = tiny_config(steps=6, micro_batch_size=4, noise="micro", noise_horizon=-1.0, methods="sam")
    check = BruteForce(small=4, horizon=None, first=True)
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    assert (result.noise.n_steps, result.noise.n_skipped) == (6, 0)
    close(result.noise, check.ref)


def test_per_example_source_uses_the_loop_loss_with_mixup(tmp_path):
    from hasten.tasks.models import cross_entropy

    cfg = tiny_config(steps=4, noise="per_example", noise_horizon=-1.0, methods="mixup")
    result = fit(tiny_task(loss=cross_entropy), cfg, run_dir=tmp_path)  # mixed (soft) targets need the loop's loss
    assert result.noise.n_steps == 4 and math.isfinite(result.noise.grad_sq)
