"""Write what a search finds into the run folder: images, latents, one result line per target.

Per target: ``images/NNNNN_clean.png`` (first evaluation), ``images/NNNNN_final.png`` (the failure, or
the last attempt), ``latents/NNNNN.safetensors`` (z, z0) and a line in ``results.jsonl``. At the end:
``summary.json`` (SSR(A), NGR, cost per failure) and ``gallery.png`` (clean | failure pairs).
Under DDP every rank writes its own targets' files; rank 0 writes the lines, gathered after each step.
"""

from __future__ import annotations

import json

import lightning as L
import torch
import torch.distributed as dist
from torchvision.utils import make_grid

from sage_lightning.metrics import gaussianity, non_gaussian_rate, success_rate
from sage_lightning.results import RunFolder
from sage_lightning.surrogate.ensemble import member_names


def _gather(records: list[dict]) -> list[dict]:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[list[dict] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, records)
        return [r for part in everyone for r in (part or [])]
    return records


class FailureWriter(L.Callback):
    """Writes each finished target of a search (see module docstring). ``gallery_size``: pairs shown."""

    def __init__(self, gallery_size: int = 16) -> None:
        self.gallery_size = gallery_size

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.run = RunFolder(trainer.default_root_dir)

    def record(self, pl_module, k: int, target: int, paths: dict[str, str]) -> dict:
        out = pl_module.step_outputs
        t = pl_module.targets[target]
        iterations = int(out.iterations[k])
        z = out.latents[k]
        names = member_names(pl_module.frozen.ensemble)
        class_names = pl_module.frozen.ensemble.class_names
        return {
            "target": target, "class": t.class_name, "prompt": t.prompt, "seed": t.seed,
            "found": bool(out.found[k]), "iterations": iterations,
            "unet_evaluations": pl_module.unet_evaluations(iterations),
            "loss": float(out.output.per_sample_loss[k]),
            "probs": {n: float(out.output.probs[m, k]) for m, n in enumerate(names)},
            "top1": {n: class_names[int(out.output.topk[m, k, 0])] for m, n in enumerate(names)},
            "ngr": gaussianity(z), **paths,
        }

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        out = pl_module.step_outputs
        records = []
        for k, target in enumerate(out.targets.tolist()):
            if int(out.iterations[k]) == 0:
                self.run.save_image(f"images/{target:05d}_clean.png", out.images[k])
            if not bool(out.finished[k]):
                continue
            z0 = pl_module.initial_latents(torch.tensor([target]))[0]
            paths = {
                "clean_image": f"images/{target:05d}_clean.png",
                "image": self.run.save_image(f"images/{target:05d}_final.png", out.images[k]),
                "latent": self.run.save_tensors(
                    f"latents/{target:05d}.safetensors", {"z": out.latents[k], "z0": z0},
                    metadata={"prompt": pl_module.targets[target].prompt},
                ),
            }
            records.append(self.record(pl_module, k, target, paths))
        records = _gather(records)
        if trainer.is_global_zero:
            self.run.append_results(records)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        results = self.run.read_results()
        found = [r for r in results if r["found"]]
        summary = {
            "targets": len(pl_module.targets), "finished": len(results),
            "ssr_discriminator": success_rate([r["found"] for r in results]),
            "ngr": non_gaussian_rate([r["ngr"]["outlier"] for r in found]),
            "median_iterations_per_failure": _median([r["iterations"] for r in found]),
            "median_unet_evaluations_per_failure": _median([r["unet_evaluations"] for r in found]),
        }
        (self.run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if found:
            self.write_gallery(found[: self.gallery_size])
        print(
            f"\nSAGE: {len(found)} failures in {len(results)} targets (SSR {summary['ssr_discriminator']:.2f}, "
            f"NGR {summary['ngr']:.2f}). Results: {self.run.root.resolve()}/results.jsonl, images/, gallery.png"
        )

    def write_gallery(self, found: list[dict]) -> None:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        tiles = []
        for r in found:
            for key in ("clean_image", "image"):
                tiles.append(pil_to_tensor(Image.open(self.run.root / r[key]).convert("RGB")).float() / 255)
        self.run.save_image("gallery.png", make_grid(tiles, nrow=8, padding=2, pad_value=1.0))


def _median(values: list[float]) -> float | None:
    return float(torch.tensor(values, dtype=torch.float64).median()) if values else None
