"""`hasten influence TASK run=RUN_DIR`: rank training examples by TracIn self-influence (likely mislabels first) and,
with ``test_index=i``, show the proponents and opponents of test example i; writes influence.html and CSVs.

The run must have been trained with ``keep_checkpoints=true``, so that RUN_DIR/checkpoints.jsonl lists every kept
checkpoint with its learning rate.
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from hasten.errors import HastenError

CHECKPOINTS_LOG = "checkpoints.jsonl"


@dataclass(frozen=True)
class InfluenceConfig:
    run: str = ""  # run directory of `hasten train TASK keep_checkpoints=true` (required)
    test_index: int = -1  # show the top proponents and opponents of this test example (-1 = none)
    k: int = 20  # examples shown per list
    layers: str = ""  # "" = all parameters, "last" = last Linear layer, or comma-separated module names
    projection_dim: int = 0  # 0 = exact scores; d = Gaussian random projection of gradients to d dimensions
    normalize: bool = False  # cosine-style proponents/opponents (gradients normalized at every checkpoint)
    batch_size: int = 512  # examples per gradient batch
    max_train: int = 0  # score only the first N training examples (0 = all)
    data: str = ""  # data location ("" = the run's)
    model: str = ""  # model variant ("" = the run's)
    device: str = ""  # torch device ("" = the run's if available, else cuda if available, else cpu)


def read_checkpoint_log(run_dir: Path) -> list[tuple[Path, float | None]]:
    """(path, lr) of every kept checkpoint, paths resolved against the run directory."""
    log = run_dir / CHECKPOINTS_LOG
    if not log.is_file():
        raise HastenError(f"no saved checkpoints in {run_dir}: train with keep_checkpoints=true")
    from hasten.report.html import read_jsonl

    rows = [r for r in read_jsonl(log) if isinstance(r, dict) and "path" in r]
    if not rows:
        raise HastenError(f"no saved checkpoints in {run_dir}: train with keep_checkpoints=true")
    out = []
    for row in sorted(rows, key=lambda r: r.get("step", 0)):
        path = Path(row["path"])
        out.append((path if path.is_absolute() else run_dir / path, row.get("lr")))
    return out


def run_influence(task_name: str, overrides: list[str]) -> Path:
    """Compute self-influence (and a test example's proponents/opponents); write the report; return its path."""
    from hasten.config import apply_overrides
    from hasten.train.rundir import lock_run_dir

    cfg = apply_overrides(InfluenceConfig(), overrides)
    if not cfg.run:
        raise HastenError("run=RUN_DIR is required: the directory of a run trained with keep_checkpoints=true")
    run_dir = Path(cfg.run)
    if not run_dir.is_dir():
        raise HastenError(f"run directory {run_dir} not found")
    with lock_run_dir(run_dir):  # it writes beside the run's files: not while a run writes there
        return _influence(task_name, cfg, run_dir)


def _influence(task_name: str, cfg: InfluenceConfig, run_dir: Path) -> Path:
    from hasten.influence.tracin import TracIn
    from hasten.tasks import get_task

    checkpoints = read_checkpoint_log(run_dir)
    saved = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    task = get_task(task_name)
    if saved.get("task", task.name) != task.name:
        raise HastenError(f"{run_dir} is a run of task {saved['task']!r}, not {task.name!r}")
    train, test = task.load(cfg.data or saved.get("data") or None)
    if cfg.test_index >= len(test):
        raise HastenError(f"test_index={cfg.test_index} but the test set has {len(test)} examples (0..{len(test) - 1})")
    model = task.make_model(cfg.model or saved.get("model") or None).to(_device(cfg.device or saved.get("device", "")))
    layers = None if not cfg.layers else "last" if cfg.layers == "last" else cfg.layers.split(",")
    tracin = TracIn(model, task.loss, checkpoints, layers=layers, projection_dim=cfg.projection_dim or None,
                    normalize=cfg.normalize, batch_size=cfg.batch_size)
    train_t = _tensors(train)
    if cfg.max_train > 0:
        train_t = (train_t[0][: cfg.max_train], train_t[1][: cfg.max_train])
    scores = tracin.self_influence(train_t).cpu()
    losses, preds = _final_outputs(model, task.loss, checkpoints[-1][0], train_t, cfg.batch_size)
    order = torch.argsort(scores, descending=True)
    columns = [scores.tolist(), [_label(t) for t in train_t[1]], [_label(p) for p in preds], losses.tolist()]
    _write_csv(run_dir / "influence_self.csv", ["rank", "index", "self_influence", "target", "predicted", "loss"],
               ([r, i, *(c[i] for c in columns)] for r, i in enumerate(order.tolist())))
    report = _report(task, cfg, run_dir, checkpoints, train_t, scores, order, losses, preds)
    print(f"self-influence of {len(scores)} training examples over {len(checkpoints)} checkpoints; "
          f"most likely mislabeled: {', '.join(str(int(i)) for i in order[:5])}")
    if cfg.test_index >= 0:
        x, y = test[cfg.test_index]
        row = tracin.influence(train_t, (x.unsqueeze(0), torch.as_tensor(y).unsqueeze(0)))[0].cpu()
        _write_csv(run_dir / f"influence_test{cfg.test_index}.csv", ["index", "score", "target"],
                   ([int(i), float(row[i]), _label(train_t[1][i])] for i in torch.argsort(row, descending=True)))
        _test_section(report, task, cfg, (x, y), row, train_t)
    path = report.write(run_dir / "influence.html")
    print(f"report: {path}")
    return path


def _device(name: str) -> torch.device:
    if name and (not name.startswith("cuda") or torch.cuda.is_available()):
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "tensors"):
        return data.tensors[0], data.tensors[1]
    x, y = torch.utils.data.default_collate([data[i] for i in range(len(data))])
    return x, y


@torch.no_grad()
def _final_outputs(model, loss_fn, last_checkpoint, data, batch_size):
    """Per-example loss and prediction at the last checkpoint (for the report and the CSV)."""
    from hasten.influence.checkpoints import read_state_dict

    model.load_state_dict(read_state_dict(last_checkpoint))
    model.eval()
    device = next(model.parameters()).device
    losses, preds = [], []
    for s in range(0, len(data[1]), batch_size):
        x, y = data[0][s : s + batch_size].to(device), data[1][s : s + batch_size].to(device)
        out = model(x)
        try:
            losses.append(torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y).cpu())
        except RuntimeError:  # a loss torch.func cannot batch: one example at a time
            losses.append(torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(len(y))]).cpu())
        preds.append(out.argmax(-1).cpu())
    return torch.cat(losses), torch.cat(preds)


def _label(y: torch.Tensor) -> str | int:
    return int(y) if y.numel() == 1 else "seq"


def _write_csv(path: Path, header: list[str], rows) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def _show(report, task, items: list[tuple[torch.Tensor, str]]) -> None:
    """Examples as images (image tasks), line plots (sequence tasks) or text (text tasks)."""
    if task.kind == "image":
        report.image_grid([(_as_image(x), caption) for x, caption in items])
    elif task.kind == "text":
        report.table([{"example": caption, "text": _as_text(x)} for x, caption in items])
    else:
        import matplotlib.pyplot as plt

        cols = 5
        rows = math.ceil(len(items) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 1.4 * rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (x, caption) in zip(axes.flat, items):
            ax.plot(x.flatten().float().numpy(), lw=1)
            ax.set_title(caption, fontsize=7)
        report.figure(fig)


def _as_image(x: torch.Tensor):
    x = x.detach().float().cpu()
    side = math.isqrt(x.numel())
    if side * side == x.numel():
        return x.reshape(side, side).numpy()
    side = math.isqrt(x.numel() // 3)
    if 3 * side * side == x.numel():  # (3, H, W) colour
        img = x.reshape(3, side, side).permute(1, 2, 0)
        return ((img - img.min()) / (img.max() - img.min() + 1e-12)).numpy()
    return x.reshape(1, -1).numpy()


def _as_text(x: torch.Tensor) -> str:
    values = x.flatten().tolist()
    if all(isinstance(v, int) and 0 <= v < 256 for v in values):
        return bytes(values).decode("utf-8", errors="replace")
    return " ".join(str(v) for v in values)


def _report(task, cfg, run_dir, checkpoints, data, scores, order, losses, preds):
    from hasten.report.html import Report

    report = Report(f"hasten influence: {task.name}")
    report.text(f"Run {run_dir}: {len(checkpoints)} checkpoints (learning rates "
                f"{', '.join(f'{lr:.3g}' for _, lr in checkpoints if lr is not None)}), {len(scores)} training "
                f"examples, parameters: {cfg.layers or 'all'}, "
                f"{'projection to ' + str(cfg.projection_dim) + ' dimensions' if cfg.projection_dim else 'exact'}.")
    report.text("TracInCP (Pruthi et al. 2020): influence of training example z on test example z' is "
                "Σᵢ ηᵢ ∇ℓ(wᵢ, z)·∇ℓ(wᵢ, z') over the saved checkpoints wᵢ with learning rates ηᵢ. Self-influence "
                "Σᵢ ηᵢ‖∇ℓ(wᵢ, z)‖² is high for examples the model struggled to fit: mislabeled or atypical ones. "
                "Scores: influence_self.csv.", cls="note")
    report.heading(f"Highest self-influence: check these {min(cfg.k, len(order))} labels first")
    top = order[: cfg.k]
    _show(report, task, [(data[0][i], f"#{int(i)} y={_label(data[1][i])} p={_label(preds[i])}") for i in top])
    report.table([{"rank": r + 1, "index": int(i), "self-influence": float(scores[i]), "target": _label(data[1][i]),
                   "predicted": _label(preds[i]), "final loss": float(losses[i])} for r, i in enumerate(top)])
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    positive = scores[scores > 0]
    ax.hist(positive.log10().numpy() if len(positive) else [], bins=50)
    ax.set_xlabel("log10 self-influence")
    ax.set_ylabel("training examples")
    report.figure(fig, "Distribution of self-influence: mislabeled examples sit in the right tail.")
    return report


def _test_section(report, task, cfg, example, row, data) -> None:
    x, y = example
    report.heading(f"Test example {cfg.test_index} (target {_label(torch.as_tensor(y))})")
    _show(report, task, [(x, f"test #{cfg.test_index} y={_label(torch.as_tensor(y))}")])
    k = min(cfg.k, len(row))
    lists = (("Proponents (training examples that most reduced its loss)", torch.argsort(row, descending=True)[:k]),
             ("Opponents (training examples that most increased its loss)", torch.argsort(row)[:k]))
    for title, idx in lists:
        report.heading(title)
        _show(report, task, [(data[0][i], f"#{int(i)} y={_label(data[1][i])} {float(row[i]):.3g}") for i in idx])
        report.table([{"index": int(i), "score": float(row[i]), "target": _label(data[1][i])} for i in idx])
    if cfg.normalize:
        report.text("Scores are normalized: gradients divided by their norm at every checkpoint.", cls="note")


__all__ = ["InfluenceConfig", "read_checkpoint_log", "run_influence"]
