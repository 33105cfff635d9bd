"""precision=bf16|fp16 in fit(): autocast on CPU, the fp16 GradScaler, and the noise meter reading unscaled gradients."""
import math

import pytest
import torch
from train_tiny_task import tiny_config, tiny_task

from hasten.errors import HastenError
from hasten.train import Callback, fit, load_checkpoint


def fixed_params(precision: str, noise: str, tmp_path, **kw):
    """The meter at fixed parameters (lr=0) over the same 40 batches: only the arithmetic differs between runs."""
    cfg = tiny_config(steps=40, lr=0.0, noise=noise, noise_horizon=-1.0, precision=precision, eval_every=0,
                      checkpoint_every=0, **kw)
    return fit(tiny_task(), cfg, run_dir=tmp_path / f"{precision}-{noise}").noise


@pytest.mark.parametrize("noise", ["hooks", "micro"])
def test_bf16_autocast_measures_b_simple_within_5_percent_of_float32(tmp_path, noise):
    fp32, bf16 = fixed_params("32", noise, tmp_path), fixed_params("bf16", noise, tmp_path)
    assert fp32.n_steps == bf16.n_steps == 40 and bf16.n_skipped == 0
    assert bf16.b_simple == pytest.approx(fp32.b_simple, rel=0.05)
    assert bf16.grad_sq != fp32.grad_sq  # autocast did run in bfloat16


@pytest.mark.parametrize("noise", ["hooks", "micro"])
def test_fp16_meter_reads_unscaled_gradients(tmp_path, noise):
    """The GradScaler multiplies the loss by 65536: a meter that forgot it would report |G|² and tr(Σ) 65536² times
    too large (B_simple, a ratio, would not show it)."""
    fp32, fp16 = fixed_params("32", noise, tmp_path), fixed_params("fp16", noise, tmp_path)
    assert fp16.n_steps == 40 and fp16.n_skipped == 0
    for key in ("grad_sq", "trace_cov", "b_simple"):
        assert getattr(fp16, key) == pytest.approx(getattr(fp32, key), rel=0.05), key


class Scale(Callback):
    def __init__(self):
        self.scales, self.grads = [], []

    def on_before_optimizer_step(self, state):
        self.scales.append(state.scaler.get_scale())
        self.grads.append(next(state.model.parameters()).grad.abs().max().item())


def test_fp16_trains_with_a_grad_scaler_and_callbacks_see_unscaled_gradients(tmp_path):
    seen = Scale()
    fp16 = fit(tiny_task(), tiny_config(steps=6, precision="fp16", noise="off"), [seen], run_dir=tmp_path / "16")
    fp32 = fit(tiny_task(), tiny_config(steps=6, noise="off"), run_dir=tmp_path / "32")
    assert seen.scales[0] == 65536.0 and max(seen.grads) < 10  # unscaled before before_optimizer_step
    assert fp16.loss == pytest.approx(fp32.loss, rel=0.05) and math.isfinite(fp16.loss)
    assert load_checkpoint(tmp_path / "16" / "checkpoint-latest.pt")["scaler"]["scale"] == 65536.0


def test_fp16_resume_matches_an_uninterrupted_run(tmp_path):
    class Crash(Callback):
        def on_batch_end(self, state):
            if state.step == 7:
                raise KeyboardInterrupt

    cfg = tiny_config(steps=10, precision="fp16", noise="hooks", noise_horizon=-1.0)
    whole = fit(tiny_task(), cfg, run_dir=tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), cfg, [Crash()], run_dir=tmp_path / "cut")
    resumed = fit(tiny_task(), cfg, run_dir=tmp_path / "cut")
    assert (resumed.loss, resumed.noise) == (whole.loss, whole.noise)
    a, b = (load_checkpoint(tmp_path / d / "checkpoint-latest.pt") for d in ("whole", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]) and a["scaler"] == b["scaler"]


def test_bad_precision_is_one_line(tmp_path):
    for bad in ("16", "fp8", "float32"):
        with pytest.raises(HastenError, match=f"precision='{bad}': choose 32, bf16 or fp16"):
            fit(tiny_task(), tiny_config(precision=bad), run_dir=tmp_path)


def test_an_op_without_a_low_precision_kernel_is_one_line(tmp_path):
    def loss(outputs, targets):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError('"some_op_cpu" not implemented for \'Half\'')
        return torch.nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(HastenError, match="precision=fp16 on cpu: .*not implemented for 'Half'; use precision=32"):
        fit(tiny_task(loss=loss), tiny_config(steps=2, precision="fp16", noise="off"), run_dir=tmp_path)
