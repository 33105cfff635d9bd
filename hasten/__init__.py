"""hasten: train neural networks in less time and compute, and know why."""
__version__ = "0.1.0"
