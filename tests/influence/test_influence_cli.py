"""`hasten influence TASK run=RUN_DIR`: reads the run's checkpoint log, writes the report and CSVs."""
import csv
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from hasten.errors import HastenError
from hasten.influence import TracIn
from hasten.influence.run import run_influence
from hasten.tasks import get_task, register
from hasten.tasks.base import Task
from hasten.train.checkpoint import save_checkpoint


def fake_run(tmp_path, task, lrs=(0.1, 0.05, 0.01), **config):
    """A run directory as `hasten train keep_checkpoints=true` leaves it: checkpoint files, their log, config.json."""
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    for step, lr in enumerate(lrs, 1):
        torch.manual_seed(step)
        save_checkpoint(run / f"checkpoint-step{step}.pt", {"model": task.make_model().state_dict(), "step": step})
        lines.append(json.dumps({"step": step, "path": f"checkpoint-step{step}.pt", "lr": lr}))
    (run / "checkpoints.jsonl").write_text("\n".join(lines) + "\n")
    (run / "config.json").write_text(json.dumps({"task": task.name, "model": "", "data": "", **config}))
    return run


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_digits_report_and_scores(tmp_path):
    task = get_task("digits")
    run = fake_run(tmp_path, task)
    path = run_influence("digits", [f"run={run}", "test_index=2", "k=5", "max_train=300"])
    assert path == run / "influence.html"
    html = path.read_text()
    assert html.count("data:image/png") >= 4 and "Proponents" in html and "Opponents" in html
    rows = read_csv(run / "influence_self.csv")
    train, test = task.load(None)
    x, y = train.tensors[0][:300], train.tensors[1][:300]
    checkpoints = [(run / f"checkpoint-step{s}.pt", lr) for s, lr in zip((1, 2, 3), (0.1, 0.05, 0.01))]
    tracin = TracIn(task.make_model(), task.loss, checkpoints)
    expected = tracin.self_influence((x, y))
    assert len(rows) == 300 and [int(r["index"]) for r in rows] == torch.argsort(expected, descending=True).tolist()
    torch.testing.assert_close(torch.tensor([float(r["self_influence"]) for r in rows]),
                               expected.sort(descending=True).values, rtol=1e-5, atol=0)
    scores = tracin.influence((x, y), (test.tensors[0][2:3], test.tensors[1][2:3]))[0]
    top = read_csv(run / "influence_test2.csv")
    assert int(top[0]["index"]) == int(scores.argmax()) and int(top[-1]["index"]) == int(scores.argmin())


def test_text_task_shows_text(tmp_path):
    torch.manual_seed(0)
    tokens = torch.randint(97, 123, (40, 9))  # lowercase letters
    data = TensorDataset(tokens[:, :-1], tokens[:, 1:])
    task = register(Task(
        name="influence-toy-text", description="toy", load=lambda path: (data, data),
        models={"tiny": lambda: nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256))},
        loss=lambda out, y: F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1)),
        metric=lambda out, y: (out.argmax(-1) == y).float().mean(1), kind="text"), replace=True)
    run = fake_run(tmp_path, task)
    html = run_influence(task.name, [f"run={run}", "k=3", "test_index=0"]).read_text()
    assert bytes(tokens[0, :-1].tolist()).decode() in html  # the test example, shown as text


def test_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HastenError, match="no saved checkpoints in .*: train with keep_checkpoints=true"):
        run_influence("digits", [f"run={tmp_path / 'empty'}"])
    with pytest.raises(HastenError, match="run=RUN_DIR is required"):
        run_influence("digits", [])
    with pytest.raises(HastenError, match="unknown key 'tests_index'"):
        run_influence("digits", ["tests_index=1"])
    run = fake_run(tmp_path, get_task("digits"))
    with pytest.raises(HastenError, match="test_index=999 but the test set has 360"):
        run_influence("digits", [f"run={run}", "test_index=999", "max_train=50"])
    with pytest.raises(HastenError, match="is a run of task 'digits', not 'fashion'"):
        run_influence("fashion", [f"run={run}"])
