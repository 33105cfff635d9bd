"""Training: :func:`fit` runs a task under a :class:`TrainConfig`, with named events for callbacks, gradient
accumulation, evaluation, JSONL + TensorBoard logging and atomic checkpoints that resume exactly."""
from hasten.train.checkpoint import load_checkpoint, save_checkpoint
from hasten.train.config import TrainConfig
from hasten.train.events import EVENTS, Callback, LoopState
from hasten.train.loop import FitResult, evaluate, fit
from hasten.train.noise_callback import NoiseScaleCallback
from hasten.train.sampler import EpochSampler
from hasten.train.schedule import make_schedule

__all__ = ["EVENTS", "Callback", "EpochSampler", "FitResult", "LoopState", "NoiseScaleCallback", "TrainConfig",
           "evaluate", "fit", "load_checkpoint", "make_schedule", "save_checkpoint"]
