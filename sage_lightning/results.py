"""The run folder: ``results.jsonl`` (atomic lines), images (PNG) and tensors (safetensors).

Only this module and the writer callback touch the run folder. Every file is written to a temporary
name and renamed, and every result line is one ``write`` followed by ``fsync``, so a crash never
leaves a half line, and a resume never duplicates a target.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from sage_lightning.errors import SageError

RESULTS = "results.jsonl"


def _replace_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``[H, W, 3]`` uint8 (rounded, as PIL would store it)."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def _json_line(record: dict) -> str:
    """One strict JSON line (NaN and infinities are not JSON: SageError instead of writing them)."""
    try:
        return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as err:
        raise SageError(
            f"the result of target {record.get('target')} holds a non-finite value ({err}): the search diverged; "
            "nothing non-finite is written"
        ) from err


class RunFolder:
    """One search run's outputs under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS

    def read_results(self) -> list[dict]:
        """Complete result lines (a trailing partial line from a crash is ignored)."""
        if not self.results_path.exists():
            return []
        text = self.results_path.read_text()
        lines = text.split("\n")
        return [json.loads(line) for line in lines[:-1] if line.strip()]

    def written_ids(self) -> set[int]:
        return {int(r["target"]) for r in self.read_results()}

    def append_results(self, records: list[dict]) -> None:
        """Append one JSON line per record, skipping targets already written (idempotent on resume)."""
        done = self.written_ids()
        fresh = [r for r in records if int(r["target"]) not in done]
        if not fresh:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        if self.results_path.exists():  # drop a partial last line left by a crash mid-write
            text = self.results_path.read_text()
            if text and not text.endswith("\n"):
                _replace_atomically(self.results_path, lambda p: p.write_text(text[: text.rfind("\n") + 1]))
        payload = "".join(_json_line(r) for r in sorted(fresh, key=lambda r: r["target"]))
        with open(self.results_path, "a") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    def save_image(self, relpath: str, image: torch.Tensor) -> str:
        """Save ``[3, H, W]`` in [0, 1] as PNG; returns the path relative to the run folder."""
        array = to_uint8(image)
        _replace_atomically(self.root / relpath, lambda p: Image.fromarray(array).save(p, format="PNG"))
        return relpath

    def save_tensors(
        self, relpath: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> str:
        """Save tensors with safetensors; returns the path relative to the run folder."""
        cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        _replace_atomically(self.root / relpath, lambda p: save_file(cpu, str(p), metadata=metadata))
        return relpath

    def load_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        return load_file(str(self.root / relpath))

    def save_json(self, relpath: str, data: dict) -> str:
        """Save ``data`` as strict JSON (no NaN: SageError); returns the path relative to the run folder."""
        try:
            text = json.dumps(data, indent=2, allow_nan=False) + "\n"
        except ValueError as err:
            raise SageError(f"{relpath} would hold a non-finite value ({err}): nothing non-finite is written") from err
        _replace_atomically(self.root / relpath, lambda p: p.write_text(text))
        return relpath

    def save_bytes(self, relpath: str, data: bytes) -> str:
        """Save an already encoded file (a PNG or SVG plot); returns the path relative to the run folder."""
        _replace_atomically(self.root / relpath, lambda p: p.write_bytes(data))
        return relpath
