"""Write what a search finds into the run folder: images, latents, one result line per target.

Per target: ``images/NNNNN_clean.png`` (first evaluation), ``images/NNNNN_final.png`` (the failure, or
the last attempt), ``latents/NNNNN.safetensors`` (z, z0) and a line in ``results.jsonl``. At the end:
``summary.json`` (SSR(A), NGR, cost per failure) and ``gallery.png`` (every failure as a clean | failure pair,
labelled with its class, seed and iteration).
A target whose clean image (z0, iteration 0) already fails D is recorded with ``already_failing``: SAGE
searches from samples the model gets right, so it is left out of SSR (:func:`sage_lightning.summary.run_summary`).
Where the model has a judge (ShapesWorld), each line holds the judge's verdict on the clean image
(``clean_judge``) and ``summary.json`` how often D and the judge agree on the clean images
(``clean_agreement``, :func:`~sage_lightning.metrics.judge_agreement`).
Under DDP every rank writes its own targets' files; rank 0 writes the lines, gathered after each step.
"""

from __future__ import annotations

import json

import lightning as L
import torch

from sage_lightning.errors import SageError
from sage_lightning.metrics import gaussianity
from sage_lightning.results import RunFolder
from sage_lightning.searches.base import all_gather_objects
from sage_lightning.summary import LATENT, run_summary, searched_failures
from sage_lightning.surrogate.ensemble import member_names

_gather = all_gather_objects  # every rank's records, in rank order


JUDGES = ("auto", "shapesworld")


def shapesworld_judge(images: torch.Tensor) -> list[str | None]:
    """ShapesWorld's geometric judge on uint8 images ``[N, 3, H, W]``."""
    from sage_lightning.shapesworld.judge import judge_shapes

    return judge_shapes(images.permute(0, 2, 3, 1).contiguous().numpy())


class FailureWriter(L.Callback):
    """Writes each finished target of a search (see module docstring).

    Args:
        gallery_size: pairs shown in ``gallery.png`` (None: every failure).
        judge: ``"auto"`` (ShapesWorld's judge when the model is ShapesWorld), ``"shapesworld"``, or None.
    """

    def __init__(self, gallery_size: int | None = None, judge: str | None = "auto") -> None:
        if judge is not None and judge not in JUDGES:
            raise SageError(f"judge={judge!r} is unknown: use 'auto', 'shapesworld' or null")
        self.gallery_size, self.judge = gallery_size, judge

    def judge_of(self, pl_module):
        """The judge of this run (a function of uint8 images ``[N, 3, H, W]``), or None."""
        if self.judge == "shapesworld" or (self.judge == "auto" and pl_module.diffusion_source == "shapesworld"):
            return shapesworld_judge
        return None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.run = RunFolder(trainer.default_root_dir)

    def record(self, pl_module, k: int, target: int, paths: dict[str, str]) -> dict:
        out = pl_module.step_outputs
        t = pl_module.targets[target]
        iterations = int(out.iterations[k])
        z = out.latents[k]
        names = member_names(pl_module.frozen.ensemble)
        output_names = pl_module.frozen.ensemble.output_names
        return {
            "target": target, "class": t.class_name, "prompt": t.prompt, "seed": t.seed,
            "found": bool(out.found[k]), "already_failing": bool(out.found[k]) and iterations == 0,
            "iterations": iterations,
            "unet_evaluations": pl_module.unet_evaluations(iterations),
            "forward_equivalents": pl_module.forward_equivalents(iterations),
            "loss": float(out.output.per_sample_loss[k]),
            "probs": {n: float(out.output.probs[m, k]) for m, n in enumerate(names)},
            "top1": {n: output_names[int(out.output.topk[m, k, 0])] for m, n in enumerate(names)},
            "ngr": gaussianity(z), **paths, **self.judge_saved(pl_module, paths),
        }

    def judge_saved(self, pl_module, paths: dict[str, str]) -> dict[str, str | None]:
        """``{"clean_judge": shape, "final_judge": shape}``: the judge's verdicts on the saved clean and final
        images (read back, so a resumed run judges the same pixels); empty when the run has no judge."""
        judge = self.judge_of(pl_module)
        if judge is None:
            return {}
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        images = torch.stack([pil_to_tensor(Image.open(self.run.root / paths[key]).convert("RGB"))
                              for key in ("clean_image", "image")])
        clean, final = judge(images)
        return {"clean_judge": clean, "final_judge": final}

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
        found = searched_failures(results)
        summary = run_summary(type(pl_module).__name__, results, len(pl_module.targets), LATENT)
        (self.run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if found:
            self.write_gallery(found[: self.gallery_size])
        where = f"{self.run.root.resolve()}/results.jsonl, images/, gallery.png"
        measures = f", NGR {rate_text(summary['ngr'])}" + agreement_note(summary)
        print("\n" + summary_line(summary, "failures", measures, where))

    def write_gallery(self, found: list[dict]) -> None:
        """``gallery.png``: every failure of ``found`` as a labelled clean | failure pair (class, seed, iteration;
        :func:`~sage_lightning.report.gallery.labelled_pairs`)."""
        from PIL import Image

        from sage_lightning.report.gallery import gallery_label, labelled_pairs

        root = self.run.root
        pairs = [(Image.open(root / r["clean_image"]), Image.open(root / r["image"]), gallery_label(r)) for r in found]
        self.run.save_image("gallery.png", labelled_pairs(pairs))


def summary_line(summary: dict, noun: str, measures: str, where: str) -> str:
    """The run's one summary line: the search that ran, SSR(A) over the searched targets, the targets already
    failing before any search (left out of SSR), and plainly whether the trainer stopped before every target
    finished (those count as not found)."""
    ssr = summary["ssr_discriminator"]
    line = (
        f"{summary['search']} summary: {summary['failures']} {noun} in {summary['searched']} searched targets "
        f"(SSR {rate_text(ssr)}{measures}); {summary['already_failing']} of "
        f"{summary['targets']} targets already failing before any search, left out of SSR"
    )
    if summary["unfinished"]:
        line += (
            f". INCOMPLETE: {summary['unfinished']} of {summary['targets']} targets unfinished when the trainer "
            "stopped (counted as not found): resume with --ckpt_path last"
        )
    return f"{line}. Results: {where}"


def rate_text(value: float | None) -> str:
    """A rate as the summary lines print it: two decimals, ``n/a`` for None (nothing to take a share of)."""
    return "n/a" if value is None else f"{value:.2f}"


def agreement_note(summary: dict) -> str:
    """The summary line's note on the judge: SSR(J) where there is one, and how often D and the judge agree on
    the clean images (``clean_agreement``); nothing without a judge. Each appears once in the line."""
    ssr_judge = summary.get("ssr_judge")
    confirmed = "" if ssr_judge is None else f", SSR(J) {ssr_judge:.2f}"
    agreement = summary.get("clean_agreement")
    if not agreement or not agreement["images"]:
        return confirmed
    return f"{confirmed}, D and judge agree on {agreement['agree']} of {agreement['images']} clean images"

