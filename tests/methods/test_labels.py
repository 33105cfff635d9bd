"""Label smoothing, MixUp and CutMix against hand-computed values and torch's own label-smoothed cross-entropy."""
import pytest
import torch
import torch.nn.functional as F

from hasten.methods.labels import (
    CutMix, LabelSmoothing, MixUp, cutmix, cutmix_box, mixup, smooth_labels, smoothed_cross_entropy,
    soft_cross_entropy, to_probs,
)

from .helpers import make_state


def test_smooth_labels_hand_values():
    # K = 4, α = 0.1: the true class gets 0.9 + 0.1/4 = 0.925, the others 0.1/4 = 0.025.
    out = smooth_labels(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(out, torch.tensor([[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]]))
    # Probability targets are smoothed the same way: 0.9·0.5 + 0.025 = 0.475.
    out = smooth_labels(torch.tensor([[0.5, 0.5, 0.0, 0.0]]), 4, 0.1)
    assert torch.allclose(out, torch.tensor([[0.475, 0.475, 0.025, 0.025]]))


@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5)])
def test_smoothed_cross_entropy_matches_torch(shape):
    torch.manual_seed(0)
    logits = torch.randn(*shape)
    targets = torch.randint(shape[-1], shape[:-1])
    ours = smoothed_cross_entropy(logits, targets, alpha=0.2)
    ref = F.cross_entropy(logits.reshape(-1, shape[-1]), targets.reshape(-1), label_smoothing=0.2)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_soft_cross_entropy_of_one_hot_equals_hard():
    torch.manual_seed(1)
    logits, targets = torch.randn(8, 3), torch.randint(3, (8,))
    assert torch.allclose(soft_cross_entropy(logits, to_probs(targets, 3)), F.cross_entropy(logits, targets))


def test_mixup_is_the_convex_combination():
    x = torch.tensor([[0.0, 2.0], [10.0, 4.0]])
    y = to_probs(torch.tensor([0, 1]), 2)
    xm, ym = mixup(x, y, 0.3, torch.tensor([1, 0]))
    assert torch.allclose(xm, torch.tensor([[7.0, 3.4], [3.0, 2.6]]))  # 0.3·x_i + 0.7·x_j
    assert torch.allclose(ym, torch.tensor([[0.3, 0.7], [0.7, 0.3]]))


def test_cutmix_box_area_matches_lambda():
    # λ = 0.75 on 8×8: sides 8·√0.25 = 4, box 16 pixels, kept area 1 − 16/64 = 0.75.
    assert cutmix_box(0.75, 8, 8, 4, 4) == (2, 6, 2, 6)
    # Clipped at the corner: a 2×2 box, so the effective λ is 1 − 4/64.
    box = cutmix_box(0.75, 8, 8, 0, 0)
    assert box == (0, 2, 0, 2)
    x = torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])
    y = to_probs(torch.tensor([0, 1]), 2)
    xm, ym, lam = cutmix(x, y, box, torch.tensor([1, 0]))
    assert lam == pytest.approx(1 - 4 / 64)
    assert xm[0].sum() == 4 and xm[1].sum() == 64 - 4  # the pasted pixels come from the other image
    assert torch.allclose(ym[0], torch.tensor([lam, 1 - lam]))


def test_mixup_method_mixes_pairs_deterministically_per_step():
    b = 6
    x, y = torch.eye(b), torch.arange(b) % 3
    model = torch.nn.Linear(b, 3)
    state = make_state(model, (x, y))
    method = MixUp(alpha=0.4)
    method.on_fit_start(state)
    assert state.loss_fn is soft_cross_entropy
    method.on_batch_ready(state)
    xm, ym = state.batch
    lams = set()
    for i in range(b):  # row i is λ·e_i + (1−λ)·e_j with j = perm(i)
        others = xm[i].clone()
        others[i] = 0
        j = int(others.argmax()) if others.max() > 0 else i
        lams.add(round(float(xm[i, i]), 6) if j != i else None)
        assert torch.allclose(xm[i].sum(), torch.tensor(1.0))
        expected = xm[i, i] * to_probs(y[i], 3) + (1 - xm[i, i]) * to_probs(y[j], 3) if j != i else to_probs(y[i], 3)
        assert torch.allclose(ym[i], expected, atol=1e-6)
    assert len(lams - {None}) == 1  # one λ per batch
    again = make_state(model, (x, y))
    method.on_batch_ready(again)
    assert torch.equal(again.batch[0], xm)  # same (seed, step): same draw


def test_cutmix_method_pastes_and_mixes_targets():
    x = torch.stack([torch.full((1, 8, 8), float(i)) for i in range(4)])
    y = torch.arange(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(72, 4))
    state = make_state(model, (x, y))
    method = CutMix()
    method.on_fit_start(state)
    method.on_batch_ready(state)
    xm, ym = state.batch
    for i in range(4):
        kept = float((xm[i] == i).float().mean())
        assert float(ym[i, i]) == pytest.approx(kept, abs=1e-6)  # target share = share of own pixels


def test_label_smoothing_method_replaces_the_loss():
    state = make_state(torch.nn.Linear(2, 3), (torch.zeros(2, 2), torch.tensor([0, 1])))
    LabelSmoothing(alpha=0.3).on_fit_start(state)
    logits = torch.randn(2, 3)
    assert torch.allclose(state.loss_fn(logits, torch.tensor([0, 1])),
                          F.cross_entropy(logits, torch.tensor([0, 1]), label_smoothing=0.3))
