"""Measure the gradient noise scale B_simple = tr(Σ)/|G|² (McCandlish et al. 2018, arXiv:1812.06162).

Sources of squared-gradient-norm pairs at the same parameters: micro-batches of gradient accumulation
(:class:`MicroBatchTap`), ranks of DistributedDataParallel (:func:`attach_ddp_noise`), per-example gradients
(:func:`per_example_sq_norms` by torch.func, :class:`PerExampleTap` from backward hooks); :func:`measure_noise_scale`
measures a model at fixed parameters.
"""
from hasten.measure.api import measure_noise_scale
from hasten.measure.ddp import DDPNoiseState, attach_ddp_noise, noise_scale_hook
from hasten.measure.hook_tap import PerExampleTap, uncovered_parameters
from hasten.measure.noise_scale import NoiseScale, NoiseScaleEstimate
from hasten.measure.per_example import per_example_sq_norms
from hasten.measure.tap import MicroBatchTap

__all__ = [
    "DDPNoiseState",
    "MicroBatchTap",
    "NoiseScale",
    "NoiseScaleEstimate",
    "PerExampleTap",
    "attach_ddp_noise",
    "measure_noise_scale",
    "noise_scale_hook",
    "per_example_sq_norms",
    "uncovered_parameters",
]
