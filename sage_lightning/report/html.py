"""The report page: one self-contained HTML file (inline CSS, no network), images as files relative to it.

Sections: the summary (SSR(A), SSR(J), NGR, cost per failure), SAGE against a baseline, the per-class table,
the plots, every failure labelled (latent: clean/final pair; prompt: the prompt with its added words marked and
the S-seed grid with each seed's decision; universal token: held-out prompts with and without the token), one
row per target, and every analysis the run holds (``analysis/*.json``).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

from sage_lightning.report.analyses import analysis_section
from sage_lightning.report.load import LATENT, PROMPT, TOKEN, RunData, analyses
from sage_lightning.report.markup import Raw, definitions, esc, fmt, image, table
from sage_lightning.report.numbers import (
    FAILURE_KIND_LABELS,
    class_rows,
    failure_kind_of,
    judge_confirms,
    measure,
    run_summary,
    searched_failures,
    summary_items,
)

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f3f3f3}dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#555}dd{margin:0}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:8px}.note,.notes{color:#555;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ccc;padding:6px;margin:0;font-size:12px}
.card img{width:128px;height:128px;image-rendering:pixelated;margin-right:4px}.card table{font-size:11px}
.card.confirmed{border:2px solid #2a7}.card.d-only{border:2px dashed #c70}.card.pre-existing{border:2px dotted #888}
.seeds{display:flex;flex-wrap:wrap;gap:4px}.seed{font-size:11px;text-align:center;margin:0}
.seed img{width:96px;height:96px;image-rendering:pixelated;display:block}
.fail{color:#b00020;font-weight:bold}.pass{color:#1b5e20}mark{background:#ffe066}
img.plot{max-width:640px;border:1px solid #eee}.plots{display:flex;flex-wrap:wrap;gap:12px}
"""

LOAD_CHECK = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', imgs.length);
  var names = broken.map(function (i) { return i.getAttribute('src'); });
  document.body.setAttribute('data-images-broken', names.join(' '));
});
</script>"""


class Page:
    """Paths as the page sees them: run-relative files, relative to the folder of the HTML file."""

    def __init__(self, run: RunData, out: Path) -> None:
        self.run, self.out = run, out

    def src(self, rel: str | None) -> str | None:
        """The page's path to run file ``rel``; None when there is no such file."""
        if not rel or not (self.run.root / rel).is_file():
            return None
        return Path(os.path.relpath((self.run.root / rel).resolve(), self.out.parent.resolve())).as_posix()

    def img(self, rel: str | None, alt: str, cls: str = "") -> str:
        where = self.src(rel)
        return image(where, alt, cls) if where else f"<span class='warn'>missing {esc(rel)}</span>"


def _status(record: dict) -> Raw:
    if record.get("already_failing"):
        return Raw("<span class='note'>already failing (left out of SSR)</span>")
    if record.get("found"):
        return Raw("<span class='fail'>failure found</span>")
    return Raw("<span class='pass'>no failure (budget spent)</span>")


def marked_prompt(record: dict) -> Raw:
    """The prompt with the words the search added marked (the bare template unmarked)."""
    template = str(record.get("template") or record.get("prompt") or "")
    words = record.get("words") or []
    added = f" <mark>{esc(' '.join(words))}</mark>" if words else ""
    return Raw(f"{esc(template)}{added}")


def target_rows(run: RunData) -> list[dict]:
    """One row per finished target (universal token: per held-out prompt)."""
    rows = []
    for r in run.results:
        if run.kind == TOKEN:
            rows.append({"target": r["target"], "class": r.get("class"), "prompt": r.get("prompt"),
                         "seed": r.get("seed"), "hit with token": r["with_token"]["hit"],
                         "hit without token": r["without_token"]["hit"],
                         "judge with token": r["with_token"].get("judge")})
            continue
        row = {"target": r["target"], "class": r.get("class"), "seed": r.get("seed"),
               "prompt": marked_prompt(r) if run.kind == PROMPT else r.get("prompt"), "status": _status(r),
               "iterations": r.get("iterations"), "forward-equivalents": r.get("forward_equivalents")}
        verdict = judge_confirms(r) if r.get("found") else None
        if "final_judge" in r or r.get("judge") is not None:
            row["judge confirms"] = verdict
        if r.get("found") and failure_kind_of(r) is not None:
            row["failure kind"] = failure_kind_of(r)
        rows.append(row)
    return rows


def member_table(probs: dict, top1: dict | None, class_name: str) -> str:
    rows = [{"member": m, f"p({class_name})": p, **({"top-1": top1.get(m)} if top1 else {})} for m, p in probs.items()]
    return table(rows, cap=50)


def card(target: int, caption: str, *blocks: str, cls: str = "card failure") -> str:
    """One target's figure: its image blocks, then its caption."""
    return f"<figure class='{cls}' id='target-{target}'>{''.join(blocks)}<figcaption>{caption}</figcaption></figure>"


def latent_cards(page: Page) -> str:
    """Every failure as a clean/final pair, labelled with class, seed, iteration, D's members and the judge."""
    cards = []
    for r in searched_failures(page.run.results):
        judge = ""
        kind = failure_kind_of(r)
        if kind is not None:
            judge = (f"<div>judge: clean sees {esc(r.get('clean_judge') or 'no shape')}, final sees "
                     f"{esc(r.get('final_judge') or 'no shape')} — <b>{esc(FAILURE_KIND_LABELS[kind])}</b></div>")
        label = f"target {r['target']}: {r.get('class')}, seed {r.get('seed')}, iteration {r.get('iterations')}"
        caption = (f"<b>{esc(r.get('class'))}</b> · seed {esc(r.get('seed'))} · iteration {esc(r.get('iterations'))}"
                   f" · {esc(fmt(r.get('forward_equivalents')))} forward-equivalents<div class='note'>left: clean "
                   f"(z0) · right: failure (z); D's members on the failure:</div>"
                   f"{member_table(r.get('probs') or {}, r.get('top1'), str(r.get('class')))}{judge}")
        cards.append(card(r["target"], caption, page.img(r.get("clean_image"), f"{label}: clean"),
                          page.img(r.get("image"), f"{label}: failure"),
                          cls=f"card failure {kind.replace('_', '-')}" if kind else "card failure"))
    return _cards(cards, "failures found by the search")


def seed_figures(page: Page, r: dict) -> str:
    """The S evaluation seeds of a prompt: each seed's image (cut from the grid), D's decision, the judge's shape
    and each member's probability of the class."""
    from sage_lightning.report.plots import seed_tiles

    seeds = r.get("eval_seeds") or []
    decisions = r.get("decisions") or []
    shapes = (r.get("judge") or {}).get("shapes") or [None] * len(seeds)
    tiles = seed_tiles(page.run, str(r.get("image") or ""), len(seeds), f"{r['target']:05d}_final")
    figures = []
    for k, seed in enumerate(seeds):
        failed = k < len(decisions) and decisions[k]
        decision = "<span class='fail'>D fails</span>" if failed else "<span class='pass'>D passes</span>"
        judged = f"<br>judge: {esc(shapes[k] or 'no shape')}" if r.get("judge") else ""
        p = "<br>".join(f"{esc(m)}: {fmt(v[k])}" for m, v in (r.get("probs") or {}).items() if k < len(v))
        figures.append(f"<figure class='seed'>{page.img(tiles[k], f'seed {seed}')}seed {esc(seed)}<br>"
                       f"{decision}{judged}<br><span class='note'>{p}</span></figure>")
    return f"<div class='seeds'>{''.join(figures)}</div>"


def prompt_cards(page: Page) -> str:
    """Every failing prompt: its added words marked, and the S-seed grid with each seed's decision."""
    cards = []
    for r in searched_failures(page.run.results):
        seeds = len(r.get("eval_seeds") or [])
        judge = ""
        if r.get("judge"):
            judge = (f"<div>judge confirms: <b>{fmt(judge_confirms(r))}</b> ({r['judge'].get('failed_seeds')} of "
                     f"{seeds} seeds without the class)</div>")
        caption = (f"<b>{esc(r.get('class'))}</b> · target {r['target']} · “{marked_prompt(r).html}” · "
                   f"{len(r.get('words') or [])} added words · {r.get('failed_seeds')} of {seeds} seeds fail D{judge}")
        grid = page.img(r.get("clean_image"), f"target {r['target']}: template grid", "plot")
        template = f"<div class='note'>bare template “{esc(r.get('template'))}” on the same seeds:</div>{grid}"
        cards.append(card(r["target"], caption, template, "<div class='note'>with the added words:</div>",
                          seed_figures(page, r)))
    return _cards(cards, "failing prompts")


def token_cards(page: Page) -> str:
    """Each held-out prompt without and with the universal token."""
    cards = []
    for r in page.run.results:
        w, wo = r["with_token"], r["without_token"]
        caption = (f"“{esc(r.get('prompt'))}” · seed {esc(r.get('seed'))}<div class='note'>left: without the token · "
                   f"right: with it</div>hit: {fmt(wo['hit'])} → <b>{fmt(w['hit'])}</b>{_token_judge(wo, w)}"
                   f"{member_table(w.get('p_target') or {}, w.get('top1'), 'target')}")
        cards.append(card(r["target"], caption, *(page.img(r[key].get("image"), f"target {r['target']}: {key}")
                                                  for key in ("without_token", "with_token")), cls="card"))
    return _cards(cards, "held-out prompts")


def _token_judge(without: dict, with_: dict) -> str:
    if without.get("judge_hit") is None:
        return ""
    return f" · judge: {esc(fmt(without.get('judge')))} → {esc(fmt(with_.get('judge')))}"


def _cards(cards: list[str], what: str) -> str:
    if not cards:
        return f"<p class='empty'>No {what}.</p>"
    return f"<div class='cards'>{''.join(cards)}</div>"


def token_summary(summary: dict) -> str:
    """Hit rates (ensemble, judge) and CLIP scores, with and without the token."""
    rows = []
    for label, key in (("hit rate, D's ensemble", "hit_rate_ensemble"), ("hit rate, judge", "hit_rate_judge"),
                       ("CLIP score against the original prompt", "clip_score")):
        value = summary.get(key)
        value = value if isinstance(value, dict) else {}
        rows.append({"measure": label, "without token": measure(value.get("without_token")),
                     "with token": measure(value.get("with_token"))})
    return table(rows)


def baseline_section(comparison: dict) -> str:
    ratio = comparison["ratio"]
    unit = "forward-equivalents" if comparison["unit"] == "forward_equivalents" else comparison["unit"]
    items = [
        ("baseline run", f"{comparison['baseline_run']} ({comparison['baseline_search']})"),
        (f"SAGE: failures per 1,000 {unit}", comparison["sage_rate_per_1000"]),
        (f"baseline: failures per 1,000 {unit}", comparison["baseline_rate_per_1000"]),
        ("failures / searched targets", f"SAGE {comparison['sage_failures']}/{comparison['sage_targets']}, "
                                        f"baseline {comparison['baseline_failures']}/{comparison['baseline_targets']}"),
        ("SAGE ÷ baseline discovery rate", Raw(
            f"<b>{esc(fmt(ratio))}</b> ({int(comparison['level'] * 100)}% bootstrap interval "
            f"{esc(fmt(comparison['ci_low']))} – {esc(fmt(comparison['ci_high']))}, {comparison['draws']} draws "
            f"{'paired ' if comparison['paired'] else ''}over targets, seed {comparison['seed']})")),
    ]
    return ("<section id='baseline'><h2>SAGE against the baseline</h2>" + definitions(items) +
            "<p class='notes'>Discovery rate: failures D declared per 1,000 forward-equivalents spent on the searched "
            "targets (a UNet forward = 1, a backward = 2). A ratio above 1 means SAGE finds more failures for the "
            "same compute.</p></section>")


def render(run: RunData, out: Path, plots: list[str], comparison: dict | None = None) -> str:
    """The whole page as a string."""
    page = Page(run, out)
    summary = run_summary(run)
    title = f"SAGE report: {run.search} on {run.model}"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{esc(title)}</h1>"
             f"<p class='note'>run folder {esc(run.root.resolve())} · written "
             f"{datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M UTC')}</p>"]
    if not run.finished:
        known = run.targets
        parts.append(f"<p class='warn' id='unfinished'><b>Run unfinished</b>: {len(run.results)} of "
                     f"{known if known is not None else 'an unknown number of'} targets finished"
                     f"{'' if run.summary else ' and no summary.json was written (the run was stopped)'}; the numbers "
                     "below are from the finished targets, unfinished ones count as not found. Resume it with "
                     "sage fit --config RUN/config.yaml --ckpt_path last.</p>")
    parts.append("<section id='summary'><h2>Summary</h2>" + definitions(summary_items(run, summary)) + "</section>")
    if run.kind == TOKEN:
        parts.append("<section id='token'><h2>Universal token</h2>" + token_summary(summary) + "</section>")
    if comparison is not None:
        parts.append(baseline_section(comparison))
    parts.append("<section id='classes'><h2>Per class</h2>" + table(class_rows(run), cls="classes") + "</section>")
    if plots:
        parts.append("<section id='plots'><h2>Plots</h2><div class='plots'>" +
                     "".join(page.img(p, p, "plot") for p in plots) + "</div></section>")
    cards = {LATENT: latent_cards, PROMPT: prompt_cards, TOKEN: token_cards}[run.kind](page)
    heading = {LATENT: "Failures: clean | failure", PROMPT: "Failing prompts", TOKEN: "Held-out prompts"}[run.kind]
    parts.append(f"<section id='failures'><h2>{heading}</h2>{cards}</section>")
    parts.append("<section id='targets'><h2>Every target</h2>" +
                 table(target_rows(run), cls="targets", row_cls="target-row", cap=10**9) + "</section>")
    found = analyses(run.root)
    if found:
        parts.append("<section id='analyses'><h2>Analyses</h2>" +
                     "".join(analysis_section(name, content, page.src) for name, content in found) + "</section>")
    parts.append(LOAD_CHECK + "</body></html>")
    return "\n".join(parts)
