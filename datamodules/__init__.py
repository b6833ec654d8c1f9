"""Data modules that supply SAGE's search targets."""

from datamodules.class_prompts import ClassPromptDataModule, TargetQueue
from datamodules.prompt_sets import PromptSetDataModule

__all__ = ["ClassPromptDataModule", "PromptSetDataModule", "TargetQueue"]
