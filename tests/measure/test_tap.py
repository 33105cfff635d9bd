"""MicroBatchTap inside real training steps against micro-batch gradients computed separately by hand."""
import math

import pytest
import torch
from torch.func import functional_call

from hasten.errors import HastenError
from hasten.measure import MicroBatchTap

from .reference import RecordingNoiseScale

K, MICRO = 4, 6
loss_fn = torch.nn.functional.cross_entropy


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def make_batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(K * MICRO, 10, generator=gen), torch.randint(0, 3, (K * MICRO,), generator=gen)


def micro_grads(model, x, y):
    """Each micro-batch's mean-loss gradient, flattened, from fresh copies of the parameters (no hooks involved)."""
    grads = []
    for j in range(K):
        params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
        part = slice(j * MICRO, (j + 1) * MICRO)
        loss = loss_fn(functional_call(model, params, (x[part],)), y[part])
        param_grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True)
        grads.append(torch.cat([g.flatten() for g in param_grads]).double())
    return torch.stack(grads)


def expected_pair(grads, precondition=None, small="first"):
    """(|G_small|², |G_big|²): the first micro-batch's squared norm (small="first") or the mean over all of them."""
    if precondition is not None:
        grads = grads * precondition
    sq_small = grads[0].square().sum() if small == "first" else grads.square().sum(1).mean()
    return float(sq_small), float(grads.mean(0).square().sum())


def accumulate(model, x, y, scale=1.0, divide=True):
    for j in range(K):
        part = slice(j * MICRO, (j + 1) * MICRO)
        loss = loss_fn(model(x[part]), y[part])
        ((loss / K if divide else loss) * scale).backward()


def assert_pair(call, expected):
    sq_small, b_small, sq_big, b_big = call
    assert (b_small, b_big) == (MICRO, K * MICRO)
    assert math.isclose(sq_small, expected[0], rel_tol=1e-5)
    assert math.isclose(sq_big, expected[1], rel_tol=1e-5)


@pytest.mark.parametrize("small", ["first", "all"])
def test_tap_matches_hand_computation_over_training_steps(small):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    tap = MicroBatchTap(model, RecordingNoiseScale(), small=small)
    for step in range(3):
        x, y = make_batch(step)
        expected = expected_pair(micro_grads(model, x, y), small=small)
        opt.zero_grad(set_to_none=step % 2 == 0)
        accumulate(model, x, y)
        assert tap.step(K * MICRO)
        assert_pair(tap.noise.calls[-1], expected)
        opt.step()
    assert tap.noise.compute().n_steps == 3


def test_loss_scale_with_grad_scaler():
    model = make_model(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    tap = MicroBatchTap(model, RecordingNoiseScale())
    for step in range(2):
        x, y = make_batch(step)
        expected = expected_pair(micro_grads(model, x, y))
        opt.zero_grad()
        for j in range(K):
            part = slice(j * MICRO, (j + 1) * MICRO)
            scaler.scale(loss_fn(model(x[part]), y[part]) / K).backward()
        assert tap.step(K * MICRO, loss_scale=scaler.get_scale())  # before scaler.unscale_ / scaler.step
        assert_pair(tap.noise.calls[-1], expected)
        scaler.step(opt)
        scaler.update()


def test_undivided_loss_with_accumulation_steps_one():
    model = make_model(2)
    x, y = make_batch(0)
    expected = expected_pair(micro_grads(model, x, y))
    tap = MicroBatchTap(model, RecordingNoiseScale())
    accumulate(model, x, y, scale=3.0, divide=False)
    assert tap.step(K * MICRO, accumulation_steps=1, loss_scale=3.0)
    assert_pair(tap.noise.calls[-1], expected)


def test_precondition_adam_against_hand_computation():
    model = make_model(3)
    beta2, eps = 0.99, 1e-3
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.9, beta2), eps=eps)
    tap = MicroBatchTap(model, RecordingNoiseScale(), precondition=opt)
    v = None
    for step in range(3):
        x, y = make_batch(step)
        grads = micro_grads(model, x, y)
        opt.zero_grad()
        accumulate(model, x, y)
        if step == 0:
            assert not tap.step(K * MICRO)  # no optimizer state yet: skipped, nothing recorded
            assert tap.noise.calls == []
        else:
            # Kingma & Ba 2015: v_t = β2 v_{t-1} + (1−β2) g_t², v̂ = v_t/(1−β2^t); P = 1/(√v̂ + ε).
            precondition = 1.0 / ((v / (1 - beta2**step)).sqrt() + eps)
            assert tap.step(K * MICRO)
            assert_pair(tap.noise.calls[-1], expected_pair(grads, precondition))
        g = grads.mean(0)  # the gradient Adam steps on
        v = (1 - beta2) * g.square() if v is None else beta2 * v + (1 - beta2) * g.square()
        opt.step()


def test_counts_backward_passes_not_parameter_hooks():
    class Gated(torch.nn.Module):  # the first parameter gets a gradient in every other micro-batch only
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Parameter(torch.tensor(0.5))
            self.net = make_model(4)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            out = self.net(x)
            return out * self.gate if self.calls % 2 else out

    model = Gated()
    x, y = make_batch(0)
    tap = MicroBatchTap(model, RecordingNoiseScale())
    accumulate(model, x, y)
    assert tap.step(K * MICRO)
    model.calls = 0
    grads = micro_grads(model, x, y)
    assert_pair(tap.noise.calls[-1], expected_pair(grads))


def test_skips_without_error():
    model = make_model(5)
    x, y = make_batch(0)
    tap = MicroBatchTap(model)
    loss_fn(model(x), y).backward()
    assert not tap.step(K * MICRO)  # one backward: nothing to compare
    accumulate(model, x, y)
    assert not tap.step(K * MICRO, micro_batch_sizes=[5, 7, 6, 6])  # unequal micro-batches
    accumulate(model, x, y)
    assert not tap.step(K * MICRO + 1)  # batch not divisible by the number of backwards
    accumulate(model, x, y)
    with pytest.raises(HastenError, match="micro_batch_sizes"):
        tap.step(K * MICRO, micro_batch_sizes=[6, 6, 6])
    accumulate(model, x, y)
    assert tap.step(K * MICRO, micro_batch_sizes=[6] * K)
    assert tap.noise.compute().n_steps == 1
    tap.remove()
    accumulate(model, x, y)
    assert not tap.step(K * MICRO)  # hooks removed


def test_non_finite_micro_batch_is_counted_as_skip():
    model = make_model(6)
    x, y = make_batch(0)
    tap = MicroBatchTap(model)
    x = x.clone()
    x[0, 0] = float("nan")
    accumulate(model, x, y)
    assert not tap.step(K * MICRO)
    est = tap.noise.compute()
    assert (est.n_steps, est.n_skipped) == (0, 1)


def test_state_dict_holds_the_estimate_and_the_phase_of_every():
    model = make_model(7)
    tap = MicroBatchTap(model, every=2)
    for step in range(3):
        x, y = make_batch(step)
        model.zero_grad()
        accumulate(model, x, y)
        tap.step(K * MICRO)
    other_model = make_model(7)
    other = MicroBatchTap(other_model, every=2)
    other.load_state_dict(tap.state_dict())
    assert other.noise.compute() == tap.noise.compute()
    assert tap.state_dict() == {**tap.noise.state_dict(), "steps": 3}
    x, y = make_batch(3)
    accumulate(other_model, x, y)
    assert not other.step(K * MICRO)  # the 4th step: every=2 skips it, as the uninterrupted tap would
    other_model.zero_grad()
    accumulate(other_model, x, y)
    assert other.step(K * MICRO)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing(use_reentrant):
    class Checkpointed(torch.nn.Module):  # reentrant checkpointing runs a nested backward per segment
        def __init__(self):
            super().__init__()
            self.net = make_model(8)

        def forward(self, x):
            hidden = torch.utils.checkpoint.checkpoint(self.net[:2], x, use_reentrant=use_reentrant)
            return self.net[2](hidden)

    model = Checkpointed()
    x, y = make_batch(0)
    tap = MicroBatchTap(model, RecordingNoiseScale())
    accumulate(model, x.requires_grad_(), y)
    assert tap.step(K * MICRO)
    assert_pair(tap.noise.calls[-1], expected_pair(micro_grads(model.net, x.detach(), y)))  # same parameters


def test_every_other_step():
    model = make_model(9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tap = MicroBatchTap(model, RecordingNoiseScale(), every=2)
    measured = []
    for step in range(4):
        x, y = make_batch(step)
        expected = expected_pair(micro_grads(model, x, y))
        opt.zero_grad()
        accumulate(model, x, y)
        measured.append(tap.step(K * MICRO))
        if measured[-1]:
            assert_pair(tap.noise.calls[-1], expected)
        opt.step()
    assert measured == [True, False, True, False] and len(tap.noise.calls) == 2


def test_discard_forgets_extra_backwards_between_steps():
    """A backward that is not a micro-batch of the next step (SAM's second pass) must not be read as its first."""
    model = make_model(10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tap = MicroBatchTap(model, RecordingNoiseScale())
    for step in range(3):
        x, y = make_batch(step)
        expected = expected_pair(micro_grads(model, x, y))
        opt.zero_grad()
        accumulate(model, x, y)
        assert tap.step(K * MICRO)
        assert_pair(tap.noise.calls[-1], expected)
        loss_fn(model(x * 2), y).backward()  # an extra pass after the measurement
        tap.discard()
        opt.step()


def test_unknown_small_is_refused():
    with pytest.raises(HastenError, match="small="):
        MicroBatchTap(make_model(), small="some")
