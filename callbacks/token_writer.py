"""Write the universal-token search's outputs into the run folder.

At the end of training, the held-out prompts (never seen by the optimisation) are rendered with and
without the token (each rank its share) and written as:

* ``token.safetensors``: ``embedding`` ``[D]`` with metadata ``placeholder``, ``text_encoder``,
  ``dimension``, ``target``, ``diffusion``, ``slot`` (README, "Universal token", loads it into diffusers);
* ``images/heldout_NNNNN_without.png`` / ``_with.png`` and ``grid.png`` (top row without, bottom with);
* ``results.jsonl``: one line per held-out prompt: each member's probability of the target and top-1,
  the ensemble hit (every member's top-1 is the target), the judge's verdict where there is a judge;
* ``summary.json``: hit rates with and without the token (ensemble, judge), the CLIP scores
  (from ``sage_lightning.callbacks.ClipScoreLogger``, when it runs) and, with a judge, how often D and the
  judge agree on the clean images (held out, without the token; ``clean_agreement``).
"""

from __future__ import annotations

import json

import torch
from torchvision.utils import make_grid

from sage_lightning.callbacks.clip_score import SCORE_KEYS
from sage_lightning.callbacks.failure_writer import FailureWriter, _gather, agreement_note, rate_text
from sage_lightning.metrics import judge_agreement, success_rate
from sage_lightning.surrogate.ensemble import member_names

TOKEN_FILE = "token.safetensors"


class TokenWriter(FailureWriter):
    """The run-folder writer of :class:`UniversalTokenSearch` (a ``FailureWriter``: the run's one writer).

    Args:
        grid_size: held-out prompts shown in ``grid.png``.
        judge: ``"auto"`` (ShapesWorld's judge when the model is ShapesWorld), ``"shapesworld"``, or None.
    """

    def __init__(self, grid_size: int = 8, judge: str | None = "auto") -> None:
        super().__init__(gallery_size=grid_size, judge=judge)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        """Nothing per step: the token is evaluated once, at the end."""

    def side(self, pl_module, evaluation, k: int, judged: list | None, path: str) -> dict:
        names = member_names(pl_module.frozen.ensemble)
        output_names = pl_module.frozen.ensemble.output_names
        verdict = judged[k] if judged is not None else None
        return {
            "hit": bool(evaluation.hit[k]),
            "d_failed": bool(evaluation.failed[k]),  # D on the prompt's own class
            "p_target": {n: float(evaluation.probs[m, k]) for m, n in enumerate(names)},
            "top1": {n: output_names[int(evaluation.top1[m, k])] for m, n in enumerate(names)},
            "judge": verdict,
            "judge_hit": None if judged is None else verdict == pl_module.target_name,
            "image": path,
        }

    @torch.no_grad()
    def on_train_end(self, trainer, pl_module) -> None:
        """Render and write (on the training devices, before Lightning tears the strategy down)."""
        judge = self.judge_of(pl_module)
        sides = {flag: pl_module.held_out_evaluation(flag) for flag in (False, True)}
        verdicts = {flag: judge(ev.images) if judge and ev.targets else None for flag, ev in sides.items()}
        records = []
        for k, t in enumerate(sides[True].targets):
            record = {"target": t.index, "class": t.class_name, "prompt": t.prompt, "seed": t.seed}
            for flag, key in ((False, "without_token"), (True, "with_token")):
                path = self.run.save_image(f"images/heldout_{t.index:05d}_{key[:-6]}.png", sides[flag].images[k] / 255)
                record[key] = self.side(pl_module, sides[flag], k, verdicts[flag], path)
            records.append(record)
        records = _gather(records)
        if trainer.is_global_zero:
            self.run.append_results(records)
            self.run.save_tensors(TOKEN_FILE, {"embedding": pl_module.token.detach().float()}, self.metadata(pl_module))

    @staticmethod
    def metadata(pl_module) -> dict[str, str]:
        model = pl_module.frozen.model
        encoders = [getattr(model, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        encoders = [e for e in encoders if e is not None]
        meta = {
            "placeholder": pl_module.placeholder,
            "slot": "[*]",
            "placement": pl_module.placement,
            "text_encoder": f"{pl_module.diffusion_source}:{'+'.join(type(e).__name__ for e in encoders)}",
            "dimension": str(pl_module.frozen.encoder.embed_dim),
            "target": pl_module.target_name,
            "diffusion": pl_module.diffusion_source,
        }
        widths = getattr(pl_module.frozen.encoder, "widths", None)
        if widths:  # SDXL, SD3, FLUX: the embedding's first widths[0] entries belong to text_encoder, and so on
            meta["widths"] = ",".join(str(w) for w in widths)
        return meta

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        results = self.run.read_results()
        summary = {
            "target_class": pl_module.target_name,
            "placeholder": pl_module.placeholder,
            "training_prompts": len(pl_module.targets),
            "held_out_prompts": len(results),
            "passes": int(pl_module.iterations.max()) if len(pl_module.iterations) else 0,
            "steps": trainer.global_step,
            "hit_rate_ensemble": _rates(results, "hit"),
            "hit_rate_judge": _rates(results, "judge_hit") if results and results[0]["with_token"]["judge_hit"]
            is not None else None,
            "clip_score": {k.split("/")[1]: float(trainer.callback_metrics[k]) for k in SCORE_KEYS.values()}
            if all(k in trainer.callback_metrics for k in SCORE_KEYS.values()) else None,
            "token_norm": float(pl_module.token.detach().norm()),
            "text_similarity": _held_out_similarity(pl_module),
            "token": TOKEN_FILE,
        }
        if results and results[0]["without_token"]["judge_hit"] is not None:
            clean = [r["without_token"] for r in results]
            summary["clean_agreement"] = judge_agreement(
                [c["d_failed"] for c in clean], [c["judge"] for c in clean], [r["class"] for r in results]
            )
        (self.run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        self.write_grid(results[: self.gallery_size])
        print(
            f"\n{type(pl_module).__name__} summary: token -> {summary['target_class']!r}: held-out hit rate (ensemble) "
            f"{rate_text(summary['hit_rate_ensemble']['with_token'])} with the token, "
            f"{rate_text(summary['hit_rate_ensemble']['without_token'])} without{agreement_note(summary)}. "
            f"Results: {self.run.root.resolve()}/summary.json, {TOKEN_FILE}, grid.png"
        )

    def write_grid(self, rows: list[dict]) -> None:
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        if not rows:
            return
        tiles = [
            pil_to_tensor(Image.open(self.run.root / r[key]["image"]).convert("RGB")).float() / 255
            for key in ("without_token", "with_token")
            for r in rows
        ]
        self.run.save_image("grid.png", make_grid(tiles, nrow=len(rows), padding=2, pad_value=1.0))


def _rates(results: list[dict], key: str) -> dict[str, float | None]:
    return {side: success_rate([bool(r[side][key]) for r in results]) for side in ("with_token", "without_token")}


def _held_out_similarity(pl_module) -> float | None:
    """Mean ``cos(text(p + e), text(p))`` over the held-out prompts (the text term of the loss; SAGE's "the CLIP
    score moves little" on the text side)."""
    if not pl_module.held_out:
        return None
    with torch.no_grad():
        return float(pl_module.text_similarity(pl_module.held_out).mean())
