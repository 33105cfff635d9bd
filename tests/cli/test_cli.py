"""The `hasten` command line as a user meets it: one-line errors with exit 2, a report, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
QUICK = ["steps=120", "eval_every=60", "checkpoint_every=30", "progress=false", "threads=1"]


def hasten(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "hasten.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hasten {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, err


@pytest.mark.parametrize("args, words", [
    (["noise-scale", "digits", "lr_max=1"], ["unknown key", "lr_max"]),
    (["noise-scale", "digits", "lr=fast"], ["lr=", "number"]),
    (["noise-scale", "digits", "steps"], ["key=value"]),
    (["noise-scale", "nosuchtask"], ["nosuchtask"]),
    (["noise-scale", "digits", "batch_size=5000"], ["5000"]),
    (["noise-scale", "digits", "batch_size=64", "micro_batch_size=7"], ["divide"]),
    (["noise-scale", "fashion", "data=/nonexistent/fashion"], ["apt-get install dataset-fashion-mnist"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, words):
    assert_one_line_error(hasten(*args, f"run_dir={tmp_path / 'run'}", cwd=tmp_path), *words)


def test_unknown_command(tmp_path):
    assert_one_line_error(hasten("frobnicate", cwd=tmp_path), "unknown command")


def test_tasks_lists_every_task(tmp_path):
    out = hasten("tasks", cwd=tmp_path, check=True).stdout
    for name in ("digits", "fashion", "mnist1d", "shakespeare"):
        assert name in out


def test_noise_scale_writes_self_contained_report(tmp_path):
    run = tmp_path / "run"
    proc = hasten("noise-scale", "digits", *QUICK, f"run_dir={run}", cwd=tmp_path, check=True)
    assert "B_simple" in proc.stdout
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "http://" not in html and "https://" not in html  # opens offline: nothing fetched
    summary = json.loads((run / "summary.json").read_text())
    assert summary["b_simple"] > 0 and summary["n_steps"] > 50
    assert list(run.glob("**/events.out.tfevents.*")), "TensorBoard event files"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 120


def _final(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    return {k: v for k, v in summary.items() if k not in ("run_dir",)}


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    args = ["noise-scale", "digits", "steps=300", "eval_every=100", "checkpoint_every=40", "progress=false", "threads=1"]
    hasten(*args, f"run_dir={tmp_path / 'whole'}", cwd=tmp_path, check=True)

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hasten.cli.main", *args, f"run_dir={run}"], cwd=tmp_path,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        rows = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(rows) > 100 and list(run.glob("checkpoint*")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed: make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (run / "summary.json").exists()

    hasten(*args, f"run_dir={run}", cwd=tmp_path, check=True)
    assert _final(run) == _final(tmp_path / "whole")


def test_truncated_checkpoint_is_a_clear_error_and_keeps_metrics(tmp_path):
    run = tmp_path / "run"
    hasten("noise-scale", "digits", *QUICK, f"run_dir={run}", cwd=tmp_path, check=True)
    (ckpt,) = [p for p in run.glob("checkpoint*.pt")][:1] or pytest.fail("no checkpoint written")
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    metrics_before = (run / "metrics.jsonl").read_text()
    assert_one_line_error(hasten("noise-scale", "digits", *QUICK, f"run_dir={run}", cwd=tmp_path), "corrupt")
    assert (run / "metrics.jsonl").read_text() == metrics_before
