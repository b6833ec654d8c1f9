"""Data modules that supply SAGE's search targets."""

from sage_lightning.datamodules.class_prompts import ClassPromptDataModule, TargetQueue
from sage_lightning.datamodules.prompt_sets import PromptSetDataModule

__all__ = ["ClassPromptDataModule", "PromptSetDataModule", "TargetQueue"]
