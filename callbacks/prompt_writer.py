"""Write what prompt search finds: a grid of the S images of every evaluated prompt, one line per target.

Per target: ``images/NNNNN_wK.png`` (the grid of the S evaluation images of the prompt with K words;
``_w0`` is the bare template) and a line in ``results.jsonl`` with the prompt, the words in order, the
per-seed decisions of D, each member's probabilities per seed, the judge's verdict (where the model has
a judge), the history of rounds and the cost in UNet evaluations. At the end: ``summary.json``
(SSR(A), SSR(J), cost per failure; with a judge, how often D and the judge agree on the bare template's
images, ``clean_agreement``) and ``gallery.png`` (template | failing prompt grids). A target whose
bare template already fails D is recorded with ``already_failing`` and left out of SSR (SAGE searches from
prompts the model gets right).
Each rank saves the grids of the prompts it evaluated; rank 0 writes the lines (the search already
shares every decision between ranks).
"""

from __future__ import annotations

import json

import torch
from torchvision.utils import make_grid

from sage_lightning.callbacks.failure_writer import FailureWriter, agreement_note, summary_line
from sage_lightning.searches.base import FOUND
from sage_lightning.summary import PROMPT, majority, run_summary, searched_failures
from sage_lightning.surrogate.ensemble import member_names


def grid_path(target: int, words: int) -> str:
    return f"images/{target:05d}_w{words}.png"


def judge_verdict(decisions: list[bool], judged: list[str | None], class_name: str, found: bool) -> dict:
    """The judge on a prompt's S seeds: per seed whether it misses the class (``failed``), and whether it confirms
    D's failure on the same images: a strict majority of the S seeds fail for D *and* the judge (``confirmed``), the
    rule D's own failure follows; D and the judge agreeing on different seeds confirms nothing."""
    wrong = [shape != class_name for shape in judged]
    both = [bool(d) and w for d, w in zip(decisions, wrong, strict=True)]
    return {"shapes": judged, "failed": wrong, "failed_seeds": sum(wrong), "confirmed_seeds": sum(both),
            "confirmed": found and majority(both)}


class PromptResultWriter(FailureWriter):
    """The writer of :class:`~sage_lightning.searches.PromptSearch` (added by the search if missing)."""

    def record(self, pl_module, target: int) -> dict:
        t = pl_module.targets[target]
        last = pl_module.last[target]
        record = {
            "target": target, "class": t.class_name, "template": t.prompt, "seed": t.seed,
            "prompt": pl_module.prompt_of(target), "words": list(pl_module.words[target]),
            "found": int(pl_module.status[target]) == FOUND, "reason": pl_module.reason[target],
            "already_failing": pl_module.reason[target] == "template fails",
            "iterations": int(pl_module.iterations[target]),
            "unet_evaluations": pl_module.target_unet_evaluations(target),
            "forward_equivalents": pl_module.target_forward_equivalents(target),
            "rounds": list(pl_module.rounds[target]),
            "clean_image": grid_path(target, 0) if pl_module.check_template else None,
            "image": None, "eval_seeds": None, "decisions": None, "failed_seeds": None, "probs": None,
            "judge": None,
        }
        if last is None:
            return record
        names = member_names(pl_module.frozen.ensemble)
        record.update(
            prompt=last["prompt"],  # the prompt the decisions below belong to
            words=last["prompt"][len(t.prompt) :].split(),
            image=grid_path(target, last["words"]),
            eval_seeds=pl_module.eval_seed_list(target),
            decisions=last["decisions"],
            failed_seeds=sum(last["decisions"]),
            probs={n: last["probs"][m] for m, n in enumerate(names)},
        )
        if last["judged"] is not None:
            record["judge"] = judge_verdict(last["decisions"], last["judged"], t.class_name, record["found"])
        return record

    @torch.no_grad()
    def flush(self, trainer, pl_module) -> None:
        for ev in pl_module.evaluations:
            nrow = max(1, min(len(ev.images), 8))
            self.run.save_image(grid_path(ev.target, ev.words), make_grid(ev.images, nrow=nrow, padding=2))
        pl_module.evaluations = []
        finished, pl_module.finished = pl_module.finished, []
        if trainer.is_global_zero and finished:
            self.run.append_results([self.record(pl_module, t) for t in sorted(set(finished))])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.flush(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.flush(trainer, pl_module)  # before the checkpoint (checkpoint callbacks run last)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        results = self.run.read_results()
        found = searched_failures(results)
        summary = run_summary(type(pl_module).__name__, results, len(pl_module.targets), PROMPT)
        (self.run.root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        pairs = [r for r in found if r["clean_image"] and r["image"] and r["words"]]
        if pairs:
            self.write_gallery(pairs[: self.gallery_size])
        print("\n" + summary_line(summary, "failing prompts", agreement_note(summary),
                                  f"{self.run.root.resolve()}/results.jsonl"))
