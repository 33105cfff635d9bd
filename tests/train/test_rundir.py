"""Run directories: one process at a time (a lock that dies with its holder), and nothing a run wrote is deleted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_tiny_task import Crash, tiny_config, tiny_task, untimed_rows

from hasten.errors import HastenError
from hasten.train import fit
from hasten.train.logger import read_jsonl
from hasten.train.rundir import LOCK, lock_run_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
ROOT = Path(__file__).resolve().parents[2]


def tree(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def holder(run_dir: Path) -> subprocess.Popen:
    """Another process holding ``run_dir`` until it is killed."""
    code = (f"import time\nfrom hasten.train.rundir import lock_run_dir\nwith lock_run_dir({str(run_dir)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_exclusive_reentrant_and_dies_with_its_holder(tmp_path):
    run = tmp_path / "a" / "run"
    proc = holder(run)
    try:
        assert (run / LOCK).read_text().strip() == str(proc.pid)
        with pytest.raises(HastenError) as info:
            with lock_run_dir(run):
                pass
        assert str(info.value) == (f"{run} is in use by another hasten process (PID {proc.pid}): wait for it or use "
                                   "another run_dir")
    finally:
        proc.send_signal(signal.SIGKILL)  # the kernel drops its lock: the stale file holds a dead PID
        proc.wait()
    assert (run / LOCK).exists()
    with lock_run_dir(run):
        assert (run / LOCK).read_text().strip() == str(os.getpid())
        with lock_run_dir(tmp_path / "a" / "." / "run"):  # this process again, another spelling: re-entrant
            pass
        assert (run / LOCK).exists()
    assert not (run / LOCK).exists()  # released: the file goes; the folder stays (it was there before)
    assert run.is_dir()

    with pytest.raises(ZeroDivisionError):
        with lock_run_dir(tmp_path / "new" / "deeper"):
            1 / 0
    assert not (tmp_path / "new").exists()  # folders it made and nothing was written in: gone again


def test_fit_refuses_a_run_dir_another_process_holds(tmp_path):
    proc = holder(tmp_path)
    try:
        with pytest.raises(HastenError, match=f"in use by another hasten process \\(PID {proc.pid}\\)"):
            fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(os.listdir(tmp_path)) == [LOCK]  # the holder's stale lock file only: nothing was written


GO = """import sys, time
from pathlib import Path
import hasten.cli.runs, hasten.train.loop, hasten.tasks  # imported before the start signal: both start together
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.002)
from hasten.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_two_commands_on_one_run_dir_one_runs_the_other_stops(tmp_path):
    run, go = tmp_path / "run", tmp_path / "go"
    args = ["train", "digits", "steps=60", "eval_every=30", "checkpoint_every=20", "progress=false", "threads=1",
            f"run_dir={run}"]
    procs = [subprocess.Popen([sys.executable, "-c", GO, str(go), *args], cwd=tmp_path, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, err) for p, (_, err) in zip(procs, outs)]
    winner, loser = (0, 1) if procs[0].returncode == 0 else (1, 0)
    err = outs[loser][1].strip()
    assert err == (f"hasten: error: {run} is in use by another hasten process (PID {procs[winner].pid}): wait for "
                   "it or use another run_dir")
    assert "resuming" not in outs[winner][1]
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == list(range(1, 61))  # one run's rows, once
    assert json.loads((run / "config.json").read_text())["steps"] == 60
    assert sorted(os.listdir(run)) == ["checkpoint-latest.pt", "config.json", "metrics.jsonl", "report.html",
                                       "summary.json", "tb"]
    assert len(list((run / "tb").iterdir())) == 1  # one event file


@pytest.mark.parametrize("removed", [["checkpoint-latest.pt"], ["checkpoint-latest.pt", "checkpoint-step8.pt"]])
def test_missing_latest_checkpoint_resumes_from_the_newest_kept_one(tmp_path, capsys, removed):
    cfg = tiny_config(steps=14, micro_batch_size=4, eval_every=5, keep_checkpoints=True)
    task = tiny_task(dropout=0.3)
    whole = fit(task, cfg, run_dir=tmp_path / "whole")
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        fit(task, cfg, [Crash(at=11)], run_dir=cut)  # checkpoints at steps 4 and 8, kept
    for name in removed:
        (cut / name).unlink()
    kept = {p.name: p.read_bytes() for p in cut.glob("checkpoint-step*.pt")}
    capsys.readouterr()
    resumed = fit(task, cfg, run_dir=cut)
    newest = max(kept, key=lambda name: int(name[15:-3]))
    assert capsys.readouterr().err.splitlines() == [
        f"hasten: {cut}: resuming from the kept {newest}: checkpoint-latest.pt is missing"]
    assert (resumed.metrics, resumed.loss, resumed.examples) == (whole.metrics, whole.loss, whole.examples)
    assert untimed_rows(cut) == untimed_rows(tmp_path / "whole")
    assert all((cut / name).read_bytes() == data for name, data in kept.items())  # none deleted or rewritten
    assert sorted(p.name for p in cut.glob("checkpoint-step*.pt")) == sorted(
        p.name for p in (tmp_path / "whole").glob("checkpoint-step*.pt"))
    assert [r["step"] for r in read_jsonl(cut / "checkpoints.jsonl")] == [4, 8, 12, 14]


def test_resume_says_from_which_step_once(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), tiny_config(steps=8), [Crash(at=6)], run_dir=tmp_path)
    assert "resuming" not in capsys.readouterr().err
    fit(tiny_task(), tiny_config(steps=8), run_dir=tmp_path)
    assert capsys.readouterr().err.splitlines() == [f"hasten: {tmp_path}: resuming from step 4 of 8"]


def test_corrupt_latest_checkpoint_is_kept_and_named_with_the_way_out(tmp_path):
    fit(tiny_task(), tiny_config(steps=8, keep_checkpoints=True), run_dir=tmp_path)
    latest = tmp_path / "checkpoint-latest.pt"
    latest.write_bytes(latest.read_bytes()[:100])
    before = tree(tmp_path)
    with pytest.raises(HastenError) as info:
        fit(tiny_task(), tiny_config(steps=8, keep_checkpoints=True), run_dir=tmp_path)
    assert "corrupt" in str(info.value) and "move it away to resume from the kept checkpoint-step8.pt" in str(info.value)
    assert "delete" not in str(info.value)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("user_files", [{"notes.txt": b"mine"}, {"notes.txt": b"mine", "tb/events.out": b"tb"}])
def test_a_folder_that_is_not_a_hasten_run_is_refused_and_untouched(tmp_path, user_files):
    for name, data in user_files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    before = tree(tmp_path)
    with pytest.raises(HastenError) as info:
        fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path)
    assert "\n" not in str(info.value) and "use a new" in str(info.value)
    assert tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == sorted({n.split("/")[0] for n in user_files})


def test_outputs_without_a_checkpoint(tmp_path, capsys):
    cfg = tiny_config(steps=8, checkpoint_every=4)
    whole = fit(tiny_task(), cfg, run_dir=tmp_path / "whole")
    early = tmp_path / "early"  # stopped before its first checkpoint: nothing to resume from, nothing lost
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), cfg, [Crash(at=3)], run_dir=early)
    capsys.readouterr()
    again = fit(tiny_task(), cfg, run_dir=early)
    assert "starting it over from step 0" in capsys.readouterr().err
    assert (again.metrics, again.loss) == (whole.metrics, whole.loss)
    assert untimed_rows(early) == untimed_rows(tmp_path / "whole")

    (early / "checkpoint-latest.pt").unlink()  # a run that had checkpoints: its rows are the only record left
    before = tree(early)
    with pytest.raises(HastenError, match="holds outputs of a run but no checkpoint to resume from: use a new "
                                          "run_dir or move these files away"):
        fit(tiny_task(), cfg, run_dir=early)
    assert tree(early) == before
    other = tmp_path / "other"  # stopped early too, but with other settings: not this run's to start over
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_task(), cfg, [Crash(at=3)], run_dir=other)
    with pytest.raises(HastenError, match="holds a run with other settings \\(lr=0.1, now 0.2\\): use a new run_dir"):
        fit(tiny_task(), tiny_config(steps=8, lr=0.2), run_dir=other)


def test_resume_false_refuses_a_run_instead_of_deleting_it(tmp_path):
    fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path)
    before = tree(tmp_path)
    with pytest.raises(HastenError, match="holds a run and resume=False never overwrites one: use a new run_dir"):
        fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path, resume=False)
    assert tree(tmp_path) == before
    assert fit(tiny_task(), tiny_config(steps=4), run_dir=tmp_path / "new", resume=False).steps == 4
