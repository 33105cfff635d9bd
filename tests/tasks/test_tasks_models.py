"""Model shapes, loss/metric against hand computations, a short digits run, and the registry."""
import subprocess
import sys

import pytest
import torch

from hasten.config import apply_overrides
from hasten.errors import HastenError
from hasten.tasks import TASKS, get_task, register, task_table
from hasten.tasks.models import CharTransformer, accuracy, cross_entropy
from hasten.train.config import TrainConfig

INPUTS = {  # an input batch of each task's shape, so shapes are checked without the data
    "digits": torch.rand(3, 64),
    "fashion": torch.randn(3, 1, 28, 28),
    "mnist1d": torch.randn(3, 40),
    "shakespeare": torch.randint(0, 256, (3, 128)),
}
OUTPUTS = {"digits": (3, 10), "fashion": (3, 10), "mnist1d": (3, 10), "shakespeare": (3, 128, 256)}


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_model_output_shape(name):
    task = get_task(name)
    for variant in task.models:
        torch.manual_seed(0)
        out = task.make_model(variant)(INPUTS[name])
        assert out.shape == OUTPUTS[name] and torch.isfinite(out).all()
        targets = torch.randint(0, out.shape[-1], out.shape[:-1])
        assert task.loss(out, targets).shape == () and task.metric(out, targets).shape == (3,)


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = CharTransformer(vocab=256, block_size=16, dim=32, heads=4, layers=2)
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 9] = (x[:, 9] + 1) % 256
    a, b = model(x), model(changed)
    assert torch.allclose(a[:, :9], b[:, :9], atol=1e-6)  # earlier positions cannot see position 9
    assert not torch.allclose(a[:, 9:], b[:, 9:])
    assert model(x[:, :5]).shape == (2, 5, 256)
    with pytest.raises(ValueError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_and_metric_by_hand():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]], [[0.0, 0.0, 5.0], [1.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 1], [2, 2]])
    logp = logits.log_softmax(-1)
    by_hand = -(logp[0, 0, 0] + logp[0, 1, 1] + logp[1, 0, 2] + logp[1, 1, 2]) / 4
    assert torch.allclose(cross_entropy(logits, targets), by_hand)
    assert accuracy(logits, targets).tolist() == [0.5, 0.5]  # per-example mean token accuracy
    assert accuracy(logits[:, 0], targets[:, 0]).tolist() == [1.0, 1.0]


@pytest.fixture
def one_thread():
    # a tiny MLP: one thread avoids OpenMP barrier stalls on a busy 2-core machine (measured 0.4 s vs 10 s)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_learns_with_plain_torch(one_thread):
    task = get_task("digits")
    train, test = task.load(None)
    x, y = train.tensors
    torch.manual_seed(0)
    model = task.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=task.defaults["lr"], momentum=task.defaults["momentum"])
    first = task.loss(model(x), y).item()
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        task.loss(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        last = task.loss(model(x), y).item()
        acc = task.metric(model(test.tensors[0]), test.tensors[1]).mean().item()
    assert first > 2.0 and last < first / 10  # starts near ln 10 ≈ 2.3
    assert acc > 0.9


def test_registry_and_table():
    rows = task_table()
    assert [r["name"] for r in rows] == list(TASKS) and set(TASKS) >= {"digits", "fashion", "mnist1d", "shakespeare"}
    builtin = {"digits", "fashion", "mnist1d", "shakespeare"}  # other tests may register small tasks of their own
    for row in (r for r in rows if r["name"] in builtin):
        assert set(row) == {"name", "description", "size", "models", "data_present", "data_hint"}
        assert isinstance(row["data_present"], bool) and row["models"] and row["size"]
    with pytest.raises(HastenError, match="digits, fashion, mnist1d, shakespeare"):
        get_task("imagenet")
    with pytest.raises(HastenError, match="did you mean 'digits'"):
        get_task("digit")
    with pytest.raises(HastenError, match="already registered"):
        register(get_task("fashion").__class__(**{**get_task("fashion").__dict__}))
    with pytest.raises(HastenError, match="no model"):
        get_task("digits").make_model("resnet")


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_defaults_are_valid_train_config_keys(name):
    task = get_task(name)
    cfg = apply_overrides(TrainConfig(task=name), task.defaults)
    assert cfg.steps > 0 and cfg.batch_size > 0 and task.kind in ("image", "sequence", "text")


def test_import_reads_no_data():
    code = "import sys, hasten.tasks; print(any(m in sys.modules for m in ('sklearn', 'mnist1d')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
