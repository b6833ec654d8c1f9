"""Layering (issue 10, "Structure"): a search names its result writer by class path and never imports the
callbacks layer; the CLI adds no writer of its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ENV, REPO

from sage_lightning.callbacks import (
    ClampPerturbation,
    FailureWriter,
    LatentProjection,
    PromptResultWriter,
    TokenSnapping,
    TokenWriter,
    missing_run_callbacks,
)
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

WRITER_MODULES = {"sage_lightning.callbacks.failure_writer", "sage_lightning.callbacks.prompt_writer",
                  "sage_lightning.callbacks.token_writer", "sage_lightning.callbacks.token_snapping"}


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


# The command line composes the layers (it adds the run's default callbacks): the one sage_lightning module above them.
CALLBACKS_USERS = {"sage_lightning/cli.py"}


def test_no_sage_lightning_module_imports_the_callbacks_layer():
    """Searches hold the algorithm; callbacks do I/O and constraints. A search reads a constraint it needs
    through sage_lightning.constraints (e.g. run_box), which the callbacks import too; weights (CLIP for the
    CLIP score and for the failure-type analysis alike) come through sage_lightning.loading. Imports inside
    functions count too."""
    offenders = {
        str(path.relative_to(REPO)): sorted(n for n in _imports(path) if n.startswith("sage_lightning.callbacks"))
        for path in (REPO / "sage_lightning").rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names and path not in CALLBACKS_USERS} == {}
    assert {"sage_lightning/searches/base.py", "sage_lightning/analysis/failure_types.py"} <= set(offenders)  # walked


def test_the_run_box_is_the_clamps_intersection_and_projection_uses_the_same_one():
    from sage_lightning.callbacks import ClampPerturbation, projection
    from sage_lightning.constraints import run_box

    class Run:
        callbacks = [ClampPerturbation(-1.0, 2.0), ClampPerturbation(-3.0, 1.5), object()]

    assert run_box(Run()) == (-1.0, 1.5) and run_box(object()) is None
    assert projection.run_box is run_box


WORDS = WordListCandidates(["red"])


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (LatentSearch(diffusion="tiny"), [FailureWriter, ClampPerturbation, LatentProjection]),
        (RandomLatentSearch(diffusion="tiny"), [FailureWriter]),
        (PromptSearch(candidates=WORDS, diffusion="tiny"), [PromptResultWriter, ClampPerturbation, TokenSnapping]),
        (RandomWordSearch(candidates=WORDS, diffusion="tiny"), [PromptResultWriter]),
        (UniversalTokenSearch(diffusion="tiny"), [TokenWriter, ClampPerturbation]),
        (RandomPerturbationSearch(diffusion="tiny"), [FailureWriter, ClampPerturbation, LatentProjection]),
        (RandomTokenSearch(diffusion="tiny", norm=1.0), [TokenWriter, ClampPerturbation]),
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


PACKAGES = ("sage_lightning", "callbacks", "datamodules")


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at the top or inside a function (a lazy import still ties two
    modules together)."""
    paths = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            parts = parts if package == "sage_lightning" else ("sage_lightning", *parts)  # installed names
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        graph[name] = {dep for dep in deps if dep in paths and dep != name}
    return graph


def _cycle_through(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start through the import graph, or None."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for dep in sorted(graph[node]):
            if dep == start:
                return [*path, start]
            if dep not in seen:
                seen.add(dep)
                stack.append((dep, [*path, dep]))
    return None


def test_no_import_cycles():
    """Lower layers never import upper ones: loading.py is below shapesworld/ (which trains and reads the weights
    loading.py hands out), searches below callbacks, and so on. Any cycle is named."""
    graph = _module_graph()
    cycles = {name: cycle for name in graph if (cycle := _cycle_through(graph, name))}
    assert cycles == {}, " ; ".join(" -> ".join(c) for c in cycles.values())


def test_default_ensemble_order_is_the_trained_members():
    from sage_lightning.loading import SHAPESWORLD_MEMBERS
    from sage_lightning.shapesworld.classifiers import NAMES

    assert NAMES == SHAPESWORLD_MEMBERS


@pytest.mark.parametrize("first", ["sage_lightning.loading", "sage_lightning.shapesworld.classifiers",
                                   "sage_lightning.shapesworld.world"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    """Whichever of loading.py and the ShapesWorld modules is imported first, the others import after it and the
    shipped default ensemble builds."""
    code = (
        f"import {first}\n"
        "import sage_lightning.shapesworld.classifiers, sage_lightning.shapesworld.world\n"
        "from sage_lightning.loading import default_ensemble\n"
        "print(len(default_ensemble('shapesworld').members))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["3"]
