"""Failure types: a small automatic analogue of the ten hand-made types of SAGE's prompt failures (finding 1).

Failure images (those of :func:`~sage_lightning.analysis.failure_kind.failure_images`) are grouped three ways:

* **drawn instead**: what the image shows instead of the class: ShapesWorld's judge (``no shape`` when it sees
  none), elsewhere the ensemble's top-1 (the class with the highest mean member probability; a proxy);
* **CLIP clusters**: KMeans on L2-normalised CLIP image embeddings (the run's world CLIP on ShapesWorld and the
  tiny stack, else ``--clip``), k chosen by the silhouette score over 2..``max_k``;
* **added-word role** (prompt search only): each added word's role from :data:`WORD_ROLES` (colour, size,
  background, style; ``other`` for the rest); a prompt counts once in each role its words take.

Each group gets exemplars in a labelled PNG grid.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from sage_lightning.analysis.common import (
    AnalysisRun,
    exemplar_figure,
    limited,
    quiet_loading,
    save_figure,
    write_analysis,
)
from sage_lightning.analysis.failure_kind import failure_images
from sage_lightning.errors import SageError

NAME = "failure_types"
OWN_CLASS = "the prompt's class (judge sees it)"
ROLES = ("colour", "size", "background", "style", "other")
# A small documented word list (ShapesWorld's caption vocabulary and common English); anything else is "other".
WORD_ROLES: dict[str, frozenset[str]] = {
    "colour": frozenset(
        "red green blue yellow orange purple white black gray grey pink brown violet cyan magenta gold golden "
        "silver beige turquoise crimson colorful colourful colored coloured dark light bright pale".split()
    ),
    "size": frozenset("small medium large big tiny huge little giant massive miniature tall short wide".split()),
    "background": frozenset(
        "background backdrop plain gradient textured texture sky grass field wall room street water sea beach "
        "forest snow table floor ground city landscape indoor outdoor night sunset".split()
    ),
    "style": frozenset(
        "photo photograph picture drawing sketch illustration painting oil watercolor watercolour cartoon art "
        "artwork style render rendering digital pixel abstract realistic vintage anime portrait".split()
    ),
}


def word_role(word: str) -> str:
    """The role of one added word (lower-cased, punctuation stripped), ``other`` when it is in no list."""
    clean = word.lower().strip(".,;:!?'\"()")
    return next((role for role, words in WORD_ROLES.items() if clean in words), "other")


def prompt_roles(words: Sequence[str]) -> set[str]:
    """The roles a prompt's added words take (``other`` alone for a prompt with no added words)."""
    return {word_role(w) for w in words} or {"other"}


def choose_k(features: np.ndarray, max_k: int = 8, seed: int = 0) -> tuple[int, np.ndarray, dict[int, float]]:
    """KMeans with k chosen by the silhouette score over ``2..max_k`` (k < number of points): ``(k, labels,
    {k: silhouette})``; fewer than 3 points, or identical ones, make one group."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    n = len(features)
    if n < 3 or np.allclose(features, features[0]):
        return 1, np.zeros(n, dtype=int), {}
    scores, labels = {}, {}
    for k in range(2, min(max_k, n - 1) + 1):
        fitted = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(features)
        if len(set(fitted.labels_)) < 2:
            continue
        scores[k] = float(silhouette_score(features, fitted.labels_))
        labels[k] = fitted.labels_
    if not scores:
        return 1, np.zeros(n, dtype=int), {}
    best = max(scores, key=lambda k: (scores[k], -k))
    return best, labels[best], scores


def default_clip(source: str) -> str:
    """The CLIP that embeds a model's images: the world's own on ShapesWorld and the tiny stack."""
    return "shapesworld" if source in ("shapesworld", "tiny") else "openai/clip-vit-base-patch32"


@torch.no_grad()
def clip_embeddings(
    images: list[Tensor], clip: str, batch_size: int = 32, local_files_only: bool = False
) -> np.ndarray:
    """L2-normalised CLIP image embeddings ``[N, D]`` of images ``[3, H, W]`` in [0, 1] (loaded as the CLIP score
    loads its model, :func:`sage_lightning.models.load_clip`)."""
    from sage_lightning.models import load_clip

    with quiet_loading():
        model, processor = load_clip(clip, local_files_only)
    out = []
    for start in range(0, len(images), batch_size):
        batch = [(im.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                 for im in images[start : start + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"]
        features = model.get_image_features(pixel_values=pixels).float()
        out.append(torch.nn.functional.normalize(features, dim=-1))
    return torch.cat(out).numpy() if out else np.zeros((0, 1), dtype=np.float32)


def _group_rows(grouping: str, labels: list[str], classes: list[str], examples: list[str]) -> list[dict]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        groups[label].append(i)
    rows = []
    for label, members in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        rows.append({
            "grouping": grouping, "group": label, "count": len(members), "share": len(members) / len(labels),
            "classes": ", ".join(f"{c} x{n}" for c, n in Counter(classes[i] for i in members).most_common()),
            "examples": "; ".join(dict.fromkeys(examples[i] for i in members[:3])),
        })
    return rows


def analyze(
    run: AnalysisRun,
    max_latents: int | None = None,
    max_k: int = 8,
    clip: str | None = None,
    seed: int = 0,
    local_files_only: bool = False,
) -> dict:
    """Write ``analysis/failure_types.json`` and one exemplar grid per grouping (see the module docstring)."""
    if max_k < 2:
        raise SageError(f"max_k={max_k} must be at least 2 (--max-k)")
    records = limited(run.failures(), max_latents)
    shown = failure_images(run, records)
    images = [image for _, _, image in shown]
    classes = [r["class"] for r, _, _ in shown]
    examples = [r["prompt"] if k is None else f"{r['prompt']} (seed {k})" for r, k, _ in shown]
    judge = run.judge()
    if judge is not None:
        drawn = [v or "no shape" for v in judge(torch.stack(images))] if images else []
        drawn = [OWN_CLASS if d == c else d for d, c in zip(drawn, classes, strict=True)]
        drawn_by = "ShapesWorld's geometric judge"
    else:
        names = run.class_names
        drawn = [names[int(run.member_probs(im.unsqueeze(0))[:, 0].mean(0).argmax())] for im in images]
        drawn_by = "ensemble top-1 (proxy)"
    rows = _group_rows("drawn instead", drawn, classes, examples)
    figures = []
    if images:
        groups = [(f"{row['group']} ({row['count']})", [images[i] for i, d in enumerate(drawn) if d == row["group"]])
                  for row in rows]
        figures.append(save_figure(run.run, f"analysis/{NAME}/drawn_instead.png", exemplar_figure(groups)))
    clip = clip or default_clip(run.diffusion_source)
    k, scores = 0, {}
    if images:
        features = clip_embeddings(images, clip, local_files_only=local_files_only)
        k, labels, scores = choose_k(features, max_k, seed)
        cluster_names = [f"cluster {int(c) + 1}" for c in labels]
        cluster_rows = _group_rows("CLIP cluster", cluster_names, classes, examples)
        rows += cluster_rows
        groups = [(f"{row['group']} ({row['count']})",
                   [images[i] for i, c in enumerate(cluster_names) if c == row["group"]]) for row in cluster_rows]
        figures.append(save_figure(run.run, f"analysis/{NAME}/clip_clusters.png", exemplar_figure(groups)))
    prompts = [r for r in records if r.get("words") is not None]
    role_counts: Counter = Counter()
    for role in ROLES:
        having = [r for r in prompts if role in prompt_roles(r["words"])]
        role_counts[role] = len(having)
        if having:
            rows.append({
                "grouping": "added-word role", "group": role, "count": len(having), "share": len(having) / len(prompts),
                "classes": ", ".join(f"{c} x{n}" for c, n in Counter(r["class"] for r in having).most_common()),
                "examples": "; ".join(r["prompt"] for r in having[:3]),
            })
    summary: dict = {
        "search": run.search_name, "failures": len(records), "images": len(images), "drawn_instead_by": drawn_by,
        "drawn_instead_groups": len({row["group"] for row in rows if row["grouping"] == "drawn instead"}),
        "clip": clip, "clip_clusters": k, "silhouette": scores.get(k), "seed": seed,
        "failing_prompts": len(prompts),
    }
    summary.update({f"prompts_with_{role}_words": role_counts[role] for role in ROLES} if prompts else {})
    roles_note = ", ".join(f"{role}: {' '.join(sorted(words)[:6])} ..." for role, words in WORD_ROLES.items())
    write_analysis(
        run.run, NAME, title="Failure types", summary=summary, rows=rows, images=figures,
        notes=f"""Failures grouped three ways (grouping column). 'drawn instead': what the failure image shows
        instead of its class, by {drawn_by}. 'CLIP cluster': KMeans on L2-normalised CLIP image embeddings
        ({clip}), k chosen by the best silhouette score over 2..{max_k} (k = {k}); clusters are unnamed, the
        exemplar grid shows them. 'added-word role' (prompt search only): a failing prompt counts once in each
        role its added words take, from a small word list ({roles_note}); other words are 'other'. A prompt
        failure counts every seed D failed as one image.""",
    )
    return summary
