"""Schedules as data: batch-size plans over training progress, and the LR/momentum rules for a batch change."""
from hasten.schedules.batch import (INCREASE_RULES, Adaptive, FromLR, Plan, Stages, adaptive, batch_cost, fixed,
                                    increase_batch, round_batch, stages)
from hasten.schedules.scaling import (RULES, adascale_gain, adascale_gain_from_noise, adascale_progress,
                                      constant_noise_batch, constant_noise_lr, constant_noise_momentum, linear_lr,
                                      rescale, sgd_noise, sqrt_lr)

__all__ = ["INCREASE_RULES", "Adaptive", "FromLR", "Plan", "Stages", "adaptive", "batch_cost", "fixed",
           "increase_batch", "round_batch", "stages", "RULES", "adascale_gain", "adascale_gain_from_noise",
           "adascale_progress", "constant_noise_batch", "constant_noise_lr", "constant_noise_momentum", "linear_lr",
           "rescale", "sgd_noise", "sqrt_lr"]
