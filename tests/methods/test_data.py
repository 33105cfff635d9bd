"""SortaGrad, sequence-length warmup, masking-rate schedules and selective backprop against hand values."""
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from hasten.methods.data import (
    MaskSchedule, SelectiveBackprop, SeqLenWarmup, SortaGrad, example_lengths, mask_tokens, masking_rate,
    select_by_loss, selection_probabilities, sortagrad_order, warmup_length,
)

from .helpers import make_state


def test_linear_masking_schedule_30_to_15():
    assert [masking_rate(p) for p in (0.0, 0.2, 0.5, 1.0)] == pytest.approx([0.30, 0.27, 0.225, 0.15])
    assert masking_rate(0.7, "constant") == 0.15
    assert [masking_rate(p, "cosine") for p in (0.0, 0.5, 1.0)] == pytest.approx([0.30, 0.225, 0.15])
    assert [masking_rate(p, "step") for p in (0.49, 0.5)] == [0.30, 0.15]


def test_mask_tokens_rates_and_targets():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 50, (200, 100))
    inputs, targets = mask_tokens(tokens, 0.0, mask_id=0, vocab=50, generator=g)
    assert torch.equal(inputs, tokens) and (targets == -100).all()
    inputs, targets = mask_tokens(tokens, 1.0, 0, 50, g)
    assert torch.equal(targets, tokens)
    inputs, targets = mask_tokens(tokens, 0.3, 0, 50, g)
    chosen = targets != -100
    n = tokens.numel()
    assert abs(chosen.float().mean() - 0.3) < 4 * (0.3 * 0.7 / n) ** 0.5
    assert torch.equal(inputs[~chosen], tokens[~chosen]) and torch.equal(targets[chosen], tokens[chosen])
    masked = (inputs[chosen] == 0).float().mean()  # 80% of the chosen become [MASK]
    assert abs(masked - 0.8) < 4 * (0.8 * 0.2 / chosen.sum()) ** 0.5


def test_mask_schedule_method_applies_the_scheduled_rate():
    model = nn.Embedding(50, 4)
    model.mask_id, model.vocab = 0, 50
    tokens = torch.randint(1, 50, (64, 64))
    state = make_state(model, (tokens, tokens), steps=100, step=50)
    method = MaskSchedule()
    assert method.applies_to(None, model) is None and method.applies_to(None, nn.Linear(1, 1)) is not None
    method.on_batch_ready(state)
    assert state.metrics["mask_rate"] == pytest.approx(0.225)
    assert abs((state.batch[1] != -100).float().mean() - 0.225) < 0.03


def test_warmup_length_hand_values():
    assert warmup_length(0.0, 0.2, 8, 128) == 8
    assert warmup_length(0.1, 0.2, 8, 128) == 64  # 8 + 120·0.5 = 68 → 64
    assert warmup_length(0.2, 0.2, 8, 128) == 128 and warmup_length(0.9, 0.2, 8, 128) == 128


def test_seq_len_warmup_truncates_inputs_and_targets():
    x = torch.arange(2 * 32).reshape(2, 32)
    state = make_state(nn.Linear(1, 1), (x, x + 1), steps=10, step=0)
    SeqLenWarmup(min_len=8, duration=0.5).on_batch_ready(state)
    assert state.batch[0].shape == (2, 8) and torch.equal(state.batch[1], x[:, :8] + 1)


def test_sortagrad_order_and_lengths():
    assert sortagrad_order(torch.tensor([3.0, 1.0, 2.0, 1.0])).tolist() == [1, 3, 2, 0]  # stable on ties
    assert example_lengths(torch.tensor([[5, 2, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])).tolist() == [2, 1, 4]


def test_sortagrad_method_first_epoch_in_length_order():
    lengths = torch.tensor([5, 1, 4, 2, 3, 6])
    x = (torch.arange(8)[None, :] < lengths[:, None]).long() * 7  # padded with 0
    data = TensorDataset(x, torch.arange(6))
    method = SortaGrad(difficulty="length")
    seen = []
    for step in range(4):
        state = make_state(nn.Linear(1, 1), (x[:2], torch.zeros(2, dtype=torch.long)), step=step, train_set=data)
        state.examples = 2 * step
        method.on_batch_ready(state)
        seen.append(state.batch[1].tolist())
    assert seen[:3] == [[1, 3], [4, 2], [0, 5]]  # by length 1,2 | 3,4 | 5,6
    assert seen[3] == [0, 0]  # second epoch: the loop's shuffled batch is left alone
    restored = SortaGrad()
    restored.load_state_dict(method.state_dict())
    assert torch.equal(restored.order, method.order)


def test_selection_probabilities_hand_values():
    # B = 4, keep = ½: exponent 1, weights (rank + ½)/4 = 1/8, 3/8, 5/8, 7/8 normalized by 2.
    probs = selection_probabilities(torch.tensor([0.9, 0.1, 0.5, 0.3]), keep=0.5)
    assert probs.tolist() == pytest.approx([7 / 16, 1 / 16, 5 / 16, 3 / 16])
    assert selection_probabilities(torch.rand(5), keep=1.0).tolist() == pytest.approx([0.2] * 5)


def test_select_by_loss_prefers_high_losses():
    losses = torch.arange(100.0)
    g = torch.Generator().manual_seed(0)
    picks = torch.cat([select_by_loss(losses, 0.1, g) for _ in range(50)])
    assert len(select_by_loss(losses, 0.1, g)) == 10
    assert picks.float().mean() > 80  # exponent 9 concentrates on the top losses


def test_selective_backprop_method_halves_the_batch_in_its_window():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(2, (10,))
    method = SelectiveBackprop(keep=0.5, start=0.5, end=0.9, interval=1)
    inside = make_state(model, (x, y), steps=100, step=60)
    method.on_batch_ready(inside)
    assert len(inside.batch[0]) == 5
    rows = [int((x == r).all(1).nonzero()) for r in inside.batch[0]]
    assert torch.equal(inside.batch[1], y[rows])  # inputs and targets stay paired
    outside = make_state(model, (x, y), steps=100, step=10)
    method.on_batch_ready(outside)
    assert len(outside.batch[0]) == 10
