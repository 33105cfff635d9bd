"""backend=ray: the same trials handed to Ray Tune (``pip install 'hasten[ray]'``), one Tune trial per study trial.

Connects to the cluster named by ``RAY_ADDRESS`` when it is set (spread over its machines: the study dir must then
be on storage every node sees), else starts a local instance with ``workers`` CPUs. Each trial asks for as many
CPUs as it runs torch threads. Tune only schedules: each trial still trains through ``run_trial`` in its own run
dir, and its record comes back to the study process, which alone appends it to results.jsonl as it lands. So a
study killed mid-way resumes the same way as with backend=process.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from hasten.errors import HastenError
from hasten.study.options import TrialSpec
from hasten.study.trials import clean, run_trial

_KEY = "hasten_record"


def _trainable(config: dict, specs: list[TrialSpec]) -> None:
    from ray import tune

    record = run_trial(specs[config["index"]])
    tune.report({_KEY: json.dumps(clean(record))})


def run_trials_ray(specs: list[TrialSpec], workers: int, finished: Callable[[dict], None]) -> None:
    """Run ``specs`` on Ray Tune, ``workers`` at a time; call ``finished(record)`` in this process as each lands."""
    try:
        import ray
        from ray import tune
    except ImportError:
        raise HastenError("backend=ray needs Ray Tune: pip install 'hasten[ray]' (or 'ray[tune]')") from None

    class _Collect(tune.Callback):
        def on_trial_result(self, iteration, trials, trial, result, **info):
            if _KEY in result:
                finished(json.loads(result[_KEY]))

    started = not ray.is_initialized()
    if started:
        root = str(Path(__file__).resolve().parents[2])  # so workers import this copy of hasten
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        env = {"env_vars": {"PYTHONPATH": path, "RAY_CHDIR_TO_TRIAL_DIR": "0"}}
        if os.environ.get("RAY_ADDRESS"):
            ray.init(runtime_env=env, log_to_driver=False)
        else:
            ray.init(num_cpus=workers * specs[0].cfg.threads, include_dashboard=False, runtime_env=env,
                     log_to_driver=False)
    study_dir = Path(specs[0].cfg.run_dir).resolve().parents[1]
    trainable = tune.with_resources(tune.with_parameters(_trainable, specs=specs), {"cpu": specs[0].cfg.threads})
    tuner = tune.Tuner(
        trainable,
        param_space={"index": tune.grid_search(list(range(len(specs))))},
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=False),
        run_config=tune.RunConfig(name="tune", storage_path=str(study_dir / "ray"), callbacks=[_Collect()],
                                  verbose=0, failure_config=tune.FailureConfig(fail_fast=True)),
    )
    try:
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise HastenError(f"{len(errors)} Ray trial(s) failed, first: {str(errors[0]).splitlines()[0]}; rerun the "
                          "study to resume the unfinished ones")
