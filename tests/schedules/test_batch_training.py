"""Batch schedules in the training loop: LR composition, the meter across batch changes, SIGKILL resume after a
change, exactly-once sharded sampling, a real 2-process torchrun (gloo) run, and the CLI keys."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "train"))

from train_tiny_task import tiny_config, tiny_task  # noqa: E402

from hasten.cli.main import main as cli  # noqa: E402
from hasten.schedules import sgd_noise  # noqa: E402
from hasten.train import fit, load_checkpoint  # noqa: E402
from hasten.train.logger import read_jsonl  # noqa: E402
from hasten.train.sampler import EpochSampler, epoch_permutation, shard  # noqa: E402

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(tmp_path, **kw):
    result = fit(tiny_task(), tiny_config(**kw), run_dir=tmp_path)
    return result, read_jsonl(tmp_path / "metrics.jsonl")


def test_increase_keeps_the_step_decay_noise_and_the_epochs(tmp_path):
    """g = lr(N/B − 1)/(1 − m) of every step equals the step-decay run's, lr·0.1^(milestones passed)·(N/8 − 1)/(1 − m),
    at the same progress (exact rule; N = 96 examples, so B ≪ N does not hold and ε/B would be far off)."""
    steps, base, n = 80, 8, 96
    result, rows = run(tmp_path, steps=steps, batch_size=base, micro_batch_size=4, schedule="step", batch="increase")
    for r in rows:
        decay = 0.1 ** sum(r["batch/progress"] >= m * steps for m in (0.5, 0.75))
        g_decay = sgd_noise(0.1 * decay, base, n)
        assert sgd_noise(r["lr"], r["batch/planned"], n) == pytest.approx(g_decay, rel=1e-9)
    planned = sorted({r["batch/planned"] for r in rows})
    assert planned[0] == base and 44 in planned and max(planned) == 88  # 96/2.1 = 45.7 and 96/1.11 = 86.5, ×4
    assert result.examples == steps * base  # the same examples as the step-decay run (the last step trimmed)
    # The same examples in fewer optimizer steps: 40 at 8, then 160 examples at 44 and 160 at 88 (plus the steps cut
    # short at the ends of epochs). ε/B would have used batches up to 96, with no noise left.
    assert result.steps < 0.65 * steps
    rows_approx = run(tmp_path / "approx", steps=steps, batch_size=base, micro_batch_size=4, schedule="step",
                      batch="increase", batch_increase_rule="approx")[1]
    assert max(r["batch/planned"] for r in rows_approx) == 96  # B = 8/0.01 capped at the training set: no noise


def test_adaptive_follows_the_meter_with_adascale_lr(tmp_path):
    result, rows = run(tmp_path, steps=40, batch_size=8, micro_batch_size=4, schedule="constant", batch="adaptive",
                       batch_max=64, batch_scale=2.0, noise_horizon=200.0)
    planned = [r["batch/planned"] for r in rows]
    assert all(8 <= b <= 64 and b % 4 == 0 for b in planned) and len(set(planned)) > 1
    last = math.nan
    for prev, r in zip(rows, rows[1:]):
        b = prev["noise/b_simple"]  # None in the JSON while the estimate is still nan
        last = b if b is not None and math.isfinite(b) and b > 0 else last
        gain = (1 + last / 8) / (1 + last / r["batch/planned"])  # AdaScale, Johnson et al. 2020
        assert r["lr"] == pytest.approx(0.1 * gain, rel=1e-9)


def per_example_b_simple(task, model) -> float:
    """tr(Σ)/|G|² over the whole training set by brute force (Bessel-corrected covariance)."""
    x, y = task.load(None)[0].tensors
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        task.loss(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    g = torch.stack(grads)
    mean = g.mean(0)
    return ((g - mean).square().sum(1).sum() / (len(g) - 1) / mean.square().sum()).item()


def test_meter_is_unbiased_across_batch_changes(tmp_path):
    """LR 0 keeps the parameters fixed: the running-mean estimate over steps of 8, 24 and 48 examples matches the
    brute-force B_simple of the whole training set."""
    task = tiny_task()
    stages = ("0.2:8:0", "0.5:24:0", "1:48:0")
    result, rows = run(tmp_path, steps=300, batch_size=8, micro_batch_size=4, noise_horizon=-1.0, batch="stages",
                       batch_stages=stages, eval_every=0, checkpoint_every=0)
    assert {r["batch_size"] for r in rows} >= {8, 24, 48} and result.noise.n_skipped == 0
    torch.manual_seed(0)
    expected = per_example_b_simple(task, task.make_model())
    assert result.noise.b_simple == pytest.approx(expected, rel=0.15)


def start(run_dir: Path, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(HERE / "batch_run_script.py"), str(run_dir), *flags], env=ENV,
                            stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_after_a_batch_change_then_resume_is_identical(tmp_path):
    killed = start(tmp_path / "killed", "--slow")
    whole = start(tmp_path / "whole")
    checkpoint = tmp_path / "killed" / "checkpoint-latest.pt"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    ckpt = load_checkpoint(checkpoint)
    assert ckpt["batch_size"] != 8  # the checkpoint comes after the first batch change
    resumed = start(tmp_path / "killed")
    for proc in (whole, resumed):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    a, b = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("whole", "killed"))
    assert a == b and ckpt["step"] < a["steps"]


def sharded_draw(n, seed, world, sizes, state=None):
    """Each rank runs its own sampler (as under torchrun) and keeps its shard of every global batch."""
    samplers = [EpochSampler(n, seed) for _ in range(world)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(dict(state))
    steps = []
    for b in sizes:
        parts = [shard(s.next_batch(b), r, world) for r, s in enumerate(samplers)]
        steps.append((samplers[0].epoch, [p.tolist() for p in parts]))
    return steps, samplers[0].state_dict()


@settings(max_examples=50, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 2**32), world=st.integers(1, 3),
       sizes=st.lists(st.integers(1, 30), min_size=1, max_size=30), cut=st.integers(0, 30))
def test_sharded_sampling_is_exactly_once_with_batch_changes_and_resume(n, seed, world, sizes, cut):
    steps, _ = sharded_draw(n, seed, world, sizes)
    by_epoch: dict[int, list[int]] = {}
    for epoch, parts in steps:
        lengths = [len(p) for p in parts]
        assert max(lengths) - min(lengths) <= 1  # balanced shards
        for p in parts:
            by_epoch.setdefault(epoch, []).extend(p)
    for epoch, seen in by_epoch.items():
        assert len(seen) == len(set(seen))  # no example twice in an epoch, across ranks
        if epoch < max(by_epoch):
            assert sorted(seen) == list(range(n))
        assert set(seen) <= set(epoch_permutation(n, seed, epoch).tolist())
    cut = cut % len(sizes)
    _, state = sharded_draw(n, seed, world, sizes[:cut])
    assert sharded_draw(n, seed, world, sizes[cut:], state)[0] == steps[cut:]


@pytest.mark.slow
def test_torchrun_two_processes_with_batch_changes(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(HERE / "ddp_batch_script.py"), str(tmp_path)], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert len(set(r0["batches"])) >= 3  # the global batch changed twice
    for epoch in {e for e, _ in r0["seen"]}:
        seen = [i for r in (r0, r1) for e, idx in r["seen"] if e == epoch for i in idx]
        assert len(seen) == len(set(seen))
        if epoch < max(e for e, _ in r0["seen"]):
            assert sorted(seen) == list(range(40))
    for r in (r0, r1):  # DDP = single-process on the global batch; the DDP meter = the reference meter
        assert r["params_match"] and r["n_steps"] == len(r["batches"])
        assert r["b_simple"] == pytest.approx(r["ref_b_simple"], rel=1e-4)
    assert r0["b_simple"] == r1["b_simple"]


def test_cli_keys_and_one_line_errors(tmp_path, capsys):
    common = ["steps=30", "eval_every=0", "checkpoint_every=0", "progress=false", "threads=1"]
    assert cli(["train", "digits", "batch=increase", "schedule=step", f"run_dir={tmp_path}", *common]) == 0
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    # LR ÷10 at the first milestone → the batch with the same g: 1437/(1 + 0.1·(1437/64 − 1)) = 456.9 (not 640)
    assert rows[0]["batch/planned"] == 64 and rows[15]["batch/planned"] == 457
    assert 30 * 64 <= sum(r["batch_size"] for r in rows) < 30 * 64 + 16 and len(rows) < 20  # 16: micro-batch
    assert cli(["train", "digits", "batch=increase", "schedule=step", "batch_increase_rule=approx",
                f"run_dir={tmp_path / 'approx'}", *common]) == 0
    assert read_jsonl(tmp_path / "approx" / "metrics.jsonl")[15]["batch/planned"] == 640  # ε/B: ×10
    for i, (args, words) in enumerate([
        (["batch=sometimes"], "fixed, increase, adaptive, stages"),
        (["batch=adaptive", "noise=off"], "follows the noise scale"),
        (["batch=stages"], "batch_stages"),
        (["batch=stages", "batch_stages=0.5:x"], "until:batch"),
        (["batch=stages", "batch_stages=0.6:64,0.3:128"], "strictly increasing"),
        (["batch=increase", "schedule=constant"], "schedule=step"),
        (["batch=increase", "batch_max=32"], "smaller than base_batch"),
        (["batch=increase", "schedule=step", "batch_increase_rule=linear"], "choose exact"),
        (["batch=adaptive", "batch_max=100000"], "larger than the training set"),
        (["batch=adaptive", "batch_min=128", "batch_max=96"], "smaller than min_batch"),
        (["batch=stages", "batch_stages=1:0"], "positive integer"),
    ]):
        capsys.readouterr()
        assert cli(["train", "digits", f"run_dir={tmp_path / f'bad{i}'}", *common, *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_unknown_increase_rule_is_refused_before_any_work(tmp_path):
    """Catches a batch_increase_rule accepted whenever batch=fixed (it was: only batch=increase read it)."""
    from hasten.errors import HastenError
    from hasten.train import fit

    with pytest.raises(HastenError, match="batch_increase_rule='foo': choose exact or approx"):
        fit(tiny_task(), tiny_config(steps=2, batch_increase_rule="foo"), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
