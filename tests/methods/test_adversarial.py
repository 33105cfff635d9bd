"""FGSM and PGD: the closed-form FGSM step of a linear model, and PGD staying inside its ε-ball."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hasten.methods.adversarial import PGD, fgsm, pgd, project, random_start

from .helpers import make_state


def test_project_hand_values():
    d = torch.tensor([[3.0, -4.0], [0.1, 0.2]])
    assert torch.equal(project(d, 1.0, "linf"), torch.tensor([[1.0, -1.0], [0.1, 0.2]]))
    assert torch.allclose(project(d, 1.0, "l2"), torch.tensor([[0.6, -0.8], [0.1, 0.2]]))  # inside: unchanged


def test_fgsm_on_a_linear_model_is_eps_times_the_sign_of_the_closed_form_gradient():
    torch.manual_seed(0)
    model = nn.Linear(5, 3, bias=False)
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 0])
    # ∂/∂x of the mean cross-entropy of z = Wx: Wᵀ(softmax(z) − onehot(y)) / B.
    grad = (F.softmax(model(x), -1) - F.one_hot(y, 3)) @ model.weight / 4
    out = fgsm(model, F.cross_entropy, x, y, eps=0.1)
    assert torch.allclose(out, x + 0.1 * grad.sign())
    assert model.weight.grad is None  # only the input was differentiated


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("eps", [0.05, 0.5])
@pytest.mark.parametrize("start", [False, True])
def test_pgd_stays_in_the_ball_and_raises_the_loss(norm, eps, start):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = torch.randn(32, 6), torch.randint(3, (32,))
    g = torch.Generator().manual_seed(0) if start else None
    out = pgd(model, F.cross_entropy, x, y, eps=eps, step_size=eps / 2, steps=5, norm=norm, generator=g)
    delta = (out - x).reshape(32, -1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps * (1 + 1e-5)).all()
    assert F.cross_entropy(model(out), y) > F.cross_entropy(model(x), y)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_is_inside_the_ball(norm):
    d = random_start(torch.zeros(100, 3, 4), 0.2, norm, torch.Generator().manual_seed(0)).reshape(100, -1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= 0.2 + 1e-6).all() and size.max() > 0.1


def test_pgd_method_replaces_inputs_only():
    torch.manual_seed(2)
    model = nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randint(2, (8,))
    state = make_state(model, (x, y))
    PGD(eps=0.3, norm="l2", steps=2).on_batch_ready(state)
    xa, ya = state.batch
    assert torch.equal(ya, y) and (xa - x).norm(dim=1).max() <= 0.3 + 1e-6
    assert PGD().applies_to(type("T", (), {"kind": "text"})(), model) is not None
