"""Where a run's numbers go: ``metrics.jsonl`` (one JSON object per step), TensorBoard event files under ``tb/``
(every ``TB_EVERY``-th step and every evaluated step), a progress bar on a terminal and a one-line summary at each
evaluation.

TensorBoard gets one step in ``TB_EVERY`` because writing an event costs ~0.14 ms of Python (protobuf, a queue, a
CRC in pure Python), 3% of a 5 ms step, against ~0.01 ms for the JSONL row; Lightning's loggers likewise write
every ``log_every_n_steps`` (50) steps. ``metrics.jsonl`` keeps every step.

Non-finite values are written as ``null`` so the file stays standard JSON.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from hasten.train.checkpoint import write_atomic

METRICS = "metrics.jsonl"
TB_EVERY = 10  # TensorBoard gets every 10th step and every evaluated step


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL file; a last line cut short by a crash is dropped."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return rows


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Keep only the rows with ``step <= last_step`` (the steps a resumed run will not replay)."""
    path = Path(path)
    if path.exists():
        kept = [row for row in read_jsonl(path) if row.get("step", 0) <= last_step]
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in kept).encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def summary_line(row: dict, total_steps: int) -> str:
    """``step 200/1000 | loss 0.4312 | eval/loss 0.3901 | eval/accuracy 0.8850 | noise/b_simple 312.4 | 12.3 s``"""
    parts = [f"step {row['step']}/{total_steps}"]
    for key in ("train/loss", "eval/loss"):
        if row.get(key) is not None:
            parts.append(f"{key.removeprefix('train/')} {row[key]:.4g}")
    parts += [f"{k} {v:.4g}" for k, v in row.items() if k.startswith("eval/") and k != "eval/loss" and v is not None]
    if row.get("noise/b_simple") is not None:  # its upper bound is logged as None (inf) until it is measurable
        measurable = row.get("noise/b_simple_hi", 0.0) is not None
        parts.append(f"B_simple {row['noise/b_simple']:.4g}" if measurable else "B_simple not measurable yet")
    parts.append(f"{row.get('time', 0.0):.1f} s")
    return " | ".join(parts)


class RunLogger:
    """Writes each step's row to JSONL (and one in ``TB_EVERY`` to TensorBoard) and advances the progress bar.

    Args:
        run_dir: the run's folder (``metrics.jsonl`` is appended to; truncate it first when resuming). A ``tb/``
            already there is this run's (:func:`hasten.train.rundir.prepare_run_dir` checked): it is rebuilt from
            ``metrics.jsonl`` (truncated to the step the run resumes from), so a killed run's replayed steps are not
            duplicated. (TensorBoard's ``purge_step`` relies on event files sorting by name in time order, which
            fails when two writers of one process open files in the same second.)
        total_steps, start_step: for the progress bar.
        progress: show a rich progress bar (only when stdout is a terminal).
    """

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, progress: bool = True):
        from tensorboard.compat.proto.summary_pb2 import Summary  # imported here: they are slow to import
        from torch.utils.tensorboard import SummaryWriter

        self._summary = Summary
        self.run_dir, self.total_steps = Path(run_dir), total_steps
        self.file = open(self.run_dir / METRICS, "a")
        rebuild = (self.run_dir / "tb").exists()
        if rebuild:
            shutil.rmtree(self.run_dir / "tb")
        self.writer = SummaryWriter(str(self.run_dir / "tb"))
        for row in read_jsonl(self.run_dir / METRICS) if rebuild else ():
            self._tensorboard(row)
        self.bar = self.console = None
        if progress and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
            )
            self.console = self.bar.console
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, info="")
            self.bar.start()

    def log(self, row: dict) -> None:
        row = {k: _clean(v) for k, v in row.items()}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        step = row["step"]
        self._tensorboard(row)
        if self.bar is not None:
            loss = row.get("train/loss")
            self.bar.update(self.task, completed=step, info="" if loss is None else f"loss {loss:.4g}")
        if any(k.startswith("eval/") for k in row):
            line = summary_line(row, self.total_steps)
            if self.console is not None:
                self.console.print(line, highlight=False)  # above the bar
            else:
                print(line, flush=True)

    def _tensorboard(self, row: dict) -> None:
        if row["step"] % TB_EVERY and not any(k.startswith("eval/") for k in row):
            return
        # One event per step holding every scalar: an event per scalar (add_scalar) costs ~13x more queue traffic.
        values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.writer.file_writer.add_summary(self._summary(value=values), row["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.writer.close()
        self.file.close()

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Stopwatch:
    """Wall-clock seconds that carry over a resume (``offset`` = time spent before the checkpoint)."""

    def __init__(self, offset: float = 0.0):
        self.start, self.offset = time.perf_counter(), offset

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start
