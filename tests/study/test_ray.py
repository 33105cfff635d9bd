"""backend=ray: a 2-trial digits study on a local Ray instance trains both trials to the goal, records them and
writes the report; a rerun finds both finished (results.jsonl) and starts nothing."""
import pytest

from hasten.train.logger import read_jsonl

pytest.importorskip("ray.tune", reason="Ray Tune is not installed: pip install 'hasten[ray]' to test backend=ray")

from hasten.study import run_study  # noqa: E402


def test_two_trial_study_on_local_ray(tmp_path, capsys):
    args = ["target=loss:0.15", "batch_sizes=64,256", "lr_factors=1", "noise_run=false", "smith_le_epochs=0",
            "backend=ray", "workers=2", "threads=1", f"run_dir={tmp_path}"]
    summary = run_study("digits", args)
    records = read_jsonl(tmp_path / "results.jsonl")
    assert sorted(r["batch_size"] for r in records) == [64, 256]
    assert all(r["status"] == "reached" and r["steps"] > 0 for r in records)
    for r in records:  # each trial trained in its own run dir, stopped at its goal
        rows = read_jsonl(tmp_path / "trials" / r["trial_id"] / "metrics.jsonl")
        assert rows[-1]["step"] == r["steps_run"] >= r["steps"]
    assert {row["batch_size"]: row["steps"] for row in summary["per_batch"]} == {r["batch_size"]: r["steps"]
                                                                                for r in records}
    assert summary["fit"]["n_points"] == 2 and (tmp_path / "report.html").exists()
    capsys.readouterr()
    run_study("digits", args)
    assert "trials: 0 to run, 2 already finished" in capsys.readouterr().out
