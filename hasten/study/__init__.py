"""Batch-size studies: the critical batch fitted from steps-to-target, its regimes, and the adaptive-batch gain."""
from hasten.study.fit import CriticalBatchFit, fit_critical_batch, scaling_regimes, wallclock_knee
from hasten.study.gain import adaptive_batch_gain
from hasten.study.options import StudyOptions
from hasten.study.runner import run_study

__all__ = ["CriticalBatchFit", "StudyOptions", "adaptive_batch_gain", "fit_critical_batch", "run_study",
           "scaling_regimes", "wallclock_knee"]
