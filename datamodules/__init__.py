"""Data modules that supply SAGE's search targets."""

from datamodules.class_prompts import ClassPromptDataModule, TargetQueue

__all__ = ["ClassPromptDataModule", "TargetQueue"]
