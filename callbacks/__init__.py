"""Callbacks of the SAGE searches: clamping, projection, result writing."""

from callbacks.checkpoint import IterationCheckpoint
from callbacks.clamp import ClampPerturbation
from callbacks.clip_score import ClipScoreLogger
from callbacks.defaults import missing_run_callbacks
from callbacks.failure_writer import FailureWriter
from callbacks.progress import SearchProgressBar
from callbacks.projection import LatentProjection
from callbacks.prompt_writer import PromptResultWriter
from callbacks.token_snapping import TokenSnapping
from callbacks.token_writer import TokenWriter

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
