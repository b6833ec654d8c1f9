"""Layering (issue 10, "Structure"): a search names its result writer by class path and never imports the
callbacks layer; the CLI adds no writer of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO

from callbacks import FailureWriter, PromptResultWriter, TokenSnapping, TokenWriter, missing_run_callbacks
from sage_lightning.candidates import CausalLMCandidates, WordListCandidates
from sage_lightning.searches import (
    LatentSearch,
    PromptSearch,
    RandomLatentSearch,
    RandomPerturbationSearch,
    RandomTokenSearch,
    RandomWordSearch,
    UniversalTokenSearch,
)

WRITER_MODULES = {"callbacks.failure_writer", "callbacks.prompt_writer", "callbacks.token_writer",
                  "callbacks.token_snapping"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_no_search_module_imports_a_writer_or_the_snapping_callback():
    offenders = {
        str(path.relative_to(REPO)): sorted(_imports(path) & WRITER_MODULES)
        for path in (REPO / "sage_lightning").rglob("*.py")
        if _imports(path) & WRITER_MODULES
    }
    assert offenders == {}


WORDS = WordListCandidates(["red"])


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (LatentSearch(diffusion="tiny"), [FailureWriter]),
        (RandomLatentSearch(diffusion="tiny"), [FailureWriter]),
        (PromptSearch(candidates=WORDS, diffusion="tiny"), [PromptResultWriter, TokenSnapping]),
        (RandomWordSearch(candidates=WORDS, diffusion="tiny"), [PromptResultWriter]),
        (UniversalTokenSearch(diffusion="tiny"), [TokenWriter]),
        (RandomPerturbationSearch(diffusion="tiny"), [FailureWriter]),
        (RandomTokenSearch(diffusion="tiny", norm=1.0), [TokenWriter]),
    ],
    ids=["latent", "random_latent", "prompt", "random_word", "universal_token", "random_perturbation",
         "random_token"],
)
def test_each_search_names_its_writer_and_the_cli_adds_none(search, expected, tmp_path):
    assert [type(c) for c in search.configure_callbacks()] == expected
    assert not any(isinstance(c, FailureWriter) for c in missing_run_callbacks(tmp_path, []))


def test_loading_is_the_one_door_to_weights():
    """candidates.py asks loading.py for its language model; it calls no from_pretrained itself."""
    from sage_lightning.loading import load_causal_lm

    tree = ast.parse((REPO / "sage_lightning" / "candidates.py").read_text())
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute)}
    assert "from_pretrained" not in calls
    tokenizer, model = load_causal_lm("shapesworld")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    source = CausalLMCandidates("shapesworld")
    source.load()
    assert type(source._model) is type(model)
