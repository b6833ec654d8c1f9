"""Callbacks of the SAGE searches: clamping, projection, result writing."""

from sage_lightning.callbacks.checkpoint import IterationCheckpoint
from sage_lightning.callbacks.clamp import ClampPerturbation
from sage_lightning.callbacks.clip_score import ClipScoreLogger
from sage_lightning.callbacks.defaults import missing_run_callbacks
from sage_lightning.callbacks.failure_writer import FailureWriter
from sage_lightning.callbacks.progress import SearchProgressBar
from sage_lightning.callbacks.projection import LatentProjection
from sage_lightning.callbacks.prompt_writer import PromptResultWriter
from sage_lightning.callbacks.token_snapping import TokenSnapping
from sage_lightning.callbacks.token_writer import TokenWriter

__all__ = [
    "ClampPerturbation",
    "ClipScoreLogger",
    "FailureWriter",
    "IterationCheckpoint",
    "LatentProjection",
    "PromptResultWriter",
    "SearchProgressBar",
    "TokenSnapping",
    "TokenWriter",
    "missing_run_callbacks",
]
