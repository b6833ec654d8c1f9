"""Layering (issues 10 and 22, "Structure"): the packages stand on floors and no module imports a module of a
higher floor (a world is a plugin the library reaches by name); a search names its result writer by class path;
the CLI adds no writer of its own; no import cycles."""

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

PACKAGES = ("sage_lightning", "callbacks", "datamodules")

# The floors, lowest first: a module imports modules of its own floor and of the floors below, never of a floor
# above (imports inside functions count: a lazy import still ties two modules together). An entry names a module
# and the modules under it, except "sage_lightning", which names the package's __init__ only. A world
# (ShapesWorld) is a plugin above the library, which reaches it by name (sage_lightning.worlds); callbacks and
# datamodules put the library together for a Lightning run; the command lines are the top.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("sage_lightning", "sage_lightning._checkout", "sage_lightning.shipped_configs",
              "sage_lightning.errors", "sage_lightning.worlds", "sage_lightning.constraints",
              "sage_lightning.targets", "sage_lightning.metrics", "sage_lightning.optim", "sage_lightning.embedding",
              "sage_lightning.text", "sage_lightning.results", "sage_lightning.cost", "sage_lightning.summary")),
    ("surrogate", ("sage_lightning.surrogate",)),
    ("models", ("sage_lightning.models", "sage_lightning.flow_models")),
    ("engine", ("sage_lightning.sampler", "sage_lightning.flow_sampler", "sage_lightning.candidates")),
    ("searches", ("sage_lightning.searches",)),
    ("analysis", ("sage_lightning.analysis", "sage_lightning.report")),
    ("world", ("sage_lightning.shapesworld",)),
    ("lightning", ("sage_lightning.callbacks", "sage_lightning.datamodules")),
    ("cli", ("sage_lightning.cli", "sage_lightning.run_folder", "sage_lightning.fit_session",
             "sage_lightning.analysis.cli", "sage_lightning.shapesworld.cli", "sage_lightning.shapesworld.train")),
)


def _module_paths() -> dict[str, Path]:
    """Dotted module name -> file, for every module of PACKAGES (a package by its __init__; callbacks/ and
    datamodules/ by their installed names, sage_lightning.callbacks and sage_lightning.datamodules)."""
    paths = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            parts = parts if package == "sage_lightning" else ("sage_lightning", *parts)  # installed names
            paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return paths


def _imported(name: str, path: Path) -> set[str]:
    """Every dotted name module ``name`` imports (top level or inside a function), relative imports resolved;
    ``from a import b`` gives ``a`` and ``a.b`` (b may be a module)."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module
            if node.level:  # from . import x / from .x import y: relative to the module's package
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
            deps |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return deps


def _module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    paths = _module_paths()
    return {name: {dep for dep in _imported(name, path) if dep in paths and dep != name}
            for name, path in paths.items()}


def _floor(module: str) -> int | None:
    """The index in FLOORS of the longest entry naming ``module`` (None: not placed)."""
    best = None
    for index, (_, entries) in enumerate(FLOORS):
        for entry in entries:
            exact_only = entry == "sage_lightning"
            if module == entry or (not exact_only and module.startswith(entry + ".")):
                if best is None or len(entry) > len(best[1]):
                    best = (index, entry)
    return None if best is None else best[0]


def _upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Module -> the modules of a higher floor it imports."""
    up = {}
    for name, deps in graph.items():
        higher = sorted(dep for dep in deps if _floor(dep) > _floor(name))
        if higher:
            up[name] = [f"{dep} ({FLOORS[_floor(dep)][0]} above {FLOORS[_floor(name)][0]})" for dep in higher]
    return up


def test_every_module_has_a_floor():
    unplaced = sorted(name for name in _module_paths() if _floor(name) is None)
    assert unplaced == [], f"place these modules in FLOORS: {unplaced}"


def test_no_module_imports_a_higher_floor():
    """The layering over PACKAGES: e.g. nothing under sage_lightning.models imports the world, no search imports a
    callback (a search names its writer by class path), no library module imports the command line."""
    graph = _module_graph()
    assert "sage_lightning.shapesworld.generator" in graph["sage_lightning.shapesworld.plugin"]  # the walk sees imports
    assert "sage_lightning.models" in graph["sage_lightning.shapesworld.world"]
    assert _upward_imports(graph) == {}


def test_an_import_up_a_floor_is_named():
    """The check itself: the arrow issue 22 removed (the model layer importing the world's generator) is caught,
    as a lazy import or at the top."""
    graph = {name: set(deps) for name, deps in _module_graph().items()}
    graph["sage_lightning.models.ensembles"].add("sage_lightning.shapesworld.generator")
    assert list(_upward_imports(graph)) == ["sage_lightning.models.ensembles"]


def test_relative_imports_are_resolved(tmp_path):
    path = tmp_path / "sources.py"
    path.write_text("from ..shapesworld import generator\nfrom .tiny import TINY_SOURCES\n")
    assert {"sage_lightning.shapesworld.generator", "sage_lightning.models.tiny"} <= _imported(
        "sage_lightning.models.sources", path)


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


def test_the_model_layer_is_the_one_door_to_weights():
    """candidates.py asks sage_lightning.models for its language model; it calls no from_pretrained itself."""
    from sage_lightning.models import load_causal_lm

    tree = ast.parse((REPO / "sage_lightning" / "candidates.py").read_text())
    calls = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
             and isinstance(node.func, ast.Attribute)}
    assert "from_pretrained" not in calls
    tokenizer, model = load_causal_lm("shapesworld")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    source = CausalLMCandidates("shapesworld")
    source.load()
    assert type(source._model) is type(model)


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
    """No cycle, within a floor either (across floors the layering test rules them out). Any cycle is named."""
    graph = _module_graph()
    cycles = {name: cycle for name in graph if (cycle := _cycle_through(graph, name))}
    assert cycles == {}, " ; ".join(" -> ".join(c) for c in cycles.values())


@pytest.mark.parametrize("first", ["sage_lightning.models", "sage_lightning.surrogate",
                                   "sage_lightning.shapesworld.plugin", "sage_lightning.shapesworld.classifiers",
                                   "sage_lightning.shapesworld.world"])
def test_each_module_imports_first_in_a_fresh_interpreter(first):
    """Whichever of the model layer, the surrogate and the ShapesWorld modules is imported first, the others import
    after it and the shipped default ensemble builds (the world registers itself when the model layer asks)."""
    code = (
        f"import {first}\n"
        "import sage_lightning.shapesworld.classifiers, sage_lightning.shapesworld.world\n"
        "from sage_lightning.models import default_ensemble\n"
        "print(len(default_ensemble('shapesworld').members))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from sage_lightning.shapesworld.classifiers import NAMES

    assert proc.stdout.split() == [str(len(NAMES))]  # every shipped member, the adversarial ones included


def test_every_module_imports_first():
    """Each project module imports in an interpreter where no project module is loaded yet (third-party ones stay
    cached between modules, so one process checks them all): a cycle through a package's ``__init__``, which the
    graph above does not see, fails here (``import sage_lightning.searches`` once did, through flow_models)."""
    names = sorted(name for name in _module_paths() if not name.endswith("__main__"))
    code = (
        "import importlib, sys, traceback\n"
        "failed = []\n"
        f"for name in {names!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'sage_lightning' or m.startswith('sage_lightning.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as err:\n"
        "        failed.append(f'{name}: {type(err).__name__}: {err}')\n"
        "print('\\n'.join(failed))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "", proc.stdout
