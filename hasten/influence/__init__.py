"""Training-data influence: TracIn scores from checkpoints (Pruthi et al. 2020), exact and in bounded memory."""
from hasten.influence.projection import GaussianProjection
from hasten.influence.tracin import TracIn

__all__ = ["GaussianProjection", "TracIn"]
