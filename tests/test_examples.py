"""The examples run end to end on tiny settings (as subprocesses, as a user would run them)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hasten.tasks import shakespeare

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models; the machine's cores are shared
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("micro_batches", ["4", "1"])  # MicroBatchTap; PerExampleTap (one backward per step)
def test_plain_loop_prints_the_estimate_with_its_interval(micro_batches):
    proc = run("plain_loop.py", "--steps", "12", "--batch-size", "64", "--micro-batches", micro_batches)
    assert proc.returncode == 0, proc.stderr
    assert "B_simple = " in proc.stdout and "95% interval" in proc.stdout and "over 12 steps" in proc.stdout


@pytest.mark.skipif(not shakespeare.available(), reason="no Shakespeare text: `python -m hasten.cli.main data fetch "
                    "shakespeare` fetches it")
def test_hf_trainer_example_measures_in_tokens(tmp_path):
    pytest.importorskip("transformers")
    proc = run("hf_trainer.py", "--steps", "3", "--batch-size", "4", "--accumulation", "2", "--block-size", "16",
               "--layers", "1", "--width", "32", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "tokens (95% interval" in proc.stdout and "over 3 steps" in proc.stdout
    assert "'noise/b_simple'" in proc.stdout + proc.stderr  # in the Trainer's own logs


def test_hf_trainer_example_says_how_to_fetch_missing_text(tmp_path):
    proc = run("hf_trainer.py", "--data", str(tmp_path / "missing.txt"))
    assert proc.returncode != 0 and "data fetch shakespeare" in proc.stderr
