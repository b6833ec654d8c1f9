"""``--config NAME`` finds a shipped config; in a checkout, callbacks/ and datamodules/ are sage_lightning's
subpackages (issue 22 item 6). The installed wheel is tested in test_wheel.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ENV, REPO, error_of

from sage_lightning.errors import SageError
from sage_lightning.shipped_configs import configs_folder, resolve_config, resolve_config_args, shipped_names


def test_names_are_the_configs_folder():
    assert configs_folder() == REPO / "configs"
    names = shipped_names()
    assert {"latent_search", "latent_search_tiny", "models/sd15", "models/tiny_xl", "trainer/gpu"} <= set(names)
    assert len(names) == len(list((REPO / "configs").rglob("*.yaml")))


@pytest.mark.parametrize("value", ["models/sd15", "models/sd15.yaml", "configs/models/sd15.yaml", "./models/sd15"])
def test_a_name_or_the_readme_path_finds_the_shipped_config(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from another folder: configs/models/sd15.yaml is not a file here
    assert resolve_config(value) == str(REPO / "configs" / "models" / "sd15.yaml")


def test_an_existing_file_wins_and_a_missing_path_is_left_to_the_parser(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latent_search").write_text("seed_everything: 1\n")
    assert resolve_config("latent_search") == "latent_search"
    assert resolve_config("/no/such/config.yaml") == "/no/such/config.yaml"
    assert resolve_config("{seed_everything: 1}") == "{seed_everything: 1}"  # inline YAML
    args = ["fit", "--config", "models/sd15", "--config=trainer/gpu", "-c", "latent_search", "--seed_everything", "1"]
    assert resolve_config_args(args) == ["fit", "--config", str(REPO / "configs/models/sd15.yaml"),
                                         f"--config={REPO / 'configs/trainer/gpu.yaml'}", "-c", "latent_search",
                                         "--seed_everything", "1"]


def test_an_unknown_name_is_one_line_listing_the_shipped_ones(capsys):
    with pytest.raises(SageError, match="neither a file nor a shipped config"):
        resolve_config("models/../latent_search")
    err = error_of(["fit", "--config", "latent_serch"], capsys)
    assert err.startswith("sage: error: --config 'latent_serch' is neither") and len(err.splitlines()) == 1, err
    assert "latent_search, latent_search_tiny" in err and "models/sd15" in err


def test_in_a_checkout_the_folders_are_sage_lightnings_subpackages():
    """Plain PYTHONPATH=<checkout>, as the tests and helpers run: the same module objects by either route (a
    class path in a config, an import), from the checkout's own folders."""
    code = (
        "import importlib, sage_lightning.callbacks as c, sage_lightning.datamodules as d\n"
        "from sage_lightning.callbacks.clamp import ClampPerturbation\n"
        "path = importlib.import_module('sage_lightning.callbacks.clamp')\n"
        "print(c.__file__, d.__file__, c.ClampPerturbation is ClampPerturbation is path.ClampPerturbation)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO / "tests",
                          env={**ENV, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [str(REPO / "callbacks" / "__init__.py"), str(REPO / "datamodules" / "__init__.py"),
                                   "True"]


def test_a_run_folder_config_with_old_class_paths_is_refused_with_the_command_that_fixes_it(tmp_path, capsys):
    """A config.yaml saved when callbacks/ was a top-level package: loaded as it is, its clamp would be another
    copy of the class (the search would add its own once more); the error's command rewrites it."""
    saved = tmp_path / "config.yaml"
    old = "class_path: "  # written apart so that an import-renaming script leaves these old paths alone
    saved.write_text(f"trainer:\n  callbacks:\n  - {old}callbacks.ClampPerturbation\n"
                     "    init_args: {low: -1.0, high: 1.0}\n"
                     "  - class_path: sage_lightning.callbacks.LatentProjection\n"
                     f"data:\n  {old}datamodules.ClassPromptDataModule\n")
    with pytest.raises(SageError, match="callbacks.ClampPerturbation.*sage_lightning.callbacks.ClampPerturbation"):
        resolve_config(str(saved))
    err = error_of(["fit", "--config", str(saved)], capsys)
    assert len(err.splitlines()) == 1 and "old top-level name" in err
    command = err.split("run ", 1)[1]
    subprocess.run(command, shell=True, check=True)
    assert resolve_config(str(saved)) == str(saved)
    text = saved.read_text()
    assert "class_path: sage_lightning.callbacks.ClampPerturbation" in text
    assert "class_path: sage_lightning.datamodules.ClassPromptDataModule" in text
    assert "sage_lightning.sage_lightning" not in text
