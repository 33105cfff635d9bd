"""The noise meter with methods that change a batch's composition or the loss weighting (issue 11.6): each either
measures the batch it trains on (checked against brute-force gradients of that batch, with the step's own loss), or
leaves out the steps whose batch is not a uniform sample, or refuses the combination with one line."""
import sys
from pathlib import Path

import pytest
import torch
from test_train_noise import BruteForce, close
from torch import nn
from torch.utils.data import TensorDataset
from train_tiny_task import tiny_config, tiny_task

from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale
from hasten.tasks.base import Task
from hasten.tasks.models import cross_entropy
from hasten.tasks.shakespeare_mlm import IGNORE, masked_cross_entropy
from hasten.train import Callback, fit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
from toy_tasks import IMAGE  # noqa: E402


def check(task, tmp_path, noise, steps=8, **kw):
    """fit at fixed parameters (lr=0, so brute force and meter see the same weights) with a brute-force reference:
    per-example gradients for hooks (B_small = 1), the first micro-batch of the measured split for micro."""
    reference = BruteForce(small=1 if noise == "hooks" else 0, horizon=None, first=noise == "micro", parts=4)
    cfg = tiny_config(steps=steps, lr=0.0, noise=noise, noise_horizon=-1.0, eval_every=0, checkpoint_every=0, **kw)
    result = fit(task, cfg, [reference], run_dir=tmp_path / noise)
    return result, reference


@pytest.mark.parametrize("noise", ["hooks", "micro"])
def test_mixup_measures_the_mixed_batch(tmp_path, noise):
    result, reference = check(tiny_task(loss=cross_entropy), tmp_path, noise, methods="mixup:alpha=1.0")
    close(result.noise, reference.ref)
    assert result.noise.n_steps == 8


@pytest.mark.parametrize("noise", ["hooks", "micro"])
def test_cutmix_measures_the_pasted_batch(tmp_path, noise):
    result, reference = check(IMAGE, tmp_path, noise, steps=4, model="cnn", methods="cutmix")
    close(result.noise, reference.ref)
    assert result.noise.n_steps == 4


@pytest.mark.parametrize("noise", ["hooks", "micro"])
def test_selective_backprop_steps_are_left_out(tmp_path, noise):
    # Selection on every second step from the start: those 6 steps train on high-loss subsets and are not measured.
    result, reference = check(tiny_task(), tmp_path, noise, steps=12,
                              methods="selective_backprop:start=0:end=1:interval=2")
    close(result.noise, reference.ref)
    assert result.noise.n_steps == 6


def test_sortagrad_first_epoch_is_left_out(tmp_path):
    # 96 examples in batches of 16: the first 6 steps run in order of initial loss, the next 4 are shuffled.
    result, reference = check(tiny_task(), tmp_path, "hooks", steps=10, methods="sortagrad:difficulty=loss")
    close(result.noise, reference.ref)
    assert result.noise.n_steps == 4


def masked_task(model=None) -> Task:
    """Token sequences whose targets are masked (IGNORE) at random, 1 to 8 scored tokens per sequence, and
    masked_cross_entropy: a mean over a varying number of terms per example, like shakespeare-mlm."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(16, (160, 8), generator=g)
    scored = torch.rand(160, 8, generator=g) < torch.rand(160, 1, generator=g)
    scored[:, 0] = True
    targets = torch.where(scored, (tokens + 1) % 16, torch.full_like(tokens, IGNORE))
    data = TensorDataset(tokens[:128], targets[:128]), TensorDataset(tokens[128:], targets[128:])

    def per_token() -> nn.Module:  # covered by the per-example hooks: Embedding, Linear
        return nn.Sequential(nn.Embedding(16, 12), nn.Tanh(), nn.Linear(12, 16))

    return Task("masked", "masked tokens", lambda path: data, {"m": model or per_token}, masked_cross_entropy,
                lambda out, y: (out.argmax(-1) == y).float().mean(1), kind="text")


class GradCheck(Callback):
    """The accumulated .grad against one backward of the whole batch on a copy of the model."""

    def __init__(self):
        self.errors = []

    def on_before_optimizer_step(self, state):
        import copy

        x, y = state.batch
        ref = copy.deepcopy(state.model)
        ref.zero_grad(set_to_none=True)
        state.loss_fn(ref(x), y).backward()
        self.errors.append(max((p.grad - q.grad).abs().max().item()
                               for p, q in zip(state.model.parameters(), ref.parameters())))


def test_token_mean_loss_micro_batches_keep_the_objective(tmp_path):
    """Each micro-batch weighted by its share of the scored tokens: the accumulated gradient is the batch's."""
    grads = GradCheck()
    fit(masked_task(), tiny_config(steps=4, micro_batch_size=4, noise="off"), [grads], run_dir=tmp_path)
    assert max(grads.errors) < 1e-6


def test_token_mean_loss_micro_source_measures_its_split(tmp_path):
    result, reference = check(masked_task(), tmp_path, "micro")
    close(result.noise, reference.ref)
    assert result.noise.n_steps == 8


class TokenShareBruteForce(Callback):
    """Per-example gradients of a token-mean loss as one backward of the batch hands them out: example i's share of
    the batch loss, B·Σ_t ℓ_it/T (T = scored tokens in the batch), each from its own backward."""

    def __init__(self):
        self.ref = None

    def on_fit_start(self, state):
        self.ref = NoiseScale(horizon=None, dataset_size=state.train_size)

    def on_before_optimizer_step(self, state):
        import copy

        x, y = state.batch
        model = copy.deepcopy(state.model)
        terms = masked_cross_entropy.terms(y)

        def grad(xs, ys, factor):
            model.zero_grad(set_to_none=True)
            (state.loss_fn(model(xs), ys) * factor).backward()
            return torch.cat([p.grad.flatten().double() for p in model.parameters()])

        b, total = len(x), terms.sum()
        per_example = torch.stack([grad(x[i:i + 1], y[i:i + 1], b * terms[i] / total) for i in range(b)])
        self.ref.update(per_example.square().sum(1).mean().item(), 1, per_example.mean(0).square().sum().item(), b)


def test_token_mean_loss_hooks_measure_each_sequence_share(tmp_path):
    reference = TokenShareBruteForce()
    cfg = tiny_config(steps=8, lr=0.0, noise="hooks", noise_horizon=-1.0, eval_every=0, checkpoint_every=0)
    result = fit(masked_task(), cfg, [reference], run_dir=tmp_path)
    close(result.noise, reference.ref)


def test_per_example_source_refuses_a_token_mean_loss(tmp_path):
    with pytest.raises(HastenError, match="noise=per_example takes each example's own mean loss.*noise=hooks"):
        fit(masked_task(), tiny_config(steps=2, noise="per_example"), run_dir=tmp_path)


def test_adaptive_batch_refuses_a_meter_marked_biased(tmp_path):
    with pytest.raises(HastenError, match=r"batch=adaptive follows the noise scale, which is biased here \(method:sam"):
        fit(tiny_task(), tiny_config(steps=2, batch="adaptive", methods="sam"), run_dir=tmp_path)
    fit(tiny_task(), tiny_config(steps=2, methods="sam"), run_dir=tmp_path / "fixed")  # measuring alone is fine
