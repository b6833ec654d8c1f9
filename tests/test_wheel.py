"""A wheel that works (issue 22 item 6): ``pip install`` of the built wheel, not the checkout, gives a ``sage``
whose default and named configs resolve, installs no top-level ``callbacks`` or ``datamodules``, and runs a
search from any folder.

In the default suite (not ``slow``: CI runs it; a minute or two). Offline: the wheel is built without build
isolation when this interpreter's setuptools can build one (else pip fetches the build backend from its
index), and installed with ``--no-index --no-deps`` into a fresh venv. That venv reaches the dependencies
already installed here through a ``.pth`` line naming this interpreter's site-packages: a path line adds the
folder to ``sys.path`` without running the ``.pth`` files inside it, so an editable install of the project
there (its finder is started by such a file) stays invisible, and so does the checkout (no PYTHONPATH, the
commands run in a temporary folder).
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import REPO

BUILD_INPUTS = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "sage_lightning", "callbacks",
                "datamodules", "configs")
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")} | {"OMP_NUM_THREADS": "1",
                                                                                       "PYTHONWARNINGS": "ignore"}


def _run(command: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(command[:4])} ...: {proc.stderr[-3000:]}"
    return proc


def _setuptools_builds_wheels() -> bool:
    """setuptools >= 70.1 builds wheels by itself (no ``wheel`` package): no build isolation needed."""
    try:
        import setuptools
    except ImportError:
        return False
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the checkout (a build writes build/ and *.egg-info next to its sources)."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    isolation = ["--no-build-isolation"] if _setuptools_builds_wheels() else []
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", *isolation, "-q", "-w", str(tmp / "dist")],
         cwd=tmp)
    (wheel,) = (tmp / "dist").glob("sage_lightning-*.whl")
    return wheel


def _venv_with(wheel: Path, tmp: Path) -> Path:
    """A fresh venv holding only the wheel, and seeing this interpreter's dependencies; its bin/ folder."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
          "--no-compile", "-q", str(wheel)], cwd=tmp)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp)
    (Path(purelib.stdout.strip()) / "_outer_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv / "bin"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the venv's bin/, a working folder outside the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    bin_dir = _venv_with(_build_wheel(tmp), tmp)
    work = tmp / "elsewhere"
    work.mkdir()
    return bin_dir, work


def test_the_wheel_installs_no_generic_top_level_packages(installed):
    bin_dir, work = installed
    code = (
        "import importlib.util as u, sage_lightning, sage_lightning.callbacks, sage_lightning.datamodules\n"
        "print(sage_lightning.__file__)\n"
        "print(sage_lightning.callbacks.ClampPerturbation.__module__, sage_lightning.datamodules.__file__)\n"
        "print(u.find_spec('callbacks'), u.find_spec('datamodules'))\n"
    )
    out = _run([str(bin_dir / "python"), "-c", code], cwd=work).stdout.splitlines()
    site_packages = str(bin_dir.parent / "lib")
    assert out[0].startswith(site_packages), out  # the wheel's package, not the checkout's
    assert out[1].startswith("sage_lightning.callbacks.clamp ") and out[1].split()[1].startswith(site_packages)
    assert out[2] == "None None"


def test_default_and_named_configs_resolve_from_another_folder(installed):
    bin_dir, work = installed
    printed = yaml.safe_load(_run([str(bin_dir / "sage"), "fit", "--config", "models/sd15", "--print_config"],
                                  cwd=work).stdout)
    assert printed["model"]["class_path"] == "sage_lightning.searches.LatentSearch"  # the default config's
    assert printed["data"]["class_path"] == "sage_lightning.datamodules.ClassPromptDataModule"
    assert [c["class_path"] for c in printed["trainer"]["callbacks"]] == [
        "sage_lightning.callbacks.ClampPerturbation", "sage_lightning.callbacks.LatentProjection"]
    assert printed["model"]["init_args"]["diffusion"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # the group's
    proc = subprocess.run([str(bin_dir / "sage"), "fit", "--config", "latent_serch"], cwd=work, env=ENV,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("sage: error: --config 'latent_serch'"), proc.stderr
    assert "latent_search_tiny" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_a_tiny_search_runs_from_another_folder(installed):
    bin_dir, work = installed
    _run([str(bin_dir / "sage"), "fit", "--config", "latent_search_tiny", "--trainer.default_root_dir", "run",
          "--data.init_args.classes", "[star]", "--data.init_args.seeds_per_class", "1",
          "--model.init_args.max_iterations", "1", "--trainer.enable_progress_bar", "false"], cwd=work)
    lines = (work / "run" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"class": "star"' in lines[0]
    assert not (REPO / "run").exists()
