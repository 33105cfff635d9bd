"""PerExampleTap against torch.func brute force: same |G_small|² (B_small = 1) and |G_big|² at fixed parameters."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hasten.errors import HastenError
from hasten.measure import PerExampleTap, uncovered_parameters
from hasten.measure.per_example import per_example_grads_stats
from hasten.tasks import get_task

from .reference import RecordingNoiseScale

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


class Mix(nn.Module):
    """Embedding → Conv1d → GroupNorm → LayerNorm → Linear over a sequence, mean-pooled (every covered type)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6, padding_idx=0)
        self.conv = nn.Conv1d(6, 5, 3, padding=1, stride=2)
        self.gn, self.ln, self.rms = nn.GroupNorm(1, 5), nn.LayerNorm(5), nn.RMSNorm(5)
        self.lin = nn.Linear(5, 3)

    def forward(self, ids):
        h = self.gn(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        return self.lin(torch.tanh(self.rms(self.ln(h)))).mean(1)


def seq_cross_entropy(out, y):  # token mean over (B, T): the example is the row
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


CASES = {  # name: (model, inputs, targets, loss)
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)),
               lambda b: torch.randn(b, 6, dtype=DT, generator=gen(1)), (3,), F.cross_entropy),
    "sequence_linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)),
                        lambda b: torch.randn(b, 5, 6, dtype=DT, generator=gen(1)), (3, 5), seq_cross_entropy),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.ReLU(inplace=True),
                                     nn.Conv2d(4, 3, 2, dilation=2), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)),
               lambda b: torch.randn(b, 2, 8, 8, dtype=DT, generator=gen(1)), (3,), F.cross_entropy),
    "embedding": (lambda: nn.Sequential(nn.Embedding(5, 4, padding_idx=1), nn.Flatten(), nn.Linear(4 * 9, 3)),
                  lambda b: torch.randint(0, 5, (b, 9), generator=gen(1)), (3,), F.cross_entropy),
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3)),
                  lambda b: torch.randn(b, 4, 6, dtype=DT, generator=gen(1)), (3, 4), seq_cross_entropy),
    "mix": (Mix, lambda b: torch.randint(0, 7, (b, 10), generator=gen(1)), (3,), F.cross_entropy),
}


def make(case, b=12):
    model_fn, x_fn, classes, loss = CASES[case]
    torch.manual_seed(0)
    model = model_fn().to(DT)
    with torch.no_grad():  # norm layers start at w = 1, b = 0: move them off it
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, dtype=DT, generator=gen(2)))
    y = torch.randint(0, classes[0], (b, *classes[1:]), generator=gen(3))
    return model, x_fn(b), y, loss


def brute_force(model, x, y, loss):
    """(mean_i ‖∇ℓ_i‖², ‖mean gradient‖²) from torch.func, independent of the hooks' formulas."""
    sq, mean_sq, _ = per_example_grads_stats(model, loss, x, y)
    return sq.mean().item(), mean_sq.item()


def run_tap(tap, model, x, y, loss, k=1, loss_scale=1.0, sizes=None):
    """One optimizer step of k micro-batches (loss / k · loss_scale each), then tap.step."""
    model.zero_grad(set_to_none=True)
    for xs, ys in zip(x.split(sizes or len(x) // k), y.split(sizes or len(y) // k)):
        (loss(model(xs), ys) / k * loss_scale).backward()
    return tap.step(len(x), loss_scale=loss_scale)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("k, loss_scale", [(1, 1.0), (4, 1.0), (2, 1024.0)])
def test_equals_torch_func_brute_force(case, k, loss_scale):
    model, x, y, loss = make(case)
    small, big = brute_force(model, x, y, loss)
    tap = PerExampleTap(model, RecordingNoiseScale())
    assert run_tap(tap, model, x, y, loss, k, loss_scale)
    (sq_small, b_small, sq_big, b_big), = tap.noise.calls
    assert (b_small, b_big) == (1, len(x))
    assert sq_small == pytest.approx(small, rel=1e-9)
    assert sq_big == pytest.approx(big, rel=1e-9)


def test_pending_and_commit_split_a_batch_across_ranks():
    """Two 'ranks' with half the batch each: summed pending(), averaged .grad → the full batch's numbers."""
    model, x, y, loss = make("mix", b=16)
    small, big = brute_force(model, x, y, loss)
    replica = make("mix")[0]
    taps = [PerExampleTap(m, RecordingNoiseScale()) for m in (model, replica)]
    totals = []
    for m, tap, xs, ys in zip((model, replica), taps, x.chunk(2), y.chunk(2)):
        loss(m(xs), ys).backward()
        totals.append(tap.pending())
    assert totals[0].dtype == DT and totals[0].tolist()[1] == 8
    for p, q in zip(model.parameters(), replica.parameters()):  # what DDP's all-reduce leaves in .grad
        p.grad = (p.grad + q.grad) / 2
    total = totals[0] + totals[1]
    assert taps[0].commit(total[0], total[1])
    (sq_small, _, sq_big, b_big), = taps[0].noise.calls
    assert (sq_small, sq_big, b_big) == (pytest.approx(small, rel=1e-9), pytest.approx(big, rel=1e-9), 16)


def test_unequal_micro_batches_are_skipped_and_batch_size_is_checked():
    model, x, y, loss = make("linear")
    tap = PerExampleTap(model, RecordingNoiseScale())
    assert not run_tap(tap, model, x, y, loss, sizes=[5, 7]) and tap.noise.calls == []
    loss(model(x), y).backward()
    with pytest.raises(HastenError, match="batch_size=24 but the covered layers saw 12"):
        tap.step(24)


@pytest.mark.parametrize("task, model_name, shape, classes", [
    ("shakespeare", "transformer", (4, 128), 256),
    ("fashion", "cnn", (16, 1, 28, 28), 10),
])
def test_builtin_task_models_are_covered_and_match_brute_force(task, model_name, shape, classes):
    t = get_task(task)
    torch.manual_seed(0)
    model = t.models[model_name]()
    assert uncovered_parameters(model) == []
    g = gen(4)
    x = torch.randint(0, classes, shape, generator=g) if task == "shakespeare" else torch.randn(shape, generator=g)
    y = torch.randint(0, classes, shape if task == "shakespeare" else shape[:1], generator=g)
    small, big = brute_force(model, x, y, t.loss)
    tap = PerExampleTap(model, RecordingNoiseScale())
    assert run_tap(tap, model, x, y, t.loss, k=2)
    (sq_small, _, sq_big, _), = tap.noise.calls
    assert sq_small == pytest.approx(small, rel=1e-3)  # float32; the task asks for 5%
    assert sq_big == pytest.approx(big, rel=1e-3)


def test_bfloat16_autocast_is_measured_in_float32():
    model, x, y, loss = make("sequence_linear")
    model, x = model.float(), x.float()
    small, _ = brute_force(model, x, y, loss)
    tap = PerExampleTap(model, RecordingNoiseScale())
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    loss(out.float(), y).backward()
    assert tap.pending().dtype == torch.float64
    assert tap.step()
    assert tap.noise.calls[0][0] == pytest.approx(small, rel=0.01)  # bf16 δ, squared in float32


def test_every_three_installs_no_hooks_on_the_other_steps():
    model, x, y, loss = make("mix")
    tap = PerExampleTap(model, RecordingNoiseScale(), every=3)
    measured = []
    for step in range(6):
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        assert tap.measuring == (step % 3 == 0) and (hooks > 0) == tap.measuring
        model.zero_grad()
        loss(model(x), y).backward()
        if not tap.measuring:
            assert tap.pending().tolist() == [0.0, 0.0]  # nothing read, nothing kept
        measured.append(tap.step())
    assert measured == [True, False, False, True, False, False] and len(tap.noise.calls) == 2
    state = tap.state_dict()
    again = PerExampleTap(model, every=3)
    again.load_state_dict(state)
    assert again.steps == 6 and again.measuring and again.noise.n_steps == 2
    tap.remove()
    again.remove()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0


def test_discard_and_torch_func_calls_leave_the_step_alone():
    model, x, y, loss = make("linear")
    small, _ = brute_force(model, x, y, loss)
    tap = PerExampleTap(model, RecordingNoiseScale())
    loss(model(x * 3), y).backward()  # e.g. SAM's second pass
    tap.discard()
    stale = loss(model(x * 2), y)
    tap.discard()
    stale.backward()  # a graph built before discard(): ignored
    model.zero_grad()
    out = model(x)
    brute_force(model, x, y, loss)  # torch.func forwards while a measured graph is pending
    loss(out, y).backward()
    assert tap.step() and tap.noise.calls[0][0] == pytest.approx(small, rel=1e-9)


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.reentrant = nn.Linear(6, 8), nn.Linear(8, 3), None  # None: no checkpoint

    def forward(self, x):
        inner = lambda h: torch.tanh(self.a(h))  # noqa: E731
        return self.b(inner(x) if self.reentrant is None else checkpoint(inner, x, use_reentrant=self.reentrant))


def test_activation_checkpointing_non_reentrant_works_reentrant_is_refused():
    _, x, y, loss = make("linear")
    model = Checkpointed().to(DT)
    small, _ = brute_force(model, x, y, loss)  # torch.func does not run checkpoints
    tap = PerExampleTap(model, RecordingNoiseScale())
    model.reentrant = False
    loss(model(x), y).backward()
    assert tap.step() and tap.noise.calls[0][0] == pytest.approx(small, rel=1e-9)
    model.reentrant = True
    model.zero_grad()
    loss(model(x.requires_grad_()), y).backward()
    with pytest.raises(HastenError, match="without its forward running"):
        tap.step()


class Extra(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.lin, self.emb = kind, nn.Linear(4, 4), nn.Embedding(5, 4)
        if kind == "parameter":
            self.scale = nn.Parameter(torch.ones(4))
        if kind == "attention":
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        if kind == "batchnorm":
            self.bn = nn.BatchNorm1d(4)

    def forward(self, ids):
        h = self.emb(ids)
        if self.kind == "parameter":
            h = h * self.scale
        if self.kind == "attention":
            h = self.attn(h, h, h)[0]
        if self.kind == "twice":
            h = self.lin(h)
        if self.kind == "tied_functional":
            return F.linear(self.lin(h), self.emb.weight)[:, -1]
        if self.kind == "weight_only":
            return F.linear(h, self.lin.weight)[:, -1]
        if self.kind == "linear_reuse":  # under autocast both uses share one cached bf16 copy of the weight
            return F.linear(self.lin(h), self.lin.weight)[:, -1]
        return self.lin(h)[:, -1]


@pytest.mark.parametrize("kind, match", [
    ("parameter", "'scale' \\(Extra\\)"),
    ("attention", "'attn.in_proj_weight'"),
    ("batchnorm", "BatchNorm couples the examples of a batch"),
])
def test_uncovered_parameters_are_refused_by_name(kind, match):
    model = Extra(kind)
    if kind != "batchnorm":
        assert uncovered_parameters(model)[0] == match.split("'")[1]
    with pytest.raises(HastenError, match=match):
        PerExampleTap(model)
    assert uncovered_parameters(Extra("plain")) == []


def test_tied_weights_are_refused():
    model = Extra("plain")
    model.head = nn.Linear(4, 5, bias=False)
    model.head.weight = model.emb.weight
    with pytest.raises(HastenError, match="shared by two layers \\(emb.weight = head.weight\\)"):
        PerExampleTap(model)


@pytest.mark.parametrize("kind, match, at_step", [
    ("twice", "'lin' ran twice in one backward", True),
    ("tied_functional", "'emb.weight' enters one forward's graph 2 times", False),
    ("linear_reuse", "'lin.weight' enters one forward's graph 2 times", False),
    ("weight_only", "without its forward running", True),
])
@pytest.mark.parametrize("autocast", [False, True])
def test_weight_sharing_is_refused_not_measured_wrong(kind, match, at_step, autocast):
    model = Extra(kind)
    tap = PerExampleTap(model)
    if kind == "twice":
        tap._graph_checked = True  # the backward-time check on its own (the graph check would fire first)
    ids, y = torch.randint(0, 5, (6, 3), generator=gen(5)), torch.randint(0, 4, (6,), generator=gen(6))
    with pytest.raises(HastenError, match=match):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids)
        F.cross_entropy(out.float(), y).backward()
        tap.step()
    assert not at_step or tap.steps == 1


def test_outputs_that_share_a_graph_are_not_mistaken_for_sharing():
    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            h = self.a(x)
            return {"hidden": h, "logits": self.b(h), "again": h * 2}

    model, x = Both(), torch.randn(6, 4, generator=gen(8))
    tap = PerExampleTap(model)
    F.cross_entropy(model(x)["logits"], torch.arange(6) % 3).backward()
    assert tap.step()


def test_a_layer_without_the_batch_dimension_is_refused():
    """The position embedding of arange(T) broadcast over the batch: its δ is summed over examples."""

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.head = nn.Embedding(5, 4), nn.Embedding(7, 4), nn.Linear(4, 5)

        def forward(self, ids):
            return self.head(self.tok(ids) + self.pos(torch.arange(ids.shape[1])))

    model, ids = Broadcast(), torch.randint(0, 5, (3, 7), generator=gen(7))
    tap = PerExampleTap(model)
    seq_cross_entropy(model(ids), ids).backward()
    with pytest.raises(HastenError, match="layers disagree on the examples in one backward"):
        tap.step()
