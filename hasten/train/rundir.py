"""A run directory: held by one process at a time, and never emptied to make room for a run.

**Lock.** ``with lock_run_dir(path):`` holds ``path/hasten.lock`` (``fcntl.flock``, the holder's PID written in it)
for as long as a command writes there. Every command takes it (train, noise-scale, study, tradeoff, influence) and
so does :func:`hasten.fit`; a second process gets one line naming the holder's PID. The kernel drops a flock when
its process dies, so a killed run never blocks its rerun. The lock is re-entrant within a process (the CLI holds
it around ``fit``, which takes it too); under torchrun only rank 0 takes it (the other ranks write nothing).

**Preparation.** :func:`prepare_run_dir` decides what a run does with what it finds, the same way on every rank:

- ``checkpoint-latest.pt``: resume from it (metrics rows after its step are dropped: the run replays them).
- no latest, but kept ``checkpoint-step<N>.pt`` files: resume from the newest, and say so.
- run outputs but no checkpoint: a run of the same settings that stopped before its first checkpoint starts over
  from step 0 (it has nothing to resume from and nothing is lost); otherwise it stops with one line.
- files that are not a hasten run: it stops with one line and touches nothing.

Nothing a run wrote is ever deleted: only temporary files of writes killed midway (partial copies, never results).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

from hasten.errors import HastenError
from hasten.train import distributed as dist
from hasten.train.checkpoint import CorruptCheckpoint, load_checkpoint, stale_temp_files
from hasten.train.config import TrainConfig
from hasten.train.logger import METRICS, read_jsonl, truncate_jsonl

LOCK = "hasten.lock"
CHECKPOINT = "checkpoint-latest.pt"
CHECKPOINTS_LOG = "checkpoints.jsonl"  # with keep_checkpoints: {step, path, lr} per kept copy (for TracIn)
CONFIG = "config.json"
KEPT = re.compile(r"checkpoint-step(\d+)\.pt")
# What a run leaves beside its checkpoints: a folder holding any of these holds a run.
OUTPUTS = (CONFIG, METRICS, CHECKPOINTS_LOG, "tb", "summary.json", "report.html")
# Files that may be there before a run starts: the lock, and a study trial's log of its attempts and output.
BEFORE_RUN = (LOCK, "attempts.jsonl", "train.log")
# Settings that may differ between a run and its resume: they do not change the training (device and threads
# may change the last bits of the numbers).
RESUMABLE_CHANGES = {"progress", "threads", "run_dir", "data", "device", "eval_every", "eval_examples",
                     "checkpoint_every", "keep_checkpoints", "data_workers", "pin_memory"}

_held: dict[Path, list] = {}  # resolved run dir -> [lock file descriptor, depth]: this process's locks
_guard = threading.Lock()


@contextlib.contextmanager
def lock_run_dir(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir`` (created if missing) for this process; yields it. Another process holding it: one-line
    :class:`HastenError`. On release the lock file goes, and so do the folders this call created if still empty
    (a command stopped by bad input leaves nothing behind)."""
    path = Path(run_dir)
    if not dist.is_main():
        yield path
        return
    if path.exists() and not path.is_dir():
        raise HastenError(f"run_dir {path} is a file: use a folder")
    created = [p for p in (path, *path.parents) if not p.exists()]  # deepest first
    key = path.resolve()
    with _guard:
        if key in _held:
            _held[key][1] += 1
        else:
            try:
                _held[key] = [_acquire(path), 1]
            except BaseException:
                _remove_empty(created)
                raise
    try:
        yield path
    finally:
        with _guard:
            _held[key][1] -= 1
            if not _held[key][1]:
                fd, _ = _held.pop(key)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path / LOCK)  # while still held: a process that opened it meanwhile sees it go
                os.close(fd)
        _remove_empty(created)


def _acquire(path: Path) -> int:
    import fcntl

    lock = path / LOCK
    for _ in range(100):
        try:
            path.mkdir(parents=True, exist_ok=True)  # again: a holder that made it removes it on release
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise HastenError(f"{path} is in use by another hasten process (PID {_holder(lock)}): wait for it or "
                              "use another run_dir") from None
        try:  # the file we locked must still be the one at that name (its last holder unlinks it on release)
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise HastenError(f"could not lock {path}: other processes keep taking and releasing it; try again")


def _holder(lock: Path) -> str:
    """The PID written in ``lock`` (its holder writes it right after locking: wait briefly for it)."""
    for _ in range(100):
        with contextlib.suppress(OSError):
            pid = lock.read_text().strip()
            if pid:
                return pid
        time.sleep(0.01)
    return "unknown"


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (or already gone): keep it and everything above it
            return


def kept_checkpoints(run_dir: Path) -> list[Path]:
    """The kept ``checkpoint-step<N>.pt`` files, oldest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-step*.pt") if (m := KEPT.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def prepare_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool = True, main: bool = True) -> dict | None:
    """The checkpoint to resume from, or None to start at step 0; see the module docstring. ``main`` (rank 0)
    also drops the metrics rows the run will replay and says on stderr where it resumes; other ranks only read."""
    if main:
        for tmp in stale_temp_files(run_dir):  # left by a write that was killed midway: never a result
            tmp.unlink(missing_ok=True)
    latest, kept = run_dir / CHECKPOINT, kept_checkpoints(run_dir)
    outputs = [name for name in OUTPUTS if (run_dir / name).exists()]
    if not resume and (latest.exists() or kept or outputs):
        raise HastenError(f"{run_dir} holds a run and resume=False never overwrites one: use a new run_dir")
    note = ""
    if latest.exists():
        ckpt = _load(latest, kept[-1] if kept else None)
    elif kept:
        ckpt = _load(kept[-1], kept[-2] if len(kept) > 1 else None)
        note = f"resuming from the kept {kept[-1].name}: {CHECKPOINT} is missing"
    elif outputs:
        _check_start_over(run_dir, cfg)
        ckpt, note = None, "no checkpoint was written before the run stopped: starting it over from step 0"
    else:
        _check_empty(run_dir)
        return None
    if ckpt is not None:
        _check_settings(run_dir, ckpt["cfg"], cfg)
    step = ckpt["step"] if ckpt is not None else 0
    if main:
        truncate_jsonl(run_dir / METRICS, step)
        truncate_jsonl(run_dir / CHECKPOINTS_LOG, step)
        print(f"hasten: {run_dir}: {note or f'resuming from step {step} of {cfg.steps}'}", file=sys.stderr,
              flush=True)
    return ckpt


def _load(path: Path, fallback: Path | None) -> dict:
    try:
        return load_checkpoint(path)
    except CorruptCheckpoint:
        then = f"move it away to resume from the kept {fallback.name}" if fallback else "restore it from a copy"
        raise HastenError(f"checkpoint {path} is corrupt (truncated or checksum mismatch): {then}, or use a new "
                          "run_dir") from None


def _check_settings(run_dir: Path, saved: dict, cfg: TrainConfig) -> None:
    current = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))  # as config.json stores it
    saved = json.loads(json.dumps(saved, default=str))
    changed = sorted(k for k in saved.keys() & current.keys() if k not in RESUMABLE_CHANGES and saved[k] != current[k])
    if changed:
        k = changed[0]
        raise HastenError(f"{run_dir} holds a run with other settings ({k}={saved[k]!r}, now {current[k]!r}): use a "
                          "new run_dir")


def _check_start_over(run_dir: Path, cfg: TrainConfig) -> None:
    """Outputs without a checkpoint may start over only if they are this run's and it never wrote a checkpoint."""
    no_checkpoint = HastenError(f"{run_dir} holds outputs of a run but no checkpoint to resume from: use a new "
                                "run_dir or move these files away")
    try:
        saved = json.loads((run_dir / CONFIG).read_text())
    except (OSError, ValueError):
        raise no_checkpoint from None
    if (run_dir / "summary.json").exists():  # written once a run is done: it had a checkpoint
        raise no_checkpoint
    # config.json also holds the task's name and the micro-batch size the run used under those keys
    _check_settings(run_dir, {k: v for k, v in saved.items() if k not in ("task", "micro_batch_size")}, cfg)
    every, steps = saved.get("checkpoint_every", 0), saved.get("steps", 0)
    first = min(every, steps) if every else steps  # the step of the run's first checkpoint
    done = max((row.get("step", 0) for row in read_jsonl(run_dir / METRICS)), default=0)
    if done >= first:  # it had written a checkpoint, which is gone: its rows are the only record left
        raise no_checkpoint


def _check_empty(run_dir: Path) -> None:
    temps = set(stale_temp_files(run_dir))
    other = sorted(p.name for p in run_dir.iterdir() if p.name not in BEFORE_RUN and p not in temps)
    if other:
        shown = ", ".join(other[:3]) + (", ..." if len(other) > 3 else "")
        raise HastenError(f"{run_dir} holds files that are not a hasten run ({shown}): use a new or empty run_dir")
