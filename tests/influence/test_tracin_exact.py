"""TracIn scores against a brute-force loop over single-example gradients (float64)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hasten.errors import HastenError
from hasten.influence import GaussianProjection, TracIn

DT = torch.float64


def brute_grads(model, checkpoints, x, y, names=None, loss_fn=F.cross_entropy):
    """[(lr, G)] with G (n, p): autograd of loss_fn on each single example at each checkpoint."""
    out = []
    for state, lr in checkpoints:
        model.load_state_dict(state)
        model.eval()
        params = [p for k, p in model.named_parameters() if names is None or k in names]
        rows = []
        for i in range(len(y)):
            grads = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            rows.append(torch.cat([g.flatten() for g in grads]))
        out.append((lr, torch.stack(rows)))
    return out


def brute_scores(model, checkpoints, train, test, names=None, normalize=False):
    tr, te = brute_grads(model, checkpoints, *train, names), brute_grads(model, checkpoints, *test, names)
    unit = (lambda g: g / g.norm(dim=1, keepdim=True)) if normalize else (lambda g: g)
    influence = sum(lr * unit(gt) @ unit(g).T for (lr, g), (_, gt) in zip(tr, te))
    return influence, sum(lr * g.square().sum(1) for lr, g in tr)


def snapshots(make, n=3):
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(({k: v.clone() for k, v in make().state_dict().items()}, 0.05 * (i + 1)))
    return out


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(inplace=True), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)).to(DT)


def data(n, d, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


TRAIN, TEST = data(23, 6), data(7, 6, seed=1)


def test_mlp_influence_and_self_influence_equal_brute_force():
    model, ckpts = mlp(), snapshots(mlp)
    tracin = TracIn(model, F.cross_entropy, ckpts, batch_size=5)  # several train and test batches
    influence, self_inf = brute_scores(model, ckpts, TRAIN, TEST)
    torch.testing.assert_close(tracin.influence(TRAIN, TEST), influence, rtol=1e-4, atol=0)
    torch.testing.assert_close(tracin.self_influence(TRAIN), self_inf, rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.diagonal(tracin.influence(TRAIN, TRAIN)), tracin.self_influence(TRAIN))


def test_last_layer_and_named_layers_equal_brute_force_on_those_parameters():
    model, ckpts = mlp(), snapshots(mlp)
    last = TracIn(model, F.cross_entropy, ckpts, layers="last")
    assert list(last.linear) == ["4"] and not last.dense
    influence, self_inf = brute_scores(model, ckpts, TRAIN, TEST, names={"4.weight", "4.bias"})
    torch.testing.assert_close(last.influence(TRAIN, TEST), influence, rtol=1e-4, atol=0)
    torch.testing.assert_close(last.self_influence(TRAIN), self_inf, rtol=1e-4, atol=0)
    named = TracIn(model, F.cross_entropy, ckpts, layers=["0", "4"])
    influence, _ = brute_scores(model, ckpts, TRAIN, TEST, names={"0.weight", "0.bias", "4.weight", "4.bias"})
    torch.testing.assert_close(named.influence(TRAIN, TEST), influence, rtol=1e-4, atol=0)


class ConvNet(nn.Module):
    """Conv + LayerNorm (torch.func path) before a Linear head (Gram path)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv1d(1, 3, 3), nn.LayerNorm(12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.norm(torch.relu(self.conv(x.unsqueeze(1))).flatten(1)))


class SeqNet(nn.Module):
    """Linear layers applied at every position (the (t, t') sum and the dense form) and one module used twice."""

    def __init__(self, t=2, width=16):
        super().__init__()
        self.t = t
        self.embed = nn.Linear(8, width)  # t=2, 8→16: the (t, t') sum is cheaper
        self.wide = nn.Linear(width, 2, bias=False)  # used twice per example -> 2t positions: dense is cheaper
        self.head = nn.Linear(4 * t, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x.view(len(x), self.t, 8)))
        return self.head(torch.cat([self.wide(h), self.wide(h * h)], 1).flatten(1))


@pytest.mark.parametrize("make, dim", [(ConvNet, 6), (SeqNet, 16), (lambda: nn.Linear(6, 3), 6)])
def test_other_layer_types_equal_brute_force(make, dim):
    from hasten.measure.ghost import prefer_dense

    assert not prefer_dense(2, 8, 16, True) and prefer_dense(4, 16, 2, False)  # SeqNet exercises both forms
    make_dt = lambda: make().to(DT)  # noqa: E731
    model, ckpts = make_dt(), snapshots(make_dt, 2)
    train, test = data(11, dim, seed=2), data(4, dim, seed=3)
    tracin = TracIn(model, F.cross_entropy, ckpts, batch_size=4)
    influence, self_inf = brute_scores(model, ckpts, train, test)
    torch.testing.assert_close(tracin.influence(train, test), influence, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(tracin.self_influence(train), self_inf, rtol=1e-4, atol=1e-12)
    if make is ConvNet:
        assert set(tracin.dense) == {"conv.weight", "conv.bias", "norm.weight", "norm.bias"}


def test_tied_weights_fall_back_to_per_example_gradients():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)
            self.c = self.a  # the same Linear reachable under two names and called twice

        def forward(self, x):
            return self.b(torch.tanh(self.c(torch.tanh(self.a(x)))))

    make = lambda: Tied().to(DT)  # noqa: E731
    model, ckpts = make(), snapshots(make, 2)
    tracin = TracIn(model, F.cross_entropy, ckpts)
    influence, _ = brute_scores(model, ckpts, TRAIN, TEST)
    torch.testing.assert_close(tracin.influence(TRAIN, TEST), influence, rtol=1e-4, atol=0)


def test_normalize_is_cosine_per_checkpoint():
    model, ckpts = mlp(), snapshots(mlp)
    tracin = TracIn(model, F.cross_entropy, ckpts, normalize=True, batch_size=8)
    influence, _ = brute_scores(model, ckpts, TRAIN, TEST, normalize=True)
    torch.testing.assert_close(tracin.influence(TRAIN, TEST), influence, rtol=1e-4, atol=0)
    assert tracin.influence(TRAIN, TEST).abs().max() <= sum(lr for _, lr in ckpts) + 1e-9


def test_projection_equals_projecting_brute_force_gradients():
    model, ckpts = mlp(), snapshots(mlp)
    tracin = TracIn(model, F.cross_entropy, ckpts, projection_dim=32, seed=7, batch_size=6)
    p = GaussianProjection(32, seed=7).matrix({k: v.numel() for k, v in model.named_parameters()}).to(DT)
    tr, te = brute_grads(model, ckpts, *TRAIN), brute_grads(model, ckpts, *TEST)
    influence = sum(lr * (gt @ p.T) @ (g @ p.T).T for (lr, g), (_, gt) in zip(tr, te))
    torch.testing.assert_close(tracin.influence(TRAIN, TEST), influence, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(tracin.self_influence(TRAIN), sum(lr * (g @ p.T).square().sum(1) for lr, g in tr))


def test_map_style_dataset_gives_the_same_scores():
    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return len(TRAIN[1])

        def __getitem__(self, i):
            return TRAIN[0][i], TRAIN[1][i]

    model, ckpts = mlp(), snapshots(mlp)
    tracin = TracIn(model, F.cross_entropy, ckpts, batch_size=10)
    torch.testing.assert_close(tracin.influence(Pairs(), TEST), tracin.influence(TRAIN, TEST))
    dataset = torch.utils.data.TensorDataset(*TRAIN)
    torch.testing.assert_close(tracin.self_influence(dataset), tracin.self_influence(TRAIN))


def test_top_k_proponents_and_opponents():
    model, ckpts = mlp(), snapshots(mlp)
    tracin = TracIn(model, F.cross_entropy, ckpts)
    scores = tracin.influence(TRAIN, TEST)
    idx, val = tracin.top_k(TRAIN, TEST, 4)
    torch.testing.assert_close(val, scores.gather(1, idx))
    assert (val[:, :-1] >= val[:, 1:]).all() and (val[:, -1:] >= scores.sort(1).values[:, -5:-4]).all()
    idx, val = tracin.top_k(TRAIN, TEST, 4, proponents=False)
    torch.testing.assert_close(val, scores.sort(1).values[:, :4])
    assert tracin.top_k(TRAIN, TEST, 100)[0].shape == (7, 23)


def test_path_checkpoints_and_model_restored(tmp_path):
    from hasten.train.checkpoint import save_checkpoint

    model, ckpts = mlp(), snapshots(mlp)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    torch.save(ckpts[0][0], tmp_path / "plain.pt")
    torch.save({"model": {f"module.{k}": v for k, v in ckpts[1][0].items()}}, tmp_path / "ddp.pt")
    save_checkpoint(tmp_path / "hasten.pt", {"model": ckpts[2][0], "step": 3})
    paths = [(tmp_path / "plain.pt", ckpts[0][1]), (str(tmp_path / "ddp.pt"), ckpts[1][1]),
             (tmp_path / "hasten.pt", torch.tensor(ckpts[2][1]))]
    torch.testing.assert_close(TracIn(model, F.cross_entropy, paths).self_influence(TRAIN),
                               TracIn(model, F.cross_entropy, ckpts).self_influence(TRAIN))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_batchnorm_in_eval_mode_is_fine_without_running_statistics_is_an_error():
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(DT)  # noqa: E731
    model, ckpts = make(), snapshots(make, 2)
    for state, _ in ckpts:
        state["1.running_mean"].uniform_(-1, 1)
        state["1.running_var"].uniform_(0.5, 2)
    influence, _ = brute_scores(model, ckpts, TRAIN, TEST)
    torch.testing.assert_close(TracIn(model, F.cross_entropy, ckpts).influence(TRAIN, TEST), influence)
    bad = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.Linear(8, 3))
    with pytest.raises(HastenError, match="BatchNorm layer '1'"):
        TracIn(bad, F.cross_entropy, [(bad.state_dict(), 0.1)])


def test_bad_inputs_are_one_line_errors(tmp_path):
    model, ckpts = mlp(), snapshots(mlp)
    other = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 5)).to(DT)
    cases = [
        (lambda: TracIn(model, F.cross_entropy, [(other.state_dict(), 0.1)]),
         "checkpoint 0 does not fit the model: key '4.weight' is missing"),
        (lambda: TracIn(model, F.cross_entropy, [(ckpts[0][0], 0.1), ckpts[1][0]]),
         "checkpoint 1 has no learning rate"),
        (lambda: TracIn(model, F.cross_entropy, [(ckpts[0][0], None)]), "no learning rate"),
        (lambda: TracIn(model, F.cross_entropy, [(ckpts[0][0], float("nan"))]), "finite"),
        (lambda: TracIn(model, F.cross_entropy, []), "no checkpoints"),
        (lambda: TracIn(model, F.cross_entropy, [(tmp_path / "missing.pt", 0.1)]), "not found"),
        (lambda: TracIn(model, F.cross_entropy, ckpts).influence((TRAIN[0][:0], TRAIN[1][:0]), TEST),
         "training dataset is empty"),
        (lambda: TracIn(model, F.cross_entropy, ckpts).self_influence((TRAIN[0][:0], TRAIN[1][:0])),
         "dataset is empty"),
        (lambda: TracIn(model, F.cross_entropy, ckpts, layers=["9"]), "no module named '9'"),
        (lambda: TracIn(model, F.cross_entropy, ckpts, projection_dim=0), "projection_dim"),
        (lambda: TracIn(model, F.cross_entropy, ckpts).top_k(TRAIN, TEST, 0), "k=0"),
        (lambda: TracIn(model, nn.CrossEntropyLoss(reduction="none"), ckpts).self_influence(TRAIN), "mean loss"),
    ]
    torch.save({k: v[:, :3] if v.dim() == 2 else v for k, v in ckpts[0][0].items()}, tmp_path / "narrow.pt")
    cases.append((lambda: TracIn(model, F.cross_entropy, [(tmp_path / "narrow.pt", 0.1)]).self_influence(TRAIN),
                  r"key '0.weight' has shape \(12, 3\)"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    cases.append((lambda: TracIn(model, F.cross_entropy, [(tmp_path / "junk.pt", 0.1)]).self_influence(TRAIN),
                  "cannot read checkpoint"))
    for make, message in cases:
        with pytest.raises(HastenError, match=message) as info:
            make()
        assert "\n" not in str(info.value)


def test_weight_used_outside_forward_is_detected():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)) + F.linear(x, self.a.weight))  # a.weight used a second way

    model = Functional().to(DT)
    with pytest.raises(HastenError, match="Linear layer 'a' gets gradient from outside"):
        TracIn(model, F.cross_entropy, [(model.state_dict(), 0.1)]).self_influence(TRAIN)
