"""Thin adapters that host hasten's meters and schedules inside other training frameworks.

- :mod:`hasten.integrations.lightning`: ``NoiseScaleMonitor`` and ``BatchSizeSchedule``, Lightning callbacks
  (``pip install hasten[lightning]``).
- :mod:`hasten.integrations.transformers`: the noise scale during a Hugging Face ``Trainer.train()``
  (``pip install hasten[transformers]``).

Each adapter imports its framework when it is itself imported; this package imports none, so ``import hasten``
never needs Lightning or transformers.
"""
