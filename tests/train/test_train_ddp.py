"""fit() under torchrun (2 processes, gloo): the same training as one process over the same global batches, the
noise=ddp meter against a brute-force one, resume, rank-0-only files, and `hasten train` from the command line."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddp_fit_script
import hasten.train.batch_callback as batch_callback
from hasten.errors import HastenError
from hasten.measure.noise_scale import NoiseScale
from hasten.train import Callback, fit, load_checkpoint
from hasten.train.logger import read_jsonl
from hasten.train.noise_callback import noise_source
from train_tiny_task import tiny_config, tiny_task

HERE = Path(__file__).resolve().parent
RUN_FILES = {"config.json", "metrics.jsonl", "tb", "checkpoint-latest.pt"}


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                           *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


class ShardNoise(Callback):
    """The DDP meter by brute force in one process: each of 2 shards' gradient, weighted as the loop weights it
    (2·b_r/B, so their mean is the batch gradient), gives |g_r|²; the pair enters eq. A.2 with B_small = the
    harmonic mean of the b_r and B_big = 2·B_small (hasten/measure/ddp.py). Steps with an empty shard are skipped."""

    def __init__(self, horizon: float, dataset_size: int):
        self.noise = NoiseScale(horizon=horizon, dataset_size=dataset_size)

    def on_before_optimizer_step(self, state) -> None:
        x, y = state.batch[:2]
        shards = torch.tensor_split(torch.arange(len(x)), 2)
        if min(len(s) for s in shards) == 0:
            return
        params = list(state.model.parameters())

        def grad(idx):
            loss = state.loss_fn(state.model(x[idx]), y[idx])
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).double()

        sq_small = sum((2 * len(s) / len(x) * grad(s)).square().sum().item() for s in shards) / 2
        b_small = 1 / (sum(1 / len(s) for s in shards) / 2)
        self.noise.update(sq_small, b_small, grad(torch.arange(len(x))).square().sum().item(), 2 * b_small)


def reference_fit(run_dir: Path, monkeypatch) -> tuple[list[dict], dict, NoiseScale]:
    """One process over the same global batches: the batch plan rounded to multiples of micro × 2 as under 2 ranks."""
    monkeypatch.setattr(batch_callback, "world_size", lambda: 2)
    cfg = tiny_config(**{**ddp_fit_script.CONFIG, "noise": "off"})
    meter = ShardNoise(cfg.noise_horizon, ddp_fit_script.N_TRAIN)
    fit(tiny_task(n_train=ddp_fit_script.N_TRAIN), cfg, [meter], run_dir=run_dir)
    params = load_checkpoint(run_dir / "checkpoint-latest.pt")["model"]
    return read_jsonl(run_dir / "metrics.jsonl"), params, meter.noise


@pytest.mark.slow
def test_two_rank_fit_matches_one_process_over_the_same_global_batches(tmp_path, monkeypatch):
    torchrun(str(HERE / "ddp_fit_script.py"), str(tmp_path), cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    rows, ref_params, ref_noise = reference_fit(tmp_path / "reference", monkeypatch)
    ddp_rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")

    # The batches: changes mid-epoch, a 1-example batch (one empty shard), a 13-example one (shards of 7 and 6).
    sizes = [r["batch_size"] for r in ddp_rows]
    assert sizes == [r["batch_size"] for r in rows] and {1, 13, 18, 24} <= set(sizes)
    assert [r["examples"] for r in ddp_rows] == [r["examples"] for r in rows]
    for ddp_row, row in zip(ddp_rows, rows):  # the global mean loss, LR and evaluations of one process
        for key in ("lr", "train/loss", "eval/loss", "eval/accuracy"):
            assert (ddp_row.get(key) is None) == (row.get(key) is None), key
            if row.get(key) is not None:
                assert ddp_row[key] == pytest.approx(row[key], rel=1e-5, abs=1e-7), (row["step"], key)

    # Parameters: both ranks identical, equal to the single-process run's and to rank 0's checkpoint.
    assert r0["params"] == r1["params"]
    ddp_ckpt = load_checkpoint(tmp_path / "run" / "checkpoint-latest.pt")["model"]
    for name, ref in ref_params.items():
        assert torch.equal(torch.tensor(r0["params"][name]), ddp_ckpt[name])
        torch.testing.assert_close(ddp_ckpt[name], ref, rtol=1e-5, atol=1e-6)
    assert r0["metrics"] == pytest.approx({k: rows[-1][k] for k in r0["metrics"]}, rel=1e-5)

    # noise=ddp: the same estimate on both ranks, equal to the brute-force meter's.
    ref = ref_noise.compute()
    assert r0["noise"] == r1["noise"]
    assert r0["noise"]["n_steps"] == ref.n_steps == len(sizes) - 1  # all but the step with an empty shard
    assert math.isfinite(r0["noise"]["b_simple"]) and r0["noise"]["b_simple"] > 0
    assert r0["noise"]["b_simple"] == pytest.approx(ref.b_simple, rel=1e-4)
    assert ddp_rows[-1]["noise/b_simple"] == pytest.approx(ref.b_simple, rel=1e-4)

    # Interrupted after step 6 on both ranks and resumed (every rank loads the checkpoint): the same final model.
    assert r0["resumed_params"] == r0["params"] and r1["resumed_params"] == r1["params"]
    # Only rank 0 wrote: one row per step, one TensorBoard file, no other files.
    for run in ("run", "resumed"):
        run_rows = read_jsonl(tmp_path / run / "metrics.jsonl")
        assert [r["step"] for r in run_rows] == list(range(1, len(sizes) + 1))
        assert len(list((tmp_path / run / "tb").iterdir())) == 1  # a resume rebuilds its events from metrics.jsonl
        assert {p.name for p in (tmp_path / run).iterdir()} == RUN_FILES
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["world_size"] == 2 and config["noise_source"] == "ddp"


@pytest.mark.slow
def test_cli_train_under_torchrun_writes_one_report(tmp_path):
    run = tmp_path / "run"
    proc = torchrun("-m", "hasten.cli.main", "train", "digits", "batch=increase", "schedule=step", "steps=24",
                    "batch_size=32", "eval_every=0", "checkpoint_every=0", "progress=false", "threads=1",
                    f"run_dir={run}", cwd=tmp_path)
    assert proc.stdout.count("report: ") == 1 and proc.stdout.count(" steps, ") == 1  # rank 0 alone prints
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert max(r["batch_size"] for r in rows) > 32 and any(r["noise/b_simple"] is not None for r in rows)
    # noise_budget (default): the ranks share their cost estimates in the loss all-reduce and agree on N.
    assert rows[0]["noise/every"] == 4 and sum(r["noise/measured"] for r in rows) >= 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["noise source"] == "ddp" and summary["n_steps"] > 0
    assert "Batch size, learning rate and B_simple" in (run / "report.html").read_text()


def test_noise_sources_by_number_of_processes(tmp_path):
    assert noise_source("micro", 1) == "micro" and noise_source("micro", 2) == "ddp"
    assert noise_source("ddp", 4) == "ddp" and noise_source("off", 2) == "off"
    for noise, world in (("ddp", 1), ("per_example", 2), ("sometimes", 1)):
        with pytest.raises(HastenError):
            noise_source(noise, world)
    with pytest.raises(HastenError, match="noise=ddp measures across DDP processes"):
        fit(tiny_task(), tiny_config(noise="ddp"), run_dir=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # checked before anything is written (or a process group joined)
