"""Distorted vs natural-but-unrelated failures (SAGE, finding 3: latents that give natural images unrelated to
the prompt, beside those that give distorted images).

Each failure image the search wrote (latent search: ``images/NNNNN_final.png``; prompt search: the tiles of the
final grid whose seed D failed) is sorted into:

* ``distorted``: no recognisable object of any class;
* ``unrelated``: a clean object of another class (named);
* ``class drawn``: only with a judge, the judge sees the prompt's class (D's failure is not confirmed).

On ShapesWorld the geometric judge decides (no shape = distorted; a shape of another class = unrelated).
Elsewhere the ensemble D is a documented proxy: ``unrelated`` when every member's top-1 is the same other class
with mean probability >= ``confidence`` (confident agreement), ``distorted`` otherwise.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from sage_lightning.analysis.common import (
    AnalysisRun,
    exemplar_figure,
    grid_tiles,
    limited,
    load_image,
    progress,
    save_figure,
    wilson_interval,
    write_analysis,
)

NAME = "failure_kind"
DISTORTED, UNRELATED, CLASS_DRAWN = "distorted", "unrelated", "class drawn"
CONFIDENCE = 0.5


@dataclass
class FailureItem:
    """One failure image: its target's class, its kind, and the class drawn instead (unrelated only)."""

    target: int
    class_name: str
    kind: str
    drawn: str | None
    image: Tensor | None = None


def kind_from_judge(judged: str | None, class_name: str) -> tuple[str, str | None]:
    """The judge's verdict as a kind: no shape = distorted; another shape = unrelated (named); the class itself =
    class drawn (D's failure not confirmed)."""
    if judged is None:
        return DISTORTED, None
    if judged == class_name:
        return CLASS_DRAWN, None
    return UNRELATED, judged


def kind_from_probs(
    probs: Tensor, class_name: str, class_names: Sequence[str], confidence: float = CONFIDENCE
) -> tuple[str, str | None]:
    """The ensemble proxy on one image's member probabilities ``[M, C]``: unrelated when every member's top-1 is
    the same class other than ``class_name`` and their mean probability of it is >= ``confidence``."""
    top = probs.argmax(-1)
    agreed = int(top[0])
    if bool((top == agreed).all()) and class_names[agreed] != class_name:
        if float(probs[:, agreed].mean()) >= confidence:
            return UNRELATED, class_names[agreed]
    return DISTORTED, None


def per_class_rows(items: Sequence[FailureItem]) -> list[dict]:
    """The split per class: counts and shares of each kind, and which classes were drawn instead."""
    by_class: dict[str, list[FailureItem]] = defaultdict(list)
    for item in items:
        by_class[item.class_name].append(item)
    rows = []
    for name in sorted(by_class):
        group = by_class[name]
        kinds = Counter(i.kind for i in group)
        drawn = Counter(i.drawn for i in group if i.drawn)
        rows.append({
            "class": name, "failures": len(group), DISTORTED: kinds[DISTORTED], UNRELATED: kinds[UNRELATED],
            CLASS_DRAWN: kinds[CLASS_DRAWN],
            "share_distorted": kinds[DISTORTED] / len(group), "share_unrelated": kinds[UNRELATED] / len(group),
            "drawn_instead": ", ".join(f"{c} x{n}" for c, n in drawn.most_common()),
        })
    return rows


def failure_images(run: AnalysisRun, records: list[dict]) -> list[tuple[dict, int | None, Tensor]]:
    """``(record, seed index or None, image)`` of every failure image the run wrote: a latent search's final
    image, or the tiles of a prompt's final grid whose seed D failed."""
    out = []
    for record in records:
        if not record.get("image"):
            continue
        image = load_image(run.run, record["image"])
        decisions = record.get("decisions")
        if decisions is None:
            out.append((record, None, image))
            continue
        tiles = grid_tiles(image, len(decisions), nrow=max(1, min(len(decisions), 8)))
        out.extend((record, k, tile) for k, (tile, d) in enumerate(zip(tiles, decisions, strict=True)) if d)
    return out


def classify(run: AnalysisRun, records: list[dict], confidence: float = CONFIDENCE) -> tuple[list[FailureItem], str]:
    """Every failure image of ``records`` as a :class:`FailureItem`, and who decided (judge or ensemble proxy)."""
    judge = run.judge()
    shown = failure_images(run, records)
    items = []
    for record, k, image in progress(shown, total=len(shown), desc="failure kind"):
        if judge is not None:
            if k is None and "final_judge" in record:
                judged = record["final_judge"]
            elif k is not None and record.get("judge"):
                judged = record["judge"]["shapes"][k]
            else:
                judged = judge(image.unsqueeze(0))[0]
            kind, drawn = kind_from_judge(judged, record["class"])
        else:
            probs = run.member_probs(image.unsqueeze(0))[:, 0]
            kind, drawn = kind_from_probs(probs, record["class"], run.class_names, confidence)
        items.append(FailureItem(int(record["target"]), record["class"], kind, drawn, image))
    return items, "ShapesWorld's geometric judge" if judge is not None else "ensemble proxy"


def analyze(run: AnalysisRun, max_latents: int | None = None, confidence: float = CONFIDENCE) -> dict:
    """Write ``analysis/failure_kind.json`` and an exemplar grid per kind (deterministic: it draws nothing)."""
    records = limited(run.failures(), max_latents)
    items, decided_by = classify(run, records, confidence)
    rows = per_class_rows(items)
    kinds = Counter(i.kind for i in items)
    summary: dict = {"search": run.search_name, "decided_by": decided_by, "failures": len(records),
                     "images": len(items)}
    for kind in (DISTORTED, UNRELATED, CLASS_DRAWN):
        low, high = wilson_interval(kinds[kind], len(items))
        summary[kind] = kinds[kind]
        summary[f"share_{kind.replace(' ', '_')}"] = kinds[kind] / len(items) if items else None
        summary[f"share_{kind.replace(' ', '_')}_ci95"] = f"[{low:.2f}, {high:.2f}]" if items else None
    groups = [(f"{kind} ({kinds[kind]})", [i.image for i in items if i.kind == kind][:8])
              for kind in (DISTORTED, UNRELATED, CLASS_DRAWN) if kinds[kind]]
    images = [save_figure(run.run, f"analysis/{NAME}/exemplars.png", exemplar_figure(groups))] if groups else []
    proxy = (
        "ShapesWorld's geometric judge decides: no recognisable shape = distorted; a clean shape of another class "
        "= unrelated (drawn_instead names it); the prompt's own shape = class drawn (D's failure not confirmed)."
        if decided_by.startswith("ShapesWorld")
        else f"No independent judge for this model: the ensemble D is a proxy. A failure is 'unrelated' when "
        f"every member's top-1 is the same other class with mean probability >= {confidence:g} (confident "
        "agreement), 'distorted' otherwise; a proxy, not a human judgement."
    )
    write_analysis(
        run.run, NAME, title="Distorted vs natural-but-unrelated failures (finding 3)", summary=summary, rows=rows,
        images=images,
        notes=f"""Each failure image the search wrote (prompt search: every seed of the failing prompt that D
        failed) is sorted into a kind. {proxy} Rows split the failures per class of the target; shares carry
        Wilson 95% intervals in the summary.""",
    )
    return summary

