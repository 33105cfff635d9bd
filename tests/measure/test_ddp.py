"""DDP source: two gloo ranks on CPU under torchrun, compared with the brute-force noise scale (acceptance)."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .reference import N_CLASSES

WORKER = Path(__file__).with_name("ddp_worker.py")
ROOT = Path(__file__).resolve().parents[2]
STEPS = 800


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_hook_matches_brute_force(problem, tmp_path):
    x, y = problem.dataset.tensors
    torch.save(dict(x=x, y=y, state=problem.model.state_dict(), n_classes=N_CLASSES), tmp_path / "setup.pt")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}", str(WORKER), str(tmp_path / "setup.pt"), str(tmp_path), str(STEPS),
    ]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1  # every rank holds the identical estimate
    assert all(rank0["accepted"]) and rank0["twice"] is False and rank0["after_discard"] is True
    assert "held 32 examples" in rank0["mismatch"]
    every = rank0["every"]  # every=2 beside every=1 on the same four batches, at fixed parameters
    assert every["accepted"] == [[True, True], [False, True], [True, True], [False, True]]
    assert every["calls"][0] == [every["calls"][1][0], every["calls"][1][2]] and every["steps"] == 4
    est = rank0["estimate"]
    assert est["n_steps"] == STEPS and est["n_skipped"] == 0
    assert est["b_simple_se"] < 0.02 * est["b_simple"]
    assert abs(est["b_simple"] - problem.b_simple) < 0.05 * problem.b_simple
    assert abs(est["b_simple"] - problem.b_simple) < 4 * est["b_simple_se"]


def test_ddp_meter_on_half_precision_buckets(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", str(WORKER.with_name("ddp_half_worker.py")), str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    rank0, rank1 = (json.loads((tmp_path / f"half{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1
    full = rank0.pop("torch.float32")
    assert full["accepted"] and full["b_simple"] > 0
    for dtype, half in rank0.items():  # same batches, same initial weights: only rounding differs
        assert half["accepted"], dtype
        assert half["b_simple"] == pytest.approx(full["b_simple"], rel=0.01), dtype
