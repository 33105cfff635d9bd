"""measure_noise_scale: bad input, skipped steps, generic datasets, and leaving the model as it was."""
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from hasten.errors import HastenError
from hasten.measure import NoiseScale, measure_noise_scale, per_example_sq_norms

from .reference import RecordingNoiseScale

loss_fn = torch.nn.functional.cross_entropy


def small_problem(n=200, norm=None):
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 8)] + ([norm(8)] if norm else []) + [torch.nn.ReLU(), torch.nn.Linear(8, 3)]
    return torch.nn.Sequential(*layers), TensorDataset(x, y)


class ListDataset(Dataset):  # a generic map-style dataset: items are (tensor, int)
    def __init__(self, tensors):
        self.x, self.y = tensors

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


def test_bad_input_is_a_one_line_hasten_error():
    model, data = small_problem()
    with pytest.raises(HastenError, match="fewer than batch_size"):
        measure_noise_scale(model, loss_fn, data, batch_size=400, micro_batch_size=100)
    with pytest.raises(HastenError, match="must divide"):
        measure_noise_scale(model, loss_fn, data, batch_size=32, micro_batch_size=10)
    with pytest.raises(HastenError, match="must divide"):
        measure_noise_scale(model, loss_fn, data, batch_size=32, micro_batch_size=32)
    with pytest.raises(HastenError, match="exactly one"):
        measure_noise_scale(model, loss_fn, data, batch_size=32)
    with pytest.raises(HastenError, match="exactly one"):
        measure_noise_scale(model, loss_fn, data, batch_size=32, micro_batch_size=8, per_example=True)


def test_batchnorm_rejects_per_example_but_not_micro_batches():
    model, data = small_problem(norm=torch.nn.BatchNorm1d)
    x, y = data.tensors
    with pytest.raises(HastenError, match="BatchNorm"):
        measure_noise_scale(model, loss_fn, data, batch_size=32, per_example=True)
    with pytest.raises(HastenError, match="BatchNorm"):
        per_example_sq_norms(model, loss_fn, x[:8], y[:8])
    running_mean = model[1].running_mean.clone()
    est = measure_noise_scale(model, loss_fn, data, batch_size=32, micro_batch_size=8, steps=5)
    assert est.n_steps == 5
    assert torch.equal(model[1].running_mean, running_mean)  # buffers put back
    model.eval()  # running statistics no longer couple the examples
    assert measure_noise_scale(model, loss_fn, data, batch_size=32, per_example=True, steps=2).n_steps == 2


@pytest.mark.parametrize("source", [dict(micro_batch_size=8), dict(per_example=True)], ids=["micro", "per_example"])
def test_non_finite_loss_step_is_skipped_and_counted(source):
    model, data = small_problem()
    steps, bad_step = 6, 3
    clean = RecordingNoiseScale(dataset_size=len(data))
    measure_noise_scale(model, loss_fn, data, batch_size=32, steps=steps, noise=clean, **source)
    calls_per_step = 1 if "per_example" in source else 32 // 8  # under vmap loss_fn is traced once per batch
    calls = []

    def nan_on_bad_step(out, y):
        calls.append(None)
        loss = loss_fn(out, y)
        return loss * float("nan") if (len(calls) - 1) // calls_per_step == bad_step else loss

    est = measure_noise_scale(model, nan_on_bad_step, data, batch_size=32, steps=steps, **source)
    reference = NoiseScale(dataset_size=len(data))
    for i, (sq_small, b_small, sq_big, b_big) in enumerate(clean.calls):
        reference.update(float("nan") if i == bad_step else sq_small, b_small, sq_big, b_big)
    assert (est.n_steps, est.n_skipped) == (steps - 1, 1)
    assert est == reference.compute()


def test_model_left_as_it_was():
    model, data = small_problem()
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    for source in (dict(micro_batch_size=8), dict(per_example=True)):
        measure_noise_scale(model, loss_fn, data, batch_size=32, steps=3, **source)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert model.training and torch.equal(torch.get_rng_state(), rng)


def test_generic_dataset_matches_tensor_dataset():
    model, data = small_problem()
    for source in (dict(micro_batch_size=8), dict(per_example=True)):
        a = measure_noise_scale(model, loss_fn, data, batch_size=32, steps=4, seed=3, **source)
        b = measure_noise_scale(model, loss_fn, ListDataset(data.tensors), batch_size=32, steps=4, seed=3, **source)
        assert abs(a.b_simple - b.b_simple) < 1e-6 * abs(a.b_simple)


def test_dropout_is_seeded_and_reproducible():
    model, data = small_problem()
    model = torch.nn.Sequential(model, torch.nn.Dropout(0.3)).train()
    for source in (dict(micro_batch_size=8), dict(per_example=True)):
        a = measure_noise_scale(model, loss_fn, data, batch_size=32, steps=3, seed=5, **source)
        b = measure_noise_scale(model, loss_fn, data, batch_size=32, steps=3, seed=5, **source)
        assert a == b and a.n_steps == 3
