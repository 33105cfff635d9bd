"""The Lightning adapters against brute force: B_simple on a teacher problem whose per-example gradients are all
enumerated, resume from a checkpoint, batch schedules, AMP loss scales, and the refusals."""
from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from hasten.errors import HastenError  # noqa: E402
from hasten.integrations.lightning import BatchSizeSchedule, NoiseScaleMonitor  # noqa: E402
from hasten.schedules import adaptive, increase_batch  # noqa: E402

N, D, H = 2048, 8, 16  # examples, inputs, hidden units of the teacher/student MLP
ROOT = Path(__file__).resolve().parents[2]

logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread (the machine's cores are shared; two threads contend and run 10× slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 1))


@functools.lru_cache(maxsize=None)
def teacher(n: int = N):
    """(X, y, student state): y from a random teacher MLP plus noise; the student is the teacher perturbed."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = mlp()
    X = torch.randn(n, D, generator=g)
    with torch.no_grad():
        y = net(X).squeeze(-1) + 0.5 * torch.randn(n, generator=g)
        for p in net.parameters():
            p.add_(0.15 * torch.randn(p.shape, generator=g))
    return X, y, {k: v.clone() for k, v in net.state_dict().items()}


def student(n: int = N) -> nn.Module:
    net = mlp()
    net.load_state_dict(teacher(n)[2])
    return net


@functools.lru_cache(maxsize=None)
def brute_force(n: int = N) -> tuple[float, float, float]:
    """(B_simple, |G|², tr Σ) over the whole population, from every example's gradient (torch.func)."""
    X, y, _ = teacher(n)
    net = student(n)
    params = {k: v.detach() for k, v in net.named_parameters()}

    def loss(p, x, t):
        return ((functional_call(net, p, (x[None],)).squeeze(-1) - t[None]) ** 2).mean()

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, X, y)
    flat = torch.cat([g.reshape(n, -1) for g in grads.values()], 1).double()
    mean = flat.mean(0)
    trace_cov = ((flat - mean) ** 2).sum().item() / (n - 1)
    grad_sq = mean.square().sum().item()
    return trace_cov / grad_sq, grad_sq, trace_cov


class Regression(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float = 0.0, momentum: float = 0.0, optimizer=torch.optim.SGD):
        super().__init__()
        self.net, self.lr, self.momentum, self.optimizer = net, lr, momentum, optimizer

    def training_step(self, batch, batch_idx):
        x, y = batch
        return ((self.net(x).squeeze(-1) - y) ** 2).mean()

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=self.lr, momentum=self.momentum)


def fit(callbacks, *, k: int = 4, batch: int = 64, steps: int = -1, epochs: int = -1, module=None, n: int = N,
        seed: int = 0, ckpt_path=None, root=None, checkpoint=None, **trainer_args) -> pl.Trainer:
    X, y, _ = teacher(n)
    torch.manual_seed(seed)
    loader = DataLoader(TensorDataset(X, y), batch_size=batch, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    trainer_args.setdefault("logger", False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, max_epochs=epochs, accumulate_grad_batches=k,
                         callbacks=[*callbacks, *([checkpoint] if checkpoint else [])],
                         enable_checkpointing=checkpoint is not None, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root, **trainer_args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module if module is not None else Regression(student(n)), loader, ckpt_path=ckpt_path)
    return trainer


def assert_close(est, tol_b: float, tol_parts: float) -> None:
    b, grad_sq, trace_cov = brute_force()
    assert est.b_simple == pytest.approx(b, rel=tol_b)
    assert est.grad_sq == pytest.approx(grad_sq, rel=tol_parts)
    assert est.trace_cov == pytest.approx(trace_cov, rel=tol_parts)


@functools.lru_cache(maxsize=None)
def micro_run():
    """accumulate 4 × batch 64 at LR 0 with clipping on every step: 96 optimizer steps (12 epochs)."""
    monitor = NoiseScaleMonitor(small="all")
    trainer = fit([monitor], steps=96, gradient_clip_val=1e-3)
    return monitor, {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_micro_batches_match_brute_force_with_clipping():
    # B_simple ≈ 20 here and |G| ≈ 1.1, far above the clip value: the meter reads the gradient before clipping.
    # Simulated with this estimator, 96 steps land within ~2% (1 sd) of the truth; a wrong divisor shifts |G|² and
    # tr Σ by k².
    monitor, metrics = micro_run()
    est = monitor.estimate
    assert monitor.source_used == "micro" and est.n_steps == 96 and est.n_skipped == 0
    assert_close(est, 0.10, 0.10)
    assert metrics["noise/b_simple"] == pytest.approx(est.b_simple, rel=1e-6)
    assert metrics["noise/b_simple_lo"] == pytest.approx(est.interval[0], rel=1e-6)
    assert metrics["noise/b_simple_hi"] == pytest.approx(est.interval[1], rel=1e-6)
    assert metrics["noise/grad_sq"] == pytest.approx(est.grad_sq, rel=1e-6)
    assert metrics["noise/trace_cov"] == pytest.approx(est.trace_cov, rel=1e-6)


class MemoryLogger(pl.loggers.Logger):
    name, version = "memory", 0

    def __init__(self):
        super().__init__()
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_metrics_reach_the_logger_on_its_steps():
    logger = MemoryLogger()
    fit([NoiseScaleMonitor(), BatchSizeSchedule(increase_batch(256, (1024,), 2, rule="approx"))], steps=6,
        logger=logger, log_every_n_steps=2)
    noise = [step for step, row in logger.rows if "noise/b_simple" in row and "noise/trace_cov" in row]
    batch = [(step, row["batch/size"]) for step, row in logger.rows if "batch/size" in row]
    # Steps 2, 4 and 6 (the logger counts from 0), then once more as the (short) epoch ends.
    assert noise == [1, 3, 5, 5] and batch == [(1, 256.0), (3, 256.0), (5, 512.0), (5, 512.0)]


def test_per_example_source_matches_brute_force():
    # B_small = 1: tr Σ from every example of the step; 48 steps (6 epochs) of 4 × 64 land within ~0.5% (simulated).
    monitor = NoiseScaleMonitor(source="per_example")
    fit([monitor], steps=48)
    assert monitor.source_used == "per_example" and monitor.estimate.n_steps == 48
    assert_close(monitor.estimate, 0.05, 0.05)


def test_auto_picks_per_example_without_accumulation():
    monitor = NoiseScaleMonitor()
    fit([monitor], k=1, steps=4)
    assert monitor.source_used == "per_example" and monitor.estimate.n_steps == 4


@pytest.mark.parametrize("n, measured_per_epoch", [(1920, 8), (1936, 7)])
def test_short_last_step_of_an_epoch(n, measured_per_epoch):
    # 1920 = 30 batches of 64: the epoch's last step has 2 micro-batches, each loss still divided by 4 (measured,
    # with B_big = 128; a wrong divisor would put that step's |G|² and tr Σ 4× off). 1936: its last step has
    # micro-batches of 64, 64 and 16, whose .grad is not the batch mean: skipped.
    monitor = NoiseScaleMonitor(small="all")
    fit([monitor], n=n, epochs=4)
    assert monitor.estimate.n_steps == 4 * measured_per_epoch
    if n == 1920:
        b, grad_sq, trace_cov = brute_force(n)
        est = monitor.estimate
        assert est.grad_sq == pytest.approx(grad_sq, rel=0.05) and est.trace_cov == pytest.approx(trace_cov, rel=0.15)


def test_interrupted_fit_resumes_the_same_estimate_and_schedule(tmp_path):
    # LR > 0 (the parameters move), shuffle off so the data order does not depend on the RNG; the schedule doubles
    # the batch (accumulation 2 → 4) after step 6, mid-epoch; the checkpoint falls at the end of epoch 2.
    X, y, _ = teacher(512)

    def run(epochs, ckpt_path=None, save=False):
        monitor = NoiseScaleMonitor(small="all")
        schedule = BatchSizeSchedule(increase_batch(64, milestones=(6 * 64,), factor=2, rule="approx"))
        module = Regression(student(512), lr=0.02, momentum=0.9)
        checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True) if save else None
        torch.manual_seed(0)
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=2,
                             callbacks=[monitor, schedule, *([checkpoint] if checkpoint else [])], logger=False,
                             enable_checkpointing=save, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, DataLoader(TensorDataset(X, y), batch_size=32), ckpt_path=ckpt_path)
        return monitor, schedule, module

    whole = run(4)
    run(2, save=True)
    resumed = run(4, ckpt_path=tmp_path / "last.ckpt")
    assert resumed[0].source_used == whole[0].source_used == "micro"
    assert resumed[0].estimate.n_steps == whole[0].estimate.n_steps > 0
    assert resumed[0].estimate.as_dict() == pytest.approx(whole[0].estimate.as_dict(), rel=1e-12, nan_ok=True)
    assert resumed[1].history == whole[1].history and [h["step"] for h in whole[1].history] == [0, 6]
    assert torch.equal(resumed[2].net[0].weight, whole[2].net[0].weight)


class RecordingSGD(torch.optim.SGD):
    """SGD that records each group's LR as its step runs (its super().step() nests the step hooks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


class ScheduledRegression(Regression):
    def configure_optimizers(self):
        optimizer = RecordingSGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=3, gamma=0.5), "interval": "step"}}


def test_increase_batch_changes_accumulation_at_the_planned_steps_and_scales_the_lr():
    # Batch 32 per dataloader batch, 16 batches an epoch. Milestones at 4·32 and 4·32 + 3·64 examples: the batch
    # doubles after step 4 (accumulation 1 → 2; index 4 is even), then hits max_batch=64 after step 7 and the LR is
    # halved instead. The LR the optimizer uses is StepLR's value × the plan's multiplier.
    schedule = BatchSizeSchedule(increase_batch(32, milestones=(128, 320), factor=2, max_batch=64, rule="approx"))
    module = ScheduledRegression(student(512), lr=0.1)
    trainer = fit([schedule], module=module, n=512, batch=32, k=1, steps=12)
    assert [(h["step"], h["accumulate"], h["batch_size"]) for h in schedule.history] == [(0, 1, 32), (4, 2, 64)]
    expected = [0.1 * 0.5 ** (step // 3) * (0.5 if step >= 7 else 1.0) for step in range(12)]
    assert module.optimizers().optimizer.seen == pytest.approx(expected)
    assert trainer.global_step == 12 and schedule.examples == 4 * 32 + 8 * 64
    assert trainer.callback_metrics["batch/lr_mult"] == 0.5 and trainer.callback_metrics["batch/size"] == 64


class Cycles(pl.Callback):
    """Per optimizer step: (backwards since Lightning last zeroed the gradient, accumulate_grad_batches)."""

    def __init__(self):
        self.steps, self.batches = [], None

    def on_before_zero_grad(self, trainer, pl_module, optimizer):
        self.batches = 0

    def on_after_backward(self, trainer, pl_module):
        self.batches = None if self.batches is None else self.batches + 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.steps.append((self.batches, trainer.accumulate_grad_batches))


def test_a_change_waits_for_a_batch_index_that_is_a_multiple_of_the_new_accumulation():
    # The plan asks for accumulation 4 from step 5 (index 5); Lightning would not zero the gradient at index 5 under
    # 4 (the step would add onto the last one's gradient), so the change waits for index 8 (step 8). Every step's
    # gradient is then that of exactly `accumulate` batches, zeroed before the first, across the epoch's end too.
    schedule, cycles = BatchSizeSchedule(increase_batch(32, milestones=(160,), factor=4, rule="approx")), Cycles()
    fit([schedule, cycles], n=512, batch=32, k=1, steps=12)
    assert [(h["step"], h["accumulate"]) for h in schedule.history] == [(0, 1), (8, 4)]
    assert cycles.steps == [(1, 1)] * 8 + [(4, 4)] * 4


def fp16_plugin(init_scale: float = 2.0**4, growth_interval: int = 16):
    """fp16 AMP with a GradScaler on CPU (Trainer(precision="16-mixed") turns into bf16 there)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
    return MixedPrecision("16-mixed", "cpu", scaler=scaler)


class GradientNorms(pl.Callback):
    """|∇w|² of the first layer at the last backward of each step and in on_before_optimizer_step."""

    def __init__(self):
        self.after_backward, self.before_step, self.scales = [], [], []

    def on_after_backward(self, trainer, pl_module):
        if not trainer.fit_loop._should_accumulate():
            self.after_backward.append(pl_module.net[0].weight.grad.double().square().sum().item())
            self.scales.append(trainer.precision_plugin.scaler.get_scale())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before_step.append(pl_module.net[0].weight.grad.double().square().sum().item())


def test_lightning_unscales_fp16_gradients_before_on_before_optimizer_step():
    # Why the monitor measures in the last on_after_backward: there the accumulated gradient still carries the
    # GradScaler's scale, like the micro-batch gradients its hooks saw; on_before_optimizer_step runs after unscale_.
    norms = GradientNorms()
    fit([norms], steps=2, plugins=[fp16_plugin(init_scale=2.0**6)])
    assert norms.scales == [64.0, 64.0]
    for scaled, unscaled in zip(norms.after_backward, norms.before_step):
        assert scaled == pytest.approx(unscaled * 64.0**2, rel=1e-6)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_matches_fp32(precision):
    # Same data, same parameters (LR 0) as micro_run in fp32. fp16: the GradScaler's scale doubles every 16 steps
    # (16 → 1024); were it not divided out, |G|² and tr Σ would be off by its square.
    reference, _ = micro_run()
    monitor = NoiseScaleMonitor(small="all")
    extra = {"plugins": [fp16_plugin()]} if precision == "fp16" else {"precision": "bf16-mixed"}
    fit([monitor], steps=96, gradient_clip_val=1e-3, **extra)
    est, ref = monitor.estimate, reference.estimate
    assert est.n_steps == ref.n_steps == 96
    assert est.b_simple == pytest.approx(ref.b_simple, rel=0.05)
    assert est.grad_sq == pytest.approx(ref.grad_sq, rel=0.05)
    assert est.trace_cov == pytest.approx(ref.trace_cov, rel=0.05)


class BatchNormRegression(Regression):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(D, H), nn.BatchNorm1d(H), nn.Tanh(), nn.Linear(H, 1)))


class ManualRegression(Regression):
    def __init__(self):
        super().__init__(student(), lr=0.1)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        optimizer.step()


@pytest.mark.parametrize("callback, module, k, message", [
    (NoiseScaleMonitor(), BatchNormRegression, 1, "accumulate_grad_batches=2 or more"),
    (NoiseScaleMonitor(source="per_example"), BatchNormRegression, 4, "undefined with BatchNorm"),
    (NoiseScaleMonitor(source="micro"), None, 1, "needs Trainer(accumulate_grad_batches=2 or more), got 1"),
    (NoiseScaleMonitor(source="ddp"), None, 4, "use strategy='ddp' with devices >= 2"),
    (NoiseScaleMonitor(), ManualRegression, 1, "automatic_optimization=False"),
    (BatchSizeSchedule(increase_batch(64, (640,), 2, rule="approx")), ManualRegression, 1,
     "automatic_optimization=False"),
    (BatchSizeSchedule(increase_batch(32, (640,), 2, rule="approx")), None, 1,
     "base_batch=32 is not a multiple of micro-batch × world size = 64"),
    (BatchSizeSchedule(adaptive(64, 64, 512)), None, 1, "add NoiseScaleMonitor()"),
])
def test_bad_setups_raise_one_clear_error(callback, module, k, message):
    with pytest.raises(HastenError, match=re.escape(message)):
        fit([callback], module=module() if module else None, k=k, steps=2)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_sharding_strategies_are_refused(strategy):
    # They need GPUs to run; the check reads only the strategy's type.
    strategy = getattr(pl.strategies, strategy)()
    with pytest.raises(HastenError, match=f"not {type(strategy).__name__}.*use strategy='ddp'"):
        NoiseScaleMonitor().on_fit_start(SimpleNamespace(strategy=strategy, world_size=2), Regression(student()))


def test_arguments_are_checked():
    with pytest.raises(HastenError, match="source='micro_batch'"):
        NoiseScaleMonitor(source="micro_batch")
    with pytest.raises(HastenError, match="every=0"):
        NoiseScaleMonitor(every=0)
    with pytest.raises(HastenError, match="not a batch schedule"):
        BatchSizeSchedule(64)


def test_ddp_source_matches_brute_force(monkeypatch):
    # Two CPU processes (gloo), each accumulating 2 batches of 32 (under no_sync, so DDP's hook fires once a step):
    # B_small = one rank's 64 examples, B_big = 128. Simulated, 192 steps land within ~3% (1 sd) of the truth.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    X, y, _ = teacher()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=192, accumulate_grad_batches=2,
                         callbacks=[NoiseScaleMonitor()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Regression(student()), DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True))
    b, grad_sq, trace_cov = brute_force()
    metrics = trainer.callback_metrics  # from rank 0; the estimate is the same on every rank
    assert float(metrics["noise/b_simple"]) == pytest.approx(b, rel=0.15)
    assert float(metrics["noise/grad_sq"]) == pytest.approx(grad_sq, rel=0.05)
    assert float(metrics["noise/trace_cov"]) == pytest.approx(trace_cov, rel=0.15)


def test_example_runs_on_tiny_settings():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "lightning_fit.py"), "--task", "digits",
                           "--epochs", "2", "--batch-size", "16", "--train-size", "512"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "B_simple = " in proc.stdout and "95% interval" in proc.stdout
    assert "from step 0: batch 32 (accumulate 2)" in proc.stdout and "validation accuracy" in proc.stdout


def test_adaptive_schedule_follows_the_monitor():
    # B_simple ≈ 20 here: from batch 8 (accumulation 1, per-example source) the adaptive schedule moves to the
    # multiple of 8 nearest the estimate once the predicted cost drops by 5%, with AdaScale's LR gain.
    monitor = NoiseScaleMonitor()
    schedule = BatchSizeSchedule(adaptive(8, 8, 64, multiple=8))
    trainer = fit([monitor, schedule], k=1, batch=8, steps=24)
    first, *changes = schedule.history
    assert (first["step"], first["batch_size"]) == (0, 8) and changes and monitor.source_used == "per_example"
    last = changes[-1]
    assert 16 <= last["batch_size"] <= 32 and trainer.accumulate_grad_batches == last["accumulate"]
    assert last["lr_mult"] > 1.0  # AdaScale: r = (1 + B_simple/8)/(1 + B_simple/B) > 1 for B > 8
