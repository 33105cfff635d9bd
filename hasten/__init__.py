"""hasten: train neural networks in less time and compute, and know why.

The public API; see README.md for a tour and docs/architecture.md for the layout.
"""
from hasten.errors import HastenError
from hasten.measure import (DDPNoiseState, MicroBatchTap, NoiseScale, NoiseScaleEstimate, PerExampleTap,
                            attach_ddp_noise, measure_noise_scale, per_example_sq_norms, uncovered_parameters)
from hasten.study import adaptive_batch_gain, fit_critical_batch
from hasten.train import Callback, FitResult, TrainConfig, fit

__version__ = "0.1.0"

__all__ = ["HastenError", "NoiseScale", "NoiseScaleEstimate", "MicroBatchTap", "attach_ddp_noise", "DDPNoiseState",
           "per_example_sq_norms", "PerExampleTap", "uncovered_parameters", "measure_noise_scale", "fit_critical_batch",
           "adaptive_batch_gain", "fit", "TrainConfig", "Callback", "FitResult"]
