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
from hasten.train.noise_callback import horizon_from_config, split_size


class BruteForce(Callback):
    """Feeds a reference NoiseScale with |G_small|² (mean over chunks of ``small`` examples, or as the micro source
    splits a measured step with ``parts``, each gradient from its own backward on a copy of the model; only the first
    chunk with ``first``, as the micro source reads; B_small the harmonic mean of the sizes read) and |G_big|² of
    the whole batch, at the parameters of the steps measured (one in ``every``, the first being step ``every``)."""

    def __init__(self, small: int, horizon, first: bool = False, every: int = 1, parts: int = 0):
        self.small, self.horizon, self.first, self.every, self.ref = small, horizon, first, every, None
        self.parts = parts

    def on_fit_start(self, state):
        self.ref = NoiseScale(horizon=self.horizon, dataset_size=state.train_size)

    def on_before_optimizer_step(self, state):
        if (state.step + 1) % self.every or state.skewed_batch:  # the meter leaves skewed batches out
            return
        x, y = state.batch[:2]
        model = copy.deepcopy(state.model)

        def sq_norm(xs, ys):
            model.zero_grad(set_to_none=True)
            state.loss_fn(model(xs), ys).backward()  # the loss the step trains with (methods may change it)
            return sum((p.grad.double() ** 2).sum() for p in model.parameters()).item()

        size = split_size(len(x), self.small, self.parts)
        chunks = list(zip(x.split(size), y.split(size)))[: 1 if self.first else None]
        small = [sq_norm(a, b) for a, b in chunks]
        b_small = len(chunks) / sum(1 / len(a) for a, _ in chunks)
        self.ref.update(sum(small) / len(small), b_small, sq_norm(x, y), len(x))


def close(estimate, reference, rel=1e-4):
    ref = reference.compute()
    for key in ("b_simple", "grad_sq", "trace_cov", "b_simple_se"):
        assert getattr(estimate, key) == pytest.approx(getattr(ref, key), rel=rel, nan_ok=True), key
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
    assert result.noise.n_steps == 5  # steps 2, 5, 8, 11, 14 (0-based)


def test_noise_every_resumes_in_phase(tmp_path):
    class Crash(Callback):
        def on_batch_end(self, state):
            if state.step == 7:  # the last checkpoint is after 4 steps: the phase of 3 must come back with it
                raise KeyboardInterrupt

    cfg = tiny_config(steps=14, micro_batch_size=4, noise_every=3, noise_horizon=-1.0)
    whole = fit(tiny_task(), cfg, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), cfg, [Crash()], run_dir=tmp_path / "cut")
    resumed = fit(tiny_task(), cfg, run_dir=tmp_path / "cut")
    assert resumed.noise == whole.noise and whole.noise.n_steps == 4  # steps 2, 5, 8, 11 (0-based)


def test_bad_noise_every_or_small_is_one_clear_error(tmp_path):
    with pytest.raises(HastenError, match="noise_every=0"):
        fit(tiny_task(), tiny_config(noise_every=0), run_dir=tmp_path)
    with pytest.raises(HastenError, match="noise_small='some'"):
        fit(tiny_task(), tiny_config(noise_small="some"), run_dir=tmp_path)


def test_ema_horizon_and_default_micro(tmp_path):
    cfg = tiny_config(steps=10, batch_size=16, noise="micro", noise_horizon=0.0)  # auto: a fifth of the examples
    assert horizon_from_config(cfg) == 10 * 16 / 5
    check = BruteForce(small=0, horizon=horizon_from_config(cfg), first=True, parts=4)  # measured steps: 16/4
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    assert result.micro_batch_size == 0  # as configured: only the measured steps are split
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


class CountBackwards(Callback):
    """Backward passes through the model per step, counted by a tensor hook on the first layer's weight."""

    def __init__(self):
        self.per_step, self._n = [], 0

    def on_fit_start(self, state):
        def count(grad):
            self._n += 1

        next(state.model.parameters()).register_hook(count)

    def on_batch_end(self, state):
        self.per_step.append(self._n)
        self._n = 0


def test_only_measured_steps_are_split(tmp_path):
    counts = {}
    for noise in ("off", "micro"):
        count = CountBackwards()
        fit(tiny_task(), tiny_config(steps=12, noise=noise, noise_every=4), [count], run_dir=tmp_path / noise)
        counts[noise] = count.per_step
    assert counts["off"] == [1] * 12
    assert counts["micro"] == [4 if (step + 1) % 4 == 0 else 1 for step in range(12)]  # steps 3, 7, 11 (0-based)


def final_weights(run_dir):
    from hasten.train import load_checkpoint

    return load_checkpoint(run_dir / "checkpoint-latest.pt")["model"]


@pytest.mark.parametrize("noise, every", [("micro", 100), ("hooks", 1), ("auto", 1)])
def test_weights_equal_noise_off_when_the_meter_only_reads(tmp_path, noise, every):
    """micro with no step measured, and hooks measuring every step, train exactly as noise=off."""
    task = tiny_task(dropout=0.2)
    off = fit(task, tiny_config(steps=12, noise="off"), run_dir=tmp_path / "off")
    run = fit(task, tiny_config(steps=12, noise=noise, noise_every=every), run_dir=tmp_path / noise)
    assert run.noise.n_steps == (0 if every > 12 else 12) and run.noise_source == noise.replace("auto", "hooks")
    a, b = final_weights(tmp_path / "off"), final_weights(tmp_path / noise)
    assert all(torch.equal(a[k], b[k]) for k in a) and off.loss == run.loss


@pytest.mark.parametrize("small", ["first", "all"])
def test_a_prime_batch_is_measured_in_unequal_micro_batches(tmp_path, small):
    # 13 = 4 + 4 + 4 + 1; the epoch's last batch of 96 = 7·13 + 5 is 2 + 2 + 1: every step is measured.
    cfg = tiny_config(steps=10, batch_size=13, noise="micro", noise_horizon=-1.0, noise_small=small)
    check = BruteForce(small=0, horizon=None, first=small == "first", parts=4)
    result = fit(tiny_task(), cfg, [check], run_dir=tmp_path)
    close(result.noise, check.ref)
    assert result.noise.n_steps == 10


def test_noise_source_auto_picks_hooks_or_micro(tmp_path):
    import json

    from torch import nn

    result = fit(tiny_task(), tiny_config(steps=3, noise="auto"), run_dir=tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert result.noise_source == config["noise_source"] == "hooks" and result.noise.n_steps == 3
    task = tiny_task()
    task.models["mlp"] = lambda: nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3))
    result = fit(task, tiny_config(steps=3, noise="auto"), run_dir=tmp_path / "bn")
    config = json.loads((tmp_path / "bn" / "config.json").read_text())
    assert result.noise_source == config["noise_source"] == "micro" and "BatchNorm" in config["noise_source_why"]
    with pytest.raises(HastenError, match="BatchNorm"):
        fit(task, tiny_config(steps=3, noise="hooks"), run_dir=tmp_path / "forced")

    class Broadcast(nn.Module):  # a bias row looked up without the batch dimension: only a forward shows it
        def __init__(self):
            super().__init__()
            self.lin, self.row = nn.Linear(6, 3), nn.Embedding(1, 3)

        def forward(self, x):
            return self.lin(x) + self.row(torch.zeros(1, dtype=torch.long, device=x.device))

    task.models["mlp"] = Broadcast
    result = fit(task, tiny_config(steps=3, noise="auto"), run_dir=tmp_path / "broadcast")
    config = json.loads((tmp_path / "broadcast" / "config.json").read_text())
    assert result.noise_source == "micro" and "per-example hooks do not apply" in config["noise_source_why"]


class FakeClock(Callback):
    """Stands in for the noise callback's clock: a plain step takes 1 s, a measured one 1 + ``cost`` s."""

    def __init__(self, meter: NoiseScaleCallback, cost: float):
        self.meter, self.cost, self.now = meter, cost, 0.0

    def perf_counter(self):
        return self.now

    def on_batch_end(self, state):  # fires before the meter's batch_end: the loop puts the meter last
        self.now += 1.0 + (self.cost if self.meter.measuring else 0.0)


def budget_run(tmp_path, monkeypatch, cost=0.5, budget=0.1, callbacks=(), steps=60, name="run"):
    import hasten.train.noise_callback as module

    meter = NoiseScaleCallback("micro", None, budget=budget)
    clock = FakeClock(meter, cost)
    monkeypatch.setattr(module, "time", clock)
    cfg = tiny_config(steps=steps, noise_budget=budget, checkpoint_every=10)
    result = fit(tiny_task(), cfg, [clock, meter, *callbacks], run_dir=tmp_path / name)
    return result, read_jsonl(tmp_path / name / "metrics.jsonl")


def test_noise_budget_measures_one_step_in_cost_over_budget(tmp_path, monkeypatch):
    result, rows = budget_run(tmp_path, monkeypatch, cost=0.5, budget=0.1)
    every = [r["noise/every"] for r in rows]
    assert every[0] == 4 and every[-1] == 5  # starts at 4; a measured step costs 0.5 of a plain one: 0.5/0.1 = 5
    measured = [r["step"] for r in rows if r["noise/measured"]]
    assert [b - a for a, b in zip(measured[-4:], measured[-3:])] == [5, 5, 5]
    assert result.noise.n_steps == len(measured)
    assert rows[-1]["noise/cost"] == pytest.approx(0.5)
    overhead = 0.5 * len(measured[-6:]) / 30  # over the last 30 steps
    assert overhead <= 0.1 + 1e-9


def test_noise_budget_resumes_with_its_n_and_phase(tmp_path, monkeypatch):
    class Crash(Callback):
        def on_batch_end(self, state):
            if state.step == 37:  # the last checkpoint is after 30 steps
                raise KeyboardInterrupt

    _, whole = budget_run(tmp_path, monkeypatch, name="whole")
    with pytest.raises(KeyboardInterrupt):
        budget_run(tmp_path, monkeypatch, callbacks=[Crash()], name="cut")
    _, resumed = budget_run(tmp_path, monkeypatch, name="cut")
    keys = ("step", "noise/every", "noise/measured", "noise/cost", "noise/b_simple")
    assert [[r.get(k) for k in keys] for r in resumed] == [[r.get(k) for k in keys] for r in whole]


def test_bad_noise_budget_is_one_clear_error(tmp_path):
    with pytest.raises(HastenError, match="noise_budget=1.5"):
        fit(tiny_task(), tiny_config(noise_budget=1.5), run_dir=tmp_path)


def test_auto_splits_convolutions_and_sequences_and_hooks_mlps():
    """Catches auto picking the per-example hooks where they cost more than a split (measured 1.66x vs 0.97x on the
    fashion CNN, 1.43x vs 1.02x on the transformer) or the split where the hooks are cheaper (an MLP)."""
    from torch import nn

    from hasten.train.noise_callback import resolve_source

    def pick(model, x, y, loss=nn.functional.cross_entropy):
        return resolve_source("auto", model, 1, False, lambda: (x, y), loss)[0]

    mlp = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    assert pick(mlp, torch.randn(2, 6), torch.tensor([0, 1])) == "hooks"
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    assert pick(cnn, torch.randn(2, 1, 6, 6), torch.tensor([0, 1])) == "micro"
    seq = nn.Sequential(nn.Linear(6, 3), nn.Flatten())  # a Linear over 5 positions per example
    assert pick(seq, torch.randn(2, 5, 6), torch.randn(2, 15), nn.functional.mse_loss) == "micro"
    assert pick(seq, torch.randn(2, 1, 6), torch.randn(2, 3), nn.functional.mse_loss) == "hooks"  # one position
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    assert pick(emb, torch.randint(10, (2, 3)), torch.tensor([0, 1])) == "micro"
    assert resolve_source("auto", cnn, 1)[0] == "micro" and resolve_source("auto", mlp, 1)[0] == "hooks"  # by type
