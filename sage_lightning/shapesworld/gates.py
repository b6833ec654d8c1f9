"""ShapesWorld's gate measurements: does the world follow its prompts?

- ``text_gates``: the frozen text tower states a caption's shape (a linear probe on its states names the
  shape of held-out captions) and keeps the class prompts apart (cosines, class-specific energy);
- ``clip_zero_shot``: CLIP names the shape of fresh drawings from the class prompts alone;
- ``class_prompt_gate``: the diffusion model draws "a photo of a {shape}", judged by the geometric judge,
  on a class x seed grid (the same seeds for every class), plus the **prompt-vs-seed change ratio**:
  mean |delta pixel| between class prompts at a fixed seed / between seeds at a fixed prompt. A model
  that ignores its prompt has a ratio near 0; one that draws what it is told, near 1.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sage_lightning.models import clip_tokenizer
from sage_lightning.shapesworld.caption_labels import caption_batch
from sage_lightning.shapesworld.generator import SHAPES, make_batch, render, sample_scene

CLASS_PROMPT = "a photo of a {shape}"
GATES = {"linear_probe_shape_accuracy": 0.99, "clip_zero_shot_shape_accuracy": 0.95,
         "class_prompt_judge_accuracy": 0.85, "class_prompt_judge_accuracy_min_class": 0.60}


def class_prompts() -> list[str]:
    return [CLASS_PROMPT.format(shape=s) for s in SHAPES]


def tokenize(captions: list[str], pad_to_77: bool = True) -> torch.Tensor:
    """Token ids padded with <|endoftext|> to 77 (as Stable Diffusion does) or to the longest caption."""
    return clip_tokenizer()(captions, padding="max_length" if pad_to_77 else "longest", max_length=77,
                            truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def text_states(te, captions: list[str]) -> torch.Tensor:
    """The 77 per-token states the UNet reads, [N, 77, d]."""
    return torch.cat([te(tokenize(captions[i:i + 500]).to(te.device))[0] for i in range(0, len(captions), 500)])


def text_gates(te, train_n: int = 4000, test_n: int = 1000, probe_steps: int = 300, seed: int = 10**9) -> dict:
    """Gate figures of a frozen text tower (``te``: a CLIPTextModel).

    ``linear_probe_shape_accuracy``: a linear probe fitted on the mean state of ``train_n`` captions names
    the shape of ``test_n`` held-out captions (other seeds). Then how apart the class prompts are in the 77
    states the UNet reads: mean and max pairwise cosine, cosine to "", class-specific share of energy.
    """
    te = te.eval()
    (tr, ytr), (ts, yts) = caption_batch(train_n, seed + 10, empty=0.0), caption_batch(test_n, seed + 11, empty=0.0)
    xtr, xts = text_states(te, tr).mean(1).cpu(), text_states(te, ts).mean(1).cpu()
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    gen = torch.Generator().manual_seed(0)
    probe = torch.nn.Linear(xtr.shape[1], len(SHAPES))
    with torch.no_grad():
        probe.weight.copy_(torch.randn(probe.weight.shape, generator=gen) * 0.01)
        probe.bias.zero_()
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(probe_steps):
            opt.zero_grad()
            F.cross_entropy(probe((xtr - mu) / sd), ytr["shape"]).backward()
            opt.step()
    with torch.no_grad():
        acc = (probe((xts - mu) / sd).argmax(1) == yts["shape"]).float().mean().item()
    h = text_states(te, class_prompts() + [""]).cpu()
    seq = F.normalize(h[:-1].flatten(1), dim=-1)
    off = ~torch.eye(len(SHAPES), dtype=torch.bool)
    centred = h[:-1] - h[:-1].mean(0)
    return {"linear_probe_shape_accuracy": round(acc, 4), "probe_captions": [train_n, test_n],
            "class_prompt_cosine_mean": round((seq @ seq.T)[off].mean().item(), 4),
            "class_prompt_cosine_max": round((seq @ seq.T)[off].max().item(), 4),
            "class_prompt_cosine_to_empty": round((seq @ F.normalize(h[-1].flatten(), dim=0)).mean().item(), 4),
            "class_specific_energy": round((centred ** 2).sum().item() / (h[:-1] ** 2).sum().item(), 4)}


def clip_features(out) -> torch.Tensor:
    """transformers 5 returns a model output (projected features in ``pooler_output``); 4 a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# The gate's drawings. Training's own export check (shapesworld.training.base.EVAL_SEED, 10**9) decided when the
# CLIP stage stopped, so the figure that is reported comes from other drawings, never looked at during training.
CLIP_GATE_SEED = 2 * 10**9 + 11


@torch.no_grad()
def clip_zero_shot(clip, n: int = 1000, seed: int = CLIP_GATE_SEED) -> float:
    """Share of ``n`` fresh drawings whose nearest class prompt (CLIP cosine) names their shape."""
    images, _, ids, _ = make_batch(n, seed)
    device = next(clip.parameters()).device
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().to(device) / 255.0 * 2 - 1
    text = clip_features(clip.get_text_features(input_ids=tokenize(class_prompts(), pad_to_77=False).to(device)))
    img = torch.cat([clip_features(clip.get_image_features(pixel_values=c)) for c in x.split(250)])
    sims = F.normalize(img, dim=-1) @ F.normalize(text, dim=-1).T
    return (sims.argmax(1).cpu() == torch.from_numpy(ids)).float().mean().item()


def generator_draw(prompts: list[str], seeds: list[int]) -> np.ndarray:
    """The world's own generator as a perfect prompt follower (the scene's other attributes from the seed).

    Its prompt-vs-seed ratio on the same seeds is the reference for a diffusion model's: colours,
    backgrounds and positions come from the seed, so even a perfect follower stays well below 1.
    """
    return np.stack([render(sample_scene(np.random.default_rng(s), shape=p.split()[-1]))
                     for p, s in zip(prompts, seeds, strict=True)])


def class_prompt_seeds(per_class: int, seed: int) -> list[int]:
    return [int(s) for s in np.random.default_rng(seed).integers(2**31, size=per_class)]


def class_prompt_gate(draw, per_class: int = 20, seed: int = 7_000_000) -> tuple[dict, np.ndarray, list]:
    """Judge ``per_class`` draws of every class prompt, seeds shared across classes.

    ``draw(prompts, seeds) -> uint8 [N, H, W, 3]`` renders with the model under test. Returns the figures,
    the images [classes, per_class, H, W, 3] and the judge's names [classes][per_class].
    """
    from sage_lightning.shapesworld.judge import judge_shapes

    seeds = class_prompt_seeds(per_class, seed)
    images = np.stack([draw([p] * per_class, seeds) for p in class_prompts()])
    names = [judge_shapes(row) for row in images]
    per = {s: round(float(np.mean([n == s for n in names[k]])), 3) for k, s in enumerate(SHAPES)}
    x = images.astype(np.float32) / 255.0
    across_prompts = np.mean([np.abs(x[a] - x[b]).mean() for a in range(len(SHAPES)) for b in range(a)])
    across_seeds = np.mean([np.abs(x[:, a] - x[:, b]).mean() for a in range(per_class) for b in range(a)])
    figures = {"class_prompt_judge_accuracy": round(float(np.mean(list(per.values()))), 4),
               "class_prompt_judge_per_class": per,
               "class_prompt_judge_accuracy_min_class": min(per.values()),
               "prompt_vs_seed_change_ratio": round(float(across_prompts / across_seeds), 4),
               "class_prompt_draws": per_class * len(SHAPES), "class_prompt": CLASS_PROMPT, "seed": seed}
    return figures, images, names
