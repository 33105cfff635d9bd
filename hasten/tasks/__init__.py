"""The task registry: built-in tasks by name, and `register` for your own.

Importing this module reads no data: each task loads (and caches in-process) on its first ``task.load(path)``.

>>> from hasten.tasks import get_task
>>> task = get_task("digits")
>>> train, test = task.load(None)
>>> task.make_model()(train.tensors[0][:2]).shape
torch.Size([2, 10])
"""
from __future__ import annotations

import difflib
import sys
from typing import Any

from hasten.errors import HastenError
from hasten.tasks import digits, fashion, mnist1d_task, shakespeare, shakespeare_mlm
from hasten.tasks.base import Task

TASKS: dict[str, Task] = {}
_ORIGINS: dict[str, str] = {}  # task name -> the module that registered it (study workers import it again)


def register(task: Task, replace: bool = False) -> Task:
    """Add ``task`` under its name; registering a taken name is an error unless ``replace``.

    Its ``load`` may return any map-style dataset of ``(input, target)`` pairs, e.g. files read when indexed:

    >>> import torch, torch.nn.functional as F
    >>> class Squares(torch.utils.data.Dataset):   # stands in for files on disk: item i is made when asked for
    ...     def __len__(self): return 8
    ...     def __getitem__(self, i): return torch.tensor([i / 8.0]), i % 2
    >>> task = register(Task("squares", "toy", load=lambda path: (Squares(), Squares()),
    ...                      models={"linear": lambda: torch.nn.Linear(1, 2)}, loss=F.cross_entropy,
    ...                      metric=lambda out, y: (out.argmax(1) == y).float()))
    >>> get_task("squares") is task
    True
    >>> del TASKS["squares"]
    """
    if task.name in TASKS and not replace and TASKS[task.name] is not task:
        raise HastenError(f"a task named {task.name!r} is already registered; pick another name or replace=True")
    TASKS[task.name] = task
    _ORIGINS[task.name] = sys._getframe(1).f_globals.get("__name__", "")
    return task


def task_origin(name: str) -> str:
    """The module that registered task ``name`` ("__main__" for a script; "" if unknown)."""
    return _ORIGINS.get(name, "")


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name raises :class:`HastenError` listing the known ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HastenError(f"unknown task {name!r}; {hint}choose one of: {', '.join(TASKS)}")
    return TASKS[name]


def task_table() -> list[dict[str, Any]]:
    """One row per task for `hasten tasks`: name, description, size, models, data_present, data_hint."""
    rows = []
    for task in TASKS.values():
        try:
            present = bool(task.available(None))
        except Exception:  # a user task's check that fails means the data is not usable
            present = False
        rows.append(dict(name=task.name, description=task.description, size=task.size, models=list(task.models),
                         data_present=present, data_hint=task.data_hint))
    return rows


for _module in (digits, fashion, mnist1d_task, shakespeare, shakespeare_mlm):
    register(_module.TASK)

__all__ = ["TASKS", "Task", "get_task", "register", "task_origin", "task_table"]
