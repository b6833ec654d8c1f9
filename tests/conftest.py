"""Shared fixtures: the tiny random stack (as diffusers' get_dummy_components), saved and re-loaded."""

from __future__ import annotations

import os

import pytest
import torch

from sage_lightning.models import DiffusionModel, build_tiny, load_diffusion

torch.set_num_threads(1)  # faster than 2 when the machine is shared; CI results do not depend on it


@pytest.fixture(scope="session")
def tiny() -> DiffusionModel:
    return build_tiny(seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny) -> str:
    """The tiny stack saved with save_pretrained, as a user's local model folder."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    tiny.pipeline().save_pretrained(folder, safe_serialization=True)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir) -> DiffusionModel:
    """The tiny stack re-loaded through the same loader a user's Stable Diffusion goes through."""
    return load_diffusion(tiny_dir, scheduler="ddim")


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per CPU core, at most 4 (each worker holds its own models and runs)."""
    return max(1, min(os.cpu_count() or 1, 4))
