"""Prompt-independence of a failure latent (SAGE, finding 2: latents that are not outliers of N(0, I) yet give
distorted images *whatever the prompt*).

Each found z is re-rendered, with the run's own sampler and noise seed, under its own prompt (a check that the
failure reproduces), under the prompt of every other class (same template) and under :data:`STYLE_TEMPLATES`
(three style variants of its own prompt). Per latent: the share of those other prompts under which D still
fails (for prompt p of class c', "fails" means D misses c'); a share >= ``threshold`` (0.8) makes the latent
"distorted whatever the prompt".
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sage_lightning.analysis.common import (
    AnalysisRun,
    article,
    exemplar_figure,
    limited,
    progress,
    save_figure,
    wilson_interval,
    write_analysis,
)

NAME = "prompt_independence"
THRESHOLD = 0.8
EXEMPLARS = 8  # latents shown, and prompts per latent: its own, then the other classes' in class order
# Three style variants of a class prompt: in ShapesWorld's caption vocabulary (generator.STYLE_PHRASES) and
# plain English for Stable Diffusion alike.
STYLE_TEMPLATES = ("a drawing of {a} {c}", "a painting of {a} {c}", "a sketch of {a} {c}")


def style_prompts(class_name: str) -> list[str]:
    """The three style variants of ``class_name``'s prompt."""
    return [t.format(a=article(class_name), c=class_name) for t in STYLE_TEMPLATES]


def prompt_set(class_index: int, template: str, classes: Sequence[str]) -> list[tuple[str, int, str]]:
    """``(kind, class index, prompt)`` for one latent of class ``classes[class_index]``: its own prompt, every
    other class's (a class whose name repeats the latent's draws the same prompt: left out), three style variants."""
    name = classes[class_index]
    own = [("own", class_index, template.format(name))]
    others = [("other_class", i, template.format(c)) for i, c in enumerate(classes) if c != name]
    styles = [("style", class_index, p) for p in style_prompts(name)]
    return own + others + styles


@dataclass
class LatentVerdict:
    """One latent under its prompt set: D's decision per prompt (classes as indices into D's classes)."""

    kinds: list[str]
    classes: list[int]
    prompts: list[str]
    failed: list[bool]

    def share(self, kinds: tuple[str, ...] = ("other_class", "style")) -> tuple[int, int]:
        """(failing, total) over the prompts of ``kinds`` (the own prompt is the reproduction check)."""
        picked = [f for k, f in zip(self.kinds, self.failed, strict=True) if k in kinds]
        return sum(picked), len(picked)


def judge_latent(
    z: Tensor, prompts: list[tuple[str, int, str]], render_fails: Callable[[Tensor, list[str], list[int]], Tensor]
) -> LatentVerdict:
    """D's decision for ``z`` under each prompt; ``render_fails(z_batch, prompts, class indices) -> [B] bool``."""
    kinds, classes, texts = (list(x) for x in zip(*prompts, strict=True))
    failed = render_fails(z.unsqueeze(0).expand(len(texts), *z.shape), texts, classes)
    return LatentVerdict(kinds, classes, texts, [bool(f) for f in failed])


def analyze(run: AnalysisRun, max_latents: int | None = None, threshold: float = THRESHOLD) -> dict:
    """Re-render the run's found latents under every prompt; write ``analysis/prompt_independence.json``
    (deterministic: it draws nothing)."""
    run.require_latents("prompt-independence")
    found = limited(run.failures(), max_latents)
    classes = run.class_names
    rows, shown = [], []
    for record in progress(found, total=len(found), desc="prompt-independence"):
        noise = run.noise_seed(record)

        def render_fails(z: Tensor, texts: list[str], cls: list[int], noise: int = noise) -> Tensor:
            images = run.render(z, texts, [noise] * len(texts))
            if len(shown) < EXEMPLARS:
                shown.append(images[:EXEMPLARS])
            return run.decide(images, cls)

        verdict = judge_latent(run.latent(record), prompt_set(run.class_index_of(record), run.template_of(record),
                                                              classes), render_fails)
        k, n = verdict.share()
        k_other, n_other = verdict.share(("other_class",))
        k_style, n_style = verdict.share(("style",))
        rows.append({
            "target": record["target"], "class": record["class"], "prompt": record["prompt"],
            "reproduced": verdict.failed[0], "failing_prompts": k, "prompts": n, "share": k / n if n else None,
            "share_other_classes": k_other / n_other if n_other else None,
            "share_styles": k_style / n_style if n_style else None,
            "prompt_independent": bool(n) and k / n >= threshold,
            "still_drawn_under": ", ".join(p for p, f in zip(verdict.prompts[1:], verdict.failed[1:], strict=True)
                                           if not f),
        })
    independent = sum(r["prompt_independent"] for r in rows)
    low, high = wilson_interval(independent, len(rows))
    summary = {
        "search": run.search_name, "latents": len(rows), "failures_in_run": len(run.failures()),
        "threshold": threshold, "prompt_independent": independent,
        "share_prompt_independent": independent / len(rows) if rows else None,
        "share_ci95_low": low, "share_ci95_high": high,
        "reproduced_under_own_prompt": sum(r["reproduced"] for r in rows),
        "mean_failing_share": float(torch.tensor([r["share"] for r in rows]).mean()) if rows else None,
    }
    images = []
    if shown:
        groups = [(f"{r['target']} {r['class']}: {r['share']:.2f}", list(ims))
                  for r, ims in zip(rows, shown, strict=False)]
        images.append(save_figure(run.run, f"analysis/{NAME}/exemplars.png", exemplar_figure(groups, EXEMPLARS)))
    write_analysis(
        run.run, NAME, title="Prompt-independence of the failure latents (finding 2)", summary=summary, rows=rows,
        images=images,
        notes=f"""Each found z is re-rendered with the run's own sampler and noise seed under the prompt of every
        other class (the run's template) and under three style variants of its own prompt
        ({'; '.join(STYLE_TEMPLATES)}). 'share' is the fraction of those prompts under which D still fails (for
        another class's prompt: D does not see that class). A latent with share >= {threshold:g} is
        'distorted whatever the prompt' (the paper's finding 2). 'reproduced' checks that the latent still
        fails under its own prompt; 'still_drawn_under' lists the prompts the model drew correctly from it.
        The exemplar grid shows the first latents (label: target, class, share) under their own prompt, then
        the other classes' prompts in class order.
        D is the run's surrogate ensemble, not an independent judge.""",
    )
    return summary
