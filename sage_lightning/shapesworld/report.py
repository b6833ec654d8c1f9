"""A report of ShapesWorld itself: its gates, and the random-sampling failure rate SAGE must beat.

``python -m sage_lightning.shapesworld.report --out DIR``

1. Loads the shipped world through ``sage_lightning.models.load_diffusion("shapesworld")`` (the same
   code path as a user's Stable Diffusion) and generates, for each shape class, ``--per-class`` fresh
   prompt x seed draws (a fresh caption of the grammar naming that shape, a fresh seed) with the real
   diffusers ``StableDiffusionPipeline`` at the defaults in ``weights/world.json``.
2. The geometric judge names the shape of every image: per-class judge accuracy (gate: >= 85% overall)
   and its complement, the **random-sampling failure rate** per class (share of seeds whose image the
   judge rejects: the baseline SAGE must beat).
3. Judge accuracy on fresh procedural images and on the VAE's reconstructions of them; accuracy of the
   shipped classifiers (surrogate members) on fresh images, reconstructions and the generated images.
4. Writes ``grid.png`` (rows = classes; red frame = judge rejects), ``report.json``, and prints tables.

Parts whose weights are not shipped yet are reported as missing, not failed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from tqdm.auto import tqdm

from sage_lightning.models import load_diffusion
from sage_lightning.shapesworld.gates import GATES, class_prompt_gate, clip_zero_shot, generator_draw, text_gates
from sage_lightning.shapesworld.generator import SHAPES, caption, make_batch, sample_scene
from sage_lightning.shapesworld.judge import judge_image, judge_shapes, to_uint8
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR

GATE_GENERATED = 0.85
GATE_JUDGE_FRESH = 0.95
GATE_JUDGE_VAE = 0.95
GATE_CLASSIFIER = 0.98
CLASS_PROMPT_SEED = 7_000_000  # class-prompt draws: seeds far from training (batch seeds, pools, checks)


def world_defaults() -> dict:
    path = SHAPESWORLD_DIR / "world.json"
    defaults = {"num_inference_steps": 20, "guidance_scale": 3.0, "height": 64, "width": 64}
    if path.exists():
        defaults.update(json.loads(path.read_text()).get("defaults", {}))
    return defaults


def draws(per_class: int, seed: int) -> list[tuple[str, str, int]]:
    """``(shape, prompt, seed)`` for ``per_class`` fresh draws of every class, seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for shape in SHAPES:
        for _ in range(per_class):
            text = caption(sample_scene(rng, shape=shape), rng)
            out.append((shape, text, int(rng.integers(2**31))))
    return out


def shape_accuracy(pred: list[str | None], ids: np.ndarray) -> float:
    return float(np.mean([p == SHAPES[i] for p, i in zip(pred, ids, strict=True)])) if len(ids) else float("nan")


def per_class(pred: list[str | None], ids: np.ndarray) -> dict[str, float]:
    return {s: shape_accuracy([pred[i] for i in np.where(ids == k)[0]], ids[ids == k]) for k, s in enumerate(SHAPES)}


@torch.no_grad()
def generate(model, items: list[tuple[str, str, int]], defaults: dict, batch: int) -> np.ndarray:
    pipe = model.pipeline()
    pipe.set_progress_bar_config(disable=True)
    images = []
    for i in tqdm(range(0, len(items), batch), desc="generating", unit="batch"):
        chunk = items[i : i + batch]
        out = pipe(
            [p for _, p, _ in chunk], num_inference_steps=int(defaults["num_inference_steps"]),
            guidance_scale=float(defaults["guidance_scale"]), height=int(defaults.get("height", 64)),
            width=int(defaults.get("width", 64)),
            generator=[torch.Generator().manual_seed(s) for _, _, s in chunk], output_type="np",
        ).images
        images.append(to_uint8(out))
    return np.concatenate(images)


@torch.no_grad()
def vae_reconstruct(vae, images_u8: np.ndarray, batch: int = 100) -> np.ndarray:
    out = []
    for i in tqdm(range(0, len(images_u8), batch), desc="VAE reconstructions", unit="batch"):
        x = torch.from_numpy(images_u8[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
        z = vae.encode(x).latent_dist.mode()
        out.append(to_uint8((vae.decode(z).sample / 2 + 0.5).clamp(0, 1)))
    return np.concatenate(out)


def classifier_accuracies(sets: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, dict[str, float]]:
    from sage_lightning.shapesworld.classifiers import NAMES, accuracy, load_classifier

    result = {}
    for name in NAMES:
        try:
            clf = load_classifier(name)
        except FileNotFoundError:
            result[name] = {"missing": True}
            continue
        result[name] = {key: accuracy(clf, imgs, ids) for key, (imgs, ids) in sets.items()}
    return result


def write_grid(path: Path, images: np.ndarray, ids: np.ndarray, pred: list[str | None], scale: int = 2) -> None:
    cols = max(int((ids == k).sum()) for k in range(len(SHAPES)))
    h, w = images.shape[1:3]
    label_w = 90
    pad = 2
    grid = np.full((len(SHAPES) * (h * scale + pad), label_w + cols * (w * scale + pad), 3), 255, np.uint8)
    for k, shape in enumerate(SHAPES):
        y = k * (h * scale + pad)
        cv2.putText(grid, shape, (4, y + h * scale // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for j, i in enumerate(np.where(ids == k)[0]):
            tile = cv2.resize(images[i], (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
            if pred[i] != shape:
                cv2.rectangle(tile, (0, 0), (w * scale - 1, h * scale - 1), (255, 0, 0), 2)
            x = label_w + j * (w * scale + pad)
            grid[y : y + h * scale, x : x + w * scale] = tile
    cv2.imwrite(str(path), grid[..., ::-1])


def world_gates(model, defaults: dict, out: Path, per_class_n: int, seed: int, batch: int) -> dict:
    """The gates of issue "ShapesWorld that follows its prompts": class-prompt draws, text tower, CLIP."""

    def draw(prompts: list[str], seeds: list[int]) -> np.ndarray:
        return generate(model, [("", p, s) for p, s in zip(prompts, seeds, strict=True)], defaults, batch)

    figures, images, names = class_prompt_gate(draw, per_class_n, seed=CLASS_PROMPT_SEED + seed)
    reference, _, _ = class_prompt_gate(generator_draw, per_class_n, seed=CLASS_PROMPT_SEED + seed)
    figures["prompt_vs_seed_change_ratio_generator"] = reference["prompt_vs_seed_change_ratio"]
    ids = np.repeat(np.arange(len(SHAPES)), per_class_n)
    write_grid(out / "class_prompt_grid.png", images.reshape(-1, *images.shape[2:]), ids,
               [n for row in names for n in row])
    figures.update(text_gates(model.text_encoder))
    try:
        from sage_lightning.shapesworld.world import load_clip

        figures["clip_zero_shot_shape_accuracy"] = round(clip_zero_shot(load_clip()), 4)
    except OSError:
        pass
    figures["defaults"] = {k: defaults[k] for k in ("num_inference_steps", "guidance_scale", "scheduler")
                           if k in defaults}
    return figures


def _table(title: str, rows: dict[str, float], gate: float | None = None) -> str:
    lines = [f"\n{title}", f"{'class':<10} {'judge acc':>9} {'failure rate':>12}"]
    lines += [f"{k:<10} {v:>9.3f} {1 - v:>12.3f}" for k, v in rows.items()]
    return "\n".join(lines)


def run(out: Path, per_class_n: int = 20, seed: int = 0, n_fresh: int = 1000, n_vae: int = 500,
        batch: int = 50, steps: int | None = None, guidance: float | None = None,
        source: str = "shapesworld", update_world: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    torch.manual_seed(seed)
    report: dict = {"source": source, "seed": seed, "gates": {}}
    lines: list[str] = []

    # ---- judge and classifiers on fresh procedural images
    fresh, _, fresh_ids, _ = make_batch(n_fresh, seed=424_242 + seed)
    fresh_pred = [judge_image(img, with_features=False).shape for img in tqdm(fresh, desc="judging fresh")]
    report["judge_fresh"] = {"n": n_fresh, "accuracy": shape_accuracy(fresh_pred, fresh_ids),
                             "per_class": per_class(fresh_pred, fresh_ids)}
    sets = {"fresh": (fresh, fresh_ids)}

    # ---- the diffusion model
    defaults = world_defaults()
    if steps is not None:
        defaults["num_inference_steps"] = steps
    if guidance is not None:
        defaults["guidance_scale"] = guidance
    report["defaults"] = defaults
    model = None
    try:
        model = load_diffusion(source, scheduler=defaults.get("scheduler", "ddim"))
    except Exception as err:  # the VAE-only stage, or nothing shipped yet
        report["pipeline_missing"] = str(err)
    vae = model.vae if model is not None else None
    if vae is None and (SHAPESWORLD_DIR / "pipeline" / "vae" / "config.json").exists():
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(str(SHAPESWORLD_DIR / "pipeline" / "vae"), torch_dtype=torch.float32)
        vae = vae.eval().requires_grad_(False)
    if vae is not None:
        recon = vae_reconstruct(vae, fresh[:n_vae])
        recon_pred = judge_shapes(recon)
        report["judge_vae"] = {"n": n_vae, "accuracy": shape_accuracy(recon_pred, fresh_ids[:n_vae]),
                               "per_class": per_class(recon_pred, fresh_ids[:n_vae])}
        sets["vae_reconstructions"] = (recon, fresh_ids[:n_vae])
        k = min(200, n_vae)
        write_grid(out / "vae_grid.png", recon[:k], fresh_ids[:k], recon_pred[:k])
    else:
        report["judge_vae"] = {"missing": True}

    if model is not None:
        report["world_gates"] = world_gates(model, defaults, out, per_class_n, seed, batch)
        gates = report["world_gates"]
        for key, bar in GATES.items():
            if key in gates:
                report["gates"][f"{key}>={bar}"] = gates[key] >= bar
        lines.append(_table(f"class prompts \"{gates['class_prompt']}\" ({gates['class_prompt_draws']} draws, seeds "
                            "shared across classes)", gates["class_prompt_judge_per_class"]))
        lines.append(f"{'overall':<10} {gates['class_prompt_judge_accuracy']:>9.3f}   (gate >= "
                     f"{GATES['class_prompt_judge_accuracy']}, every class >= "
                     f"{GATES['class_prompt_judge_accuracy_min_class']})")
        lines.append(f"prompt-vs-seed change ratio {gates['prompt_vs_seed_change_ratio']:.3f} (the generator itself: "
                     f"{gates['prompt_vs_seed_change_ratio_generator']:.3f}); "
                     "text tower: linear probe "
                     f"{gates['linear_probe_shape_accuracy']:.4f}, class-prompt cosine "
                     f"{gates['class_prompt_cosine_mean']:.3f} (to \"\" {gates['class_prompt_cosine_to_empty']:.3f}); "
                     f"CLIP zero-shot {gates.get('clip_zero_shot_shape_accuracy', float('nan')):.4f}")
        items = draws(per_class_n, seed=seed + 1)
        gen = generate(model, items, defaults, batch)
        gen_ids = np.array([SHAPES.index(s) for s, _, _ in items])
        verdicts = [judge_image(img) for img in tqdm(gen, desc="judging generated")]
        gen_pred = [v.shape for v in verdicts]
        acc = per_class(gen_pred, gen_ids)
        report["generated"] = {
            "n": len(items), "judge_accuracy": shape_accuracy(gen_pred, gen_ids), "per_class": acc,
            "failure_rate_per_class": {k: 1 - v for k, v in acc.items()},
            "judge_none": int(sum(p is None for p in gen_pred)),
            "items": [{"shape": s, "prompt": p, "seed": sd, "judged": j, "confidence": round(v.confidence, 3)}
                      for (s, p, sd), j, v in zip(items, gen_pred, verdicts, strict=True)],
        }
        sets["generated"] = (gen, gen_ids)
        write_grid(out / "grid.png", gen, gen_ids, gen_pred)
        np.save(out / "generated.npy", gen)
        report["gates"]["generated_judge_accuracy>=0.85"] = report["generated"]["judge_accuracy"] >= GATE_GENERATED
        lines.append(_table(f"generated images ({len(items)} prompt x seed draws, steps "
                            f"{defaults['num_inference_steps']}, guidance {defaults['guidance_scale']})", acc))
        lines.append(f"{'overall':<10} {report['generated']['judge_accuracy']:>9.3f} "
                     f"{1 - report['generated']['judge_accuracy']:>12.3f}   (gate >= {GATE_GENERATED})")
    else:
        lines.append(f"\ngenerated images: pipeline missing ({report.get('pipeline_missing', '')[:160]})")

    report["classifiers"] = classifier_accuracies(sets)
    report["gates"]["judge_fresh>=0.95"] = report["judge_fresh"]["accuracy"] >= GATE_JUDGE_FRESH
    if "accuracy" in report["judge_vae"]:
        report["gates"]["judge_vae>=0.95"] = report["judge_vae"]["accuracy"] >= GATE_JUDGE_VAE
    for name, accs in report["classifiers"].items():
        if "fresh" in accs:
            report["gates"][f"classifier_{name}_fresh>=0.98"] = accs["fresh"] >= GATE_CLASSIFIER

    lines.append(f"\njudge on {n_fresh} fresh images: {report['judge_fresh']['accuracy']:.4f}")
    if "accuracy" in report["judge_vae"]:
        lines.append(f"judge on {n_vae} VAE reconstructions: {report['judge_vae']['accuracy']:.4f}  "
                     + " ".join(f"{k}:{v:.2f}" for k, v in report["judge_vae"]["per_class"].items()))
    else:
        lines.append("judge on VAE reconstructions: VAE missing")
    lines.append("classifiers (accuracy): " + "; ".join(
        f"{n}: " + (", ".join(f"{k} {v:.4f}" for k, v in a.items()) if "missing" not in a else "missing")
        for n, a in report["classifiers"].items()))
    lines.append("gates: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in report["gates"].items()))
    report["seconds"] = round(time.time() - t0, 1)
    lines.append(f"report written to {out} in {report['seconds']} s")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    if update_world and "world_gates" in report:
        from sage_lightning.shapesworld.world import update_world as write_world

        write_world("report", **{k: v for k, v in report["world_gates"].items()}, report_seed=seed)
        lines.append("gate figures written to world.json (stages.report)")
    print("\n".join(lines), flush=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for report.json and the PNG grids")
    parser.add_argument("--per-class", type=int, default=20, help="prompt x seed draws per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-fresh", type=int, default=1000, help="fresh procedural images for the judge")
    parser.add_argument("--n-vae", type=int, default=500, help="VAE reconstructions judged")
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--steps", type=int, default=None, help="override world.json's num_inference_steps")
    parser.add_argument("--guidance", type=float, default=None, help="override world.json's guidance_scale")
    parser.add_argument("--source", default="shapesworld", help="model to report on (default the shipped world)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--update-world", action="store_true",
                        help="write the gate figures into the shipped world.json (stages.report)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.out, per_class_n=args.per_class, seed=args.seed, n_fresh=args.n_fresh, n_vae=args.n_vae,
        batch=args.batch, steps=args.steps, guidance=args.guidance, source=args.source,
        update_world=args.update_world)


if __name__ == "__main__":
    main()
