"""Acceptance: a run killed with SIGKILL mid-training and started again ends bit-identical to an uninterrupted one."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train_tiny_task
from hasten.train import load_checkpoint
from hasten.train.logger import read_jsonl

SCRIPT = train_tiny_task.__file__


def start(run_dir: Path, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, SCRIPT, str(run_dir), *flags], env=env, stderr=subprocess.PIPE)


def finish(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]


@pytest.mark.slow
def test_sigkill_then_rerun_is_bit_identical(tmp_path):
    steps = train_tiny_task.SCRIPT_CONFIG["steps"]
    killed = start(tmp_path / "killed", "--slow")
    train_tiny_task.main(str(tmp_path / "whole"), slow=False)  # the uninterrupted run, here (threads=1 in both)
    checkpoint = tmp_path / "killed" / "checkpoint-latest.pt"
    deadline = time.monotonic() + 60
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.07)  # past the first checkpoint, into a later step or checkpoint write
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before_kill = load_checkpoint(checkpoint)["step"]
    assert 0 < done_before_kill < steps

    finish(start(tmp_path / "killed"))  # the same call again: resumes
    a = json.loads((tmp_path / "whole" / "result.json").read_text())
    b = json.loads((tmp_path / "killed" / "result.json").read_text())
    assert a == b  # final eval metrics, train loss, steps, examples and the noise estimate, exactly
    assert a["steps"] == steps and a["noise"]["n_steps"] > 0 and a["noise"]["b_simple"] is not None
    wa = load_checkpoint(tmp_path / "whole" / "checkpoint-latest.pt")["model"]
    wb = load_checkpoint(checkpoint)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)

    def rows(name):
        return [{k: v for k, v in r.items() if k != "time"} for r in read_jsonl(tmp_path / name / "metrics.jsonl")]

    assert rows("killed") == rows("whole") and len(rows("whole")) == steps
    assert not list((tmp_path / "killed").glob(".*tmp*"))
