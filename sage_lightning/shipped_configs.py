"""The configs that ship with the package, found by name: ``sage fit --config latent_search``.

The repository's ``configs/`` folder (with its groups ``models/``, ``trainer/``) is installed as
``sage_lightning/configs/``; in a source checkout it is the top-level folder beside the package. A ``--config``
value that is an existing file is used as it is. Otherwise a bare name (``latent_search``, ``models/sd15``;
also ``configs/models/sd15.yaml``, the README's form, from any folder) is looked up among the shipped configs;
an unknown bare name is a one-line error listing them. A missing path that names no shipped config is left to
the parser, which reports the missing file.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sage_lightning.errors import SageError

CONFIG_FLAGS = ("--config", "-c")
SUFFIXES = (".yaml", ".yml", ".json")
# The callbacks and datamodules were once top-level packages; run folders of that time still name them so.
LEGACY_CLASS_PATH = re.compile(r"class_path:\s*['\"]?(callbacks|datamodules)\.(\w+(?:\.\w+)*)")


def configs_folder() -> Path:
    """The shipped configs: inside the installed package, else the checkout's top-level ``configs/``."""
    package = Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def shipped_names() -> list[str]:
    """Every shipped config by name: ``latent_search``, ``models/sd15``, ``trainer/gpu``, ..."""
    folder = configs_folder()
    return sorted(path.relative_to(folder).with_suffix("").as_posix() for path in folder.rglob("*.yaml"))


def shipped_config(value: str) -> Path | None:
    """The shipped config that ``value`` names (``models/sd15``, ``models/sd15.yaml``, ``configs/models/sd15``),
    or None."""
    name = value.replace("\\", "/").removeprefix("./").removeprefix("configs/")
    for suffix in SUFFIXES:
        name = name.removesuffix(suffix)
    path = configs_folder() / f"{name}.yaml"
    return path if name and ".." not in Path(name).parts and path.is_file() else None


def _is_bare_name(value: str) -> bool:
    """A name, not a path or inline YAML: relative, no file suffix, no YAML syntax."""
    return not (Path(value).is_absolute() or value.endswith(SUFFIXES) or any(c in value for c in ":{}[]\n ,"))


def check_class_paths(path: Path) -> None:
    """SageError naming the first old class path in the config at ``path`` (``callbacks.X``, now
    ``sage_lightning.callbacks.X``) and the command that rewrites it: loaded as it is, such a class would be
    another copy of the callback (in a checkout) or missing (in an installed wheel)."""
    found = LEGACY_CLASS_PATH.search(path.read_text(errors="replace"))
    if found:
        old = f"{found[1]}.{found[2]}"
        raise SageError(f"{path} names class_path {old}, its old top-level name; it is now sage_lightning.{old}: "
                        f"run sed -i -E 's/(class_path: *)(callbacks|datamodules)\\./\\1sage_lightning.\\2./' {path}")


def resolve_config(value: str) -> str:
    """The file ``--config value`` reads (see the module's docstring); raises SageError for an unknown name or
    a config that names a class by its old top-level path."""
    if Path(value).is_file():
        check_class_paths(Path(value))
        return value
    shipped = shipped_config(value)
    if shipped is not None:
        return str(shipped)
    if _is_bare_name(value):
        raise SageError(f"--config {value!r} is neither a file nor a shipped config; shipped: "
                        f"{', '.join(shipped_names())}")
    return value


def resolve_config_args(argv: list[str]) -> list[str]:
    """``argv`` with every ``--config X`` / ``--config=X`` (also ``-c``) value resolved by :func:`resolve_config`."""
    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag in CONFIG_FLAGS and eq:
            out[i] = f"{flag}={resolve_config(value)}"
        elif arg in CONFIG_FLAGS and i + 1 < len(out):
            out[i + 1] = resolve_config(out[i + 1])
    return out


def with_shipped_configs(args: list[str] | None) -> list[str] | None:
    """``args`` for LightningCLI with config names resolved. ``None`` (the command line) stays ``None`` and the
    names are resolved in ``sys.argv`` itself, which is also what DDP's launcher re-runs on the other ranks."""
    if args is not None:
        return resolve_config_args(args)
    sys.argv[1:] = resolve_config_args(sys.argv[1:])
    return None
