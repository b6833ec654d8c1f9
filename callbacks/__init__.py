"""Callbacks of the SAGE searches: clamping, projection, result writing."""

from callbacks.checkpoint import IterationCheckpoint
from callbacks.clamp import ClampPerturbation
from callbacks.failure_writer import FailureWriter
from callbacks.projection import LatentProjection

__all__ = ["ClampPerturbation", "IterationCheckpoint", "FailureWriter", "LatentProjection"]
