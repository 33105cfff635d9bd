"""Acceptance for `hasten study batch-size`: a small digits study end to end, checked against a brute-force
reading of each trial's own metrics.jsonl; after SIGKILL a rerun runs only unfinished trials; bad input: one line."""
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hasten.errors import HastenError
from hasten.study import fit_critical_batch, run_study
from hasten.study.options import geometric_grid, parse_target, scaled_lr
from hasten.train.logger import read_jsonl


def first_loss_step(losses, batch, smooth=2048, resolution=0.05, target=0.15):
    """Brute force: the first step c whose centred window mean of the batch losses is at or below the target."""
    for c in range(1, len(losses) + 1):
        h = min(math.ceil(smooth / (2 * batch)), int(resolution * c))
        if c + h <= len(losses) and sum(losses[c - h - 1 : c + h]) / (2 * h + 1) <= target:
            return c
    return None


def test_small_digits_study_against_brute_force(tmp_path):
    study = tmp_path / "study"
    summary = run_study("digits", ["target=loss:0.15,accuracy:0.9", "batch_sizes=16,64,256", "lr_factors=1,2",
                                   "smith_le_epochs=2", f"run_dir={study}", "workers=1", "threads=1", "bootstrap=0"])
    for name in ("report.html", "results.csv", "results.jsonl", "study.json"):
        assert (study / name).stat().st_size > 0
    records = read_jsonl(study / "results.jsonl")
    assert len(records) == 3 * 2 + 2 * 3 + 1  # target trials, Smith & Le (2 LRs × 3 batches), the noise run
    with open(study / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(records)

    best, pruned = {}, []
    for r in (r for r in records if r["kind"] in ("target", "noise")):
        rows = read_jsonl(study / "trials" / r["trial_id"] / "metrics.jsonl")
        if r["status"] == "pruned":  # stopped once past a faster trial at its batch size (checked below)
            pruned.append(r)
            continue
        c_loss = first_loss_step([row["train/loss"] for row in rows], r["batch_size"])
        evals = [row for row in rows if "eval/accuracy" in row]
        c_acc = next((row["step"] for row in evals if row["eval/accuracy"] >= 0.9), None)
        checks = [row["step"] for row in evals if row["step"] <= c_acc]
        assert checks[0] == 1  # evaluated often enough to resolve the step within 5%
        assert all(b - a <= max(1, int(0.05 * a)) for a, b in zip(checks, checks[1:]))
        assert r["status"] == "reached" and c_loss and c_acc
        assert r["steps"] == max(c_loss, c_acc)
        assert r["examples"] == rows[r["steps"] - 1]["examples"]
        if r["kind"] == "target":
            best[r["batch_size"]] = min(best.get(r["batch_size"], math.inf), r["steps"])

    per_batch = {row["batch_size"]: row["steps"] for row in summary["per_batch"]}
    assert per_batch == best
    assert all(r["steps"] is None and r["steps_run"] > best[r["batch_size"]] for r in pruned)
    fit = fit_critical_batch(list(best), list(best.values()), bootstrap=0)
    assert summary["fit"]["b_crit"] == pytest.approx(fit.b_crit)
    assert summary["fit"]["e_min"] == pytest.approx(summary["fit"]["s_min"] * summary["fit"]["b_crit"])
    pred = summary["prediction"]
    assert pred["batch_size"] == 64 and pred["b_simple_at_target"] > 0
    assert pred["ratio_at_target"] == pytest.approx(fit.b_crit / pred["b_simple_at_target"])
    assert 0 < pred["adaptive_gain"] <= 1
    sl = summary["smith_le"]
    assert [c["lr"] for c in sl["curves"]] == [0.1, 0.025] and all(c["b_opt"] for c in sl["curves"])

    # The same command again trains nothing and gives the same summary.
    again = run_study("digits", ["target=loss:0.15,accuracy:0.9", "batch_sizes=16,64,256", "lr_factors=1,2",
                                 "smith_le_epochs=2", f"run_dir={study}", "workers=1", "threads=1", "bootstrap=0"])
    assert again["per_batch"] == summary["per_batch"]
    assert len(read_jsonl(study / "results.jsonl")) == len(records)


def _args(study: Path) -> list[str]:
    return ["target=loss:0.12", "batch_sizes=16,32,64,128", "lr_factors=0.5,1", "smith_le_epochs=0",
            "noise_run=false", "workers=2", f"run_dir={study}", "checkpoint_every=20"]


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_sigkill_then_rerun_runs_only_unfinished_trials(tmp_path, capsys):
    study = tmp_path / "study"
    results = study / "results.jsonl"
    code = "import sys; from hasten.study import run_study; run_study('digits', sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *_args(study)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (results.exists() and results.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no trial finished within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {r["trial_id"] for r in read_jsonl(results)}
    assert 1 <= len(first) < 8, "the study finished before it could be killed"
    workers = {json.loads(line)["pid"] for f in study.glob("trials/*/attempts.jsonl") for line in f.open()}
    deadline = time.time() + 20
    while any(alive(pid) for pid in workers):  # orphaned workers see their parent gone and exit
        assert time.time() < deadline, "worker processes outlived the killed study"
        time.sleep(0.1)

    capsys.readouterr()
    run_study("digits", _args(study))  # the same command again, here (spares importing everything once more)
    assert f"{8 - len(first)} to run, {len(first)} already finished" in capsys.readouterr().out
    lines = [json.loads(line)["trial_id"] for line in results.read_text().splitlines()]
    assert len(lines) == len(set(lines)) == 8  # every trial exactly once
    for trial in (study / "trials").iterdir():
        attempts = len((trial / "attempts.jsonl").read_text().splitlines())
        assert attempts == 1 if trial.name in first else 1 <= attempts <= 2  # finished trials never start again
    assert (study / "report.html").exists()


@pytest.mark.parametrize("args, message", [
    (["targte=loss:0.1"], "did you mean target"),
    ([], "give target=loss:VALUE"),
    (["target=acc:0.9"], "is not NAME:NUMBER"),
    (["target=loss:0.1,loss:0.2"], "twice"),
    (["target=loss:0.1", "batch_sizes=8,5000"], "outside 1..1437"),
    (["target=loss:0.1", "batch_sizes=8"], "2 or more"),
    (["target=loss:0.1", "lr_rule=cube"], "lr_rule='cube'"),
    (["target=loss:0.1", "backend=spark"], "choose process or ray"),
    (["target=loss:0.1", "lr_factors=-1"], "positive"),
    (["target=loss:0.1", "workers=many"], "expected an integer"),
    (["target=loss:0.1", "resolution=2"], "between 0 and 1"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    with pytest.raises(HastenError, match=message) as info:
        run_study("digits", [*args, f"run_dir={tmp_path}"])
    assert "\n" not in str(info.value)
    assert not (tmp_path / "results.jsonl").exists()


def test_second_study_in_same_dir_is_refused(tmp_path):
    code = (f"import time\nfrom hasten.train.rundir import lock_run_dir\nwith lock_run_dir({str(tmp_path)!r}):\n"
            "    print('held', flush=True)\n    time.sleep(120)")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)  # another study
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(HastenError, match=f"in use by another hasten process \\(PID {other.pid}\\)"):
            run_study("digits", ["target=loss:0.1", "batch_sizes=32,64", "lr_factors=1", "noise_run=false",
                                 "smith_le_epochs=0", f"run_dir={tmp_path}", "workers=1"])
    finally:
        other.kill()
        other.wait()


def test_grids_and_goals():
    assert geometric_grid(64, 1437) == (8, 16, 32, 64, 128, 256, 512, 1024)
    assert geometric_grid(100, 1000) == (12, 25, 50, 100, 200, 400, 800)
    assert scaled_lr(0.1, 64, 256, "linear") == pytest.approx(0.4)
    assert scaled_lr(0.1, 64, 256, "sqrt") == pytest.approx(0.2)
    assert scaled_lr(0.1, 64, 256, "none") == pytest.approx(0.1)
    goals = parse_target("loss:0.1, token_accuracy:0.5", "token accuracy")
    assert [(g.name, g.value, g.higher) for g in goals] == [("loss", 0.1, False), ("metric", 0.5, True)]
    assert goals[0].met(0.1) and not goals[0].met(float("nan")) and goals[1].met(0.6) and not goals[1].met(0.4)


def test_workers_import_the_module_that_registered_a_user_task(tmp_path, monkeypatch):
    (tmp_path / "my_study_tasks.py").write_text(
        "import dataclasses\nfrom hasten.tasks import get_task, register\n"
        "register(dataclasses.replace(get_task('digits'), name='my-digits'))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_study_tasks  # noqa: F401  (registers my-digits here; spawned workers import it again)

    summary = run_study("my-digits", ["target=loss:0.3", "batch_sizes=32,64", "lr_factors=1", "smith_le_epochs=0",
                                      "noise_run=false", "workers=2", "threads=1", "bootstrap=0",
                                      f"run_dir={tmp_path / 'study'}"])
    records = read_jsonl(tmp_path / "study" / "results.jsonl")
    assert len(records) == 2 and all(r["steps"] for r in records)
    assert summary["per_batch"]


def test_a_task_registered_in_the_script_is_refused_for_workers_with_a_clear_error(tmp_path):
    code = ("import dataclasses, sys\nfrom hasten.tasks import get_task, register\nfrom hasten.errors import HastenError\n"
            "from hasten.study import run_study\n"
            "register(dataclasses.replace(get_task('digits'), name='script-digits'))\n"
            "try:\n    run_study('script-digits', sys.argv[1:])\n"
            "except HastenError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, "target=loss:0.3", "batch_sizes=32,64", "lr_factors=1",
                          "smith_le_epochs=0", "noise_run=false", "workers=2", f"run_dir={tmp_path / 'study'}"],
                         capture_output=True, text=True, timeout=120)
    assert "registered in the script you ran" in out.stdout and "workers=1" in out.stdout, out.stderr[-2000:]
