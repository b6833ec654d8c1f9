"""ShapesWorld's surrogate-ensemble members: small timm classifiers trained here with Lightning, seeded.

Five members (the discriminator D of SAGE in this world; the geometric judge is never one of them), each
with the ten shapes and one reject output, ``none`` (no clean shape: an empty field, a blob, fragments, a
smear; ``rejects.py``), so that D can say "nothing of the kind is drawn" (issue 19 item 2):

- ``resnet``: timm ``resnet10t`` at reduced width, on RGB images.
- ``densenet``: timm ``densenet121``'s DenseNet at growth rate 16 and blocks (2, 4, 6, 4) (dense
  connectivity, no residual sums), on RGB images.
- ``edge``: timm ``resnet10t`` at reduced width, on the image's Canny edge map drawn exactly as the
  surrogate's :class:`~sage_lightning.surrogate.members.CannyEdgeMember` draws it (``(img*255).round()``
  -> uint8, ``cv2.cvtColor(RGB2GRAY)``, the grayscale's 1st-99th percentiles stretched to 0-255
  (``stretch_contrast``: a faint shape keeps its edges), ``cv2.Canny(gray, 100, 200)``, 0/1, ``1 - edges``:
  black edges on white, replicated to 3 channels).
- ``resnet_adv``, ``densenet_adv``: the two RGB architectures fine-tuned from ``resnet`` and ``densenet`` with PGD
  adversarial training at 8/255 (``adversarial.py``): they hold where SAGE's search fools the others (a clean
  cross recoloured) but lose faint shapes, which the three above keep, and D fails only when every member does.

Training data (``train``): the generator's drawings (label: their shape), reject drawings (label ``none``),
and, when given (``--extra``), images of the generator model itself on training seeds labelled by the judge
(``none`` where it sees no clean shape), including the hard examples SAGE found against the previous D on training
seeds (``hard_examples.py``: its D-only failures; never the seeds evaluation uses). The RGB members are trained with
heavy style augmentation (channel permutations, per-channel gains and offsets, inversion, grayscale, colour mixing,
smooth colour fields, noise, blur), contrast lowered towards the image's border colour down to a tenth, and shapes
shrunk to half or enlarged, so they follow shape rather than colour, contrast or size.

Shipped as ``weights/classifiers/<name>/config.json`` + ``model.safetensors`` (float16 on disk). The
config holds ``model_name`` and ``model_kwargs`` for ``timm.create_model`` (including a
``pretrained_cfg_overlay`` with the 64 px input size and mean/std, so timm's own data config and the
surrogate's ``TimmMember`` preprocess exactly as in training), ``class_names``, ``reject_names``,
``input`` (rgb/canny), the Canny settings, and the training record.

Rebuild: ``python -m sage_lightning.shapesworld.classifiers train --name all [--extra pool.npz]``; ``--adv-eps``
adds PGD adversarial training of the RGB members (``adversarial.py``), ``--out DIR`` writes a candidate member
outside the shipped weights.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sage_lightning.shapesworld.adversarial import ColourBox, pgd_images
from sage_lightning.shapesworld.augment import contrast_augment, geometric_augment, style_augment
from sage_lightning.shapesworld.generator import IMAGE_SIZE, SHAPES, make_batch
from sage_lightning.shapesworld.rejects import REJECT_NAME, make_rejects
from sage_lightning.shapesworld.shipped import SHAPESWORLD_DIR, shapesworld_member
from sage_lightning.surrogate.canny import canny_edges

CLASSIFIERS_DIR = SHAPESWORLD_DIR / "classifiers"
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
CANNY = {"low_threshold": 100.0, "high_threshold": 200.0, "l2_gradient": False, "black_on_white": True,
         "stretch_contrast": True}
_OVERLAY = {"input_size": [3, IMAGE_SIZE, IMAGE_SIZE], "mean": list(MEAN), "std": list(STD)}

SPECS: dict[str, dict] = {
    "resnet": {
        "model_name": "resnet10t",
        "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
        "input": "rgb",
    },
    "densenet": {
        "model_name": "densenet121",
        "model_kwargs": {"growth_rate": 16, "block_config": [2, 4, 6, 4]},
        "input": "rgb",
    },
    "edge": {
        "model_name": "resnet10t",
        "model_kwargs": {"channels": [16, 32, 64, 128], "stem_width": 16},
        "input": "canny",
    },
}
# PGD-trained at about 8/255 (adversarial.py), starting from their plain twin's shipped weights
SPECS["resnet_adv"] = {**SPECS["resnet"], "adv_eps": 0.031, "warm_start": "resnet"}
SPECS["densenet_adv"] = {**SPECS["densenet"], "adv_eps": 0.031, "warm_start": "densenet"}
NAMES = tuple(SPECS)  # the default ensemble's members, in its order (plugin.default_ensemble)


def full_config(name: str) -> dict:
    """The config.json of member ``name`` before training (model name, kwargs, classes, preprocessing)."""
    spec = SPECS[name]
    cfg = {
        "model_name": spec["model_name"],
        "model_kwargs": {**spec["model_kwargs"], "num_classes": len(SHAPES) + 1, "pretrained_cfg_overlay": _OVERLAY},
        "class_names": list(SHAPES),
        "reject_names": [REJECT_NAME],
        "input": spec["input"],
        "input_size": [3, IMAGE_SIZE, IMAGE_SIZE],
        "mean": list(MEAN),
        "std": list(STD),
        "images": "RGB in [0, 1], bilinear resize to input_size, then (x - mean) / std",
    }
    if spec["input"] == "canny":
        cfg["canny"] = dict(CANNY)
        cfg["images"] = ("RGB in [0, 1] -> (x*255).round() uint8 -> cv2 RGB2GRAY -> if stretch_contrast: 1st..99th "
                         "percentile to 0..255 (unless closer than 8 levels) -> cv2.Canny(low, high) 0/1 -> "
                         "1 - edges if black_on_white -> 3 channels -> (x - mean) / std")
    return cfg


def create_model(cfg: dict) -> nn.Module:
    import timm

    return timm.create_model(cfg["model_name"], pretrained=False, **cfg["model_kwargs"])


# -------------------------------------------------------------------------------------- edge maps
def canny_maps(images01: Tensor, low: float = 100.0, high: float = 200.0, l2_gradient: bool = False,
               stretch_contrast: bool = False) -> Tensor:
    """Exact Canny maps as 0/1 floats ``[B, 1, H, W]`` (the surrogate's ``CannyEdgeMember.canny``)."""
    u8 = (images01.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    maps = canny_edges(u8, low, high, l2_gradient, stretch_contrast)
    return (torch.from_numpy(maps).unsqueeze(1) > 0).to(device=images01.device, dtype=images01.dtype)


def draw_edges(edges01: Tensor, black_on_white: bool = True) -> Tensor:
    """0/1 edge maps ``[B, 1, H, W]`` -> the 3-channel sketch the edge classifier sees."""
    drawn = 1 - edges01 if black_on_white else edges01
    return drawn.expand(-1, 3, -1, -1)


# ----------------------------------------------------------------------------------------- modules
class ShapesClassifier(nn.Module):
    """A shipped member: images in [0, 1] ``[B, 3, H, W]`` -> logits ``[B, 11]`` over ``SHAPES`` and ``none``.

    Resizes (bilinear) to 64 px and normalises itself; the ``edge`` member first draws the exact Canny
    map (no gradient through Canny here: for gradients use the surrogate's ``CannyEdgeMember`` via
    :func:`ensemble_member`).
    """

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.config = cfg
        self.class_names = list(cfg["class_names"])
        self.model = create_model(cfg)
        self.input_size = tuple(cfg["input_size"][1:])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def is_edge(self) -> bool:
        return self.config["input"] == "canny"

    def prepare(self, images01: Tensor) -> Tensor:
        """The classifier's input before normalisation (resized image, or the drawn Canny map)."""
        if images01.ndim != 4 or images01.shape[1] != 3:
            raise ValueError(f"images have shape {tuple(images01.shape)}; pass RGB [B, 3, H, W] in [0, 1]")
        if self.is_edge:  # as CannyEdgeMember: Canny at the image's own size, then the classifier's resize
            c = self.config["canny"]
            edges = canny_maps(images01, c["low_threshold"], c["high_threshold"], c["l2_gradient"],
                               c.get("stretch_contrast", False))
            images01 = draw_edges(edges, c["black_on_white"])
        if tuple(images01.shape[-2:]) != self.input_size:
            images01 = F.interpolate(images01, size=self.input_size, mode="bilinear", align_corners=False)
        return images01

    def classify_prepared(self, x01: Tensor) -> Tensor:
        return self.model((x01 - self.mean.to(x01.dtype)) / self.std.to(x01.dtype))

    def forward(self, images01: Tensor) -> Tensor:
        return self.classify_prepared(self.prepare(images01))


def _weights_dir(name: str, root: Path | None = None) -> Path:
    return Path(root or CLASSIFIERS_DIR) / name


def load_classifier(name: str, root: str | Path | None = None) -> ShapesClassifier:
    """Load shipped member ``name`` (``resnet``, ``densenet`` or ``edge``), frozen, float32, eval mode."""
    from safetensors.torch import load_file

    folder = _weights_dir(name, Path(root) if root else None)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"no classifier {name!r} at {folder}: choose one of {', '.join(NAMES)} or train it "
                                "with `python -m sage_lightning.shapesworld.classifiers train`")
    cfg = json.loads((folder / "config.json").read_text())
    module = ShapesClassifier(cfg)
    state = load_file(str(folder / "model.safetensors"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module.model.load_state_dict(state, strict=True)
    return module.requires_grad_(False).eval()


def ensemble_member(name: str, root: str | Path | None = None):
    """Shipped member ``name`` as a surrogate :class:`EnsembleMember` (``TimmMember`` / ``CannyEdgeMember``),
    built by ``shipped.shapesworld_member`` as the default ensemble builds it."""
    return shapesworld_member(_weights_dir(name, Path(root) if root else None))


# ---------------------------------------------------------------------------------------- training
NONE_ID = len(SHAPES)  # the reject output's label
SOURCES = ("drawings", "rejects", "extra")  # where a training image came from (``training_set``'s ``sources``)


def training_set(n_train: int, n_reject: int, seed: int, extra: str | Path | None = None,
                 extra_repeat: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 images ``[N, 64, 64, 3]``, labels (0-9 the shapes, 10 ``none``) and sources (indices into
    ``SOURCES``): ``n_train`` generator drawings, ``n_reject`` reject drawings, and the images of ``extra`` (an
    ``.npz`` with ``images`` and ``labels``: the generator model's images on training seeds, labelled by the
    judge) ``extra_repeat`` times."""
    images, _, ids, _ = make_batch(n_train, seed=1000 + seed)
    rejects = make_rejects(n_reject, seed=2000 + seed)
    parts = [(images, ids), (rejects, np.full(len(rejects), NONE_ID))]
    if extra:
        data = np.load(extra)
        parts += [(data["images"], data["labels"].astype(np.int64))] * extra_repeat
    sources = np.concatenate([np.full(len(p[0]), min(i, 2)) for i, p in enumerate(parts)])
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]).astype(np.int64),
            sources.astype(np.int64))


class ClassifierModule(L.LightningModule):
    """Trains one member on uint8 ShapesWorld images with on-the-fly augmentation.

    ``init_from``: a shipped member folder whose weights start the training (the head is left out where its
    size differs, e.g. the 10-class members before the ``none`` output)."""

    def __init__(self, name: str, steps: int, lr: float = 3e-3, seed: int = 0, init_from: str | None = None,
                 adv_eps: float = 0.0, adv_steps: int = 3, adv_colour: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg = full_config(name)
        if adv_eps > 0 and self.cfg["input"] != "rgb":
            raise ValueError(f"adversarial training (adv_eps={adv_eps}) attacks RGB pixels; member {name!r} "
                             "sees Canny maps: train it with adv_eps 0")
        torch.manual_seed(seed)
        self.net = ShapesClassifier(self.cfg)
        if init_from:
            self._warm_start(Path(init_from))
        self.gen = torch.Generator().manual_seed(seed + 1)

    def _warm_start(self, folder: Path) -> None:
        from safetensors.torch import load_file

        own = self.net.model.state_dict()
        state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()
                 if k in own and own[k].shape == v.shape}
        self.net.model.load_state_dict(state, strict=False)

    def inputs(self, images_u8: Tensor, train: bool) -> Tensor:
        x = images_u8.permute(0, 3, 1, 2).float() / 255.0
        if not train:
            return self.net.prepare(x)
        x = geometric_augment(x, self.gen)
        if self.net.is_edge:
            # mild photometric change only: Canny's fixed thresholds see luminance contrast; with the
            # contrast stretch the member also sees shapes washed out as far as the RGB members do
            if self.net.config["canny"].get("stretch_contrast", False):
                x = contrast_augment(x, self.gen)
            x = style_augment(x, self.gen, strength=0.35)
            return self.net.prepare(x)
        return style_augment(contrast_augment(x, self.gen), self.gen)

    def training_step(self, batch, _):
        images, labels = batch
        x = self.inputs(images, train=True)
        if self.hparams.adv_eps > 0:  # clean and PGD-attacked halves of one batch (adversarial.py)
            attacked = pgd_images(self.net, self.net.classify_prepared, x, labels, self.hparams.adv_eps,
                                  self.hparams.adv_steps, self.gen,
                                  colour=ColourBox() if self.hparams.adv_colour else None)
            x, labels = torch.cat([x, attacked]), torch.cat([labels, labels])
        logits = self.net.classify_prepared(x)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.05)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.hparams.lr, total_steps=self.hparams.steps,
                                                    pct_start=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def accuracy(module: ShapesClassifier, images_u8: np.ndarray, labels: np.ndarray, batch: int = 250) -> float:
    module.eval()
    hits = 0
    for i in range(0, len(images_u8), batch):
        x = torch.from_numpy(images_u8[i : i + batch]).permute(0, 3, 1, 2).float() / 255.0
        hits += int((module(x).argmax(1).numpy() == labels[i : i + batch]).sum())
    return hits / max(len(images_u8), 1)


def train(name: str, steps: int = 1500, batch_size: int = 128, n_train: int = 24000, n_reject: int = 6000,
          seed: int = 0, n_test: int = 2000, export: bool = True, extra: str | None = None,
          init_from: str | None = None, lr: float = 3e-3, data_cache: str | None = None, adv_eps: float | None = None,
          adv_steps: int = 3, out: str | None = None, adv_colour: bool = False) -> dict:
    """Train member ``name`` (seeded; ``adv_colour``: PGD recolours too), measure it on fresh drawings, ship it.

    ``data_cache``: an ``.npz`` path where the training set is saved once and reloaded (several members'
    trainings share one); the record counts the images the run trained on, from the set's ``sources``."""
    torch.set_num_threads(1)
    adv_eps = SPECS[name].get("adv_eps", 0.0) if adv_eps is None else adv_eps
    if adv_colour and adv_eps <= 0:
        raise ValueError(f"adv_colour recolours before the PGD ball, and adv_eps is {adv_eps}: give adv_eps > 0")
    if init_from is None and "warm_start" in SPECS[name]:
        init_from = str(_weights_dir(SPECS[name]["warm_start"]))
    L.seed_everything(seed, workers=True)
    t0 = time.time()
    cache = Path(data_cache) if data_cache else None
    if cache is not None and cache.exists():
        data = np.load(cache)
        images, labels, sources = data["images"], data["labels"], data["sources"]
    else:
        images, labels, sources = training_set(n_train, n_reject, seed, extra)
        if cache is not None:
            np.savez(cache, images=images, labels=labels, sources=sources)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(images), torch.from_numpy(labels))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    module = ClassifierModule(name, steps=steps, seed=seed, init_from=init_from, lr=lr, adv_eps=adv_eps,
                              adv_steps=adv_steps, adv_colour=adv_colour)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, deterministic=False)
    trainer.fit(module, loader)
    net = module.net.eval()
    test_images, _, test_ids, _ = make_batch(n_test, seed=987_654 + seed)
    acc = accuracy(net, test_images, test_ids)
    reject_acc = accuracy(net, make_rejects(n_test // 4, seed=3000 + seed), np.full(n_test // 4, NONE_ID))
    counts = np.bincount(sources, minlength=len(SOURCES))  # what was trained on, cached or built here
    record = {"steps": steps, "batch_size": batch_size, "n_train_images": int(counts[0]), "n_reject_images":
              int(counts[1]), "extra_images": int(counts[2]), "seed": seed, "train_data_seed": 1000 + seed,
              "test_seed": 987_654 + seed, "fresh_accuracy": acc, "reject_accuracy": reject_acc, "n_test": n_test,
              "params": sum(p.numel() for p in net.model.parameters()), "init_from": init_from, "adv_eps": adv_eps,
              "adv_steps": adv_steps, **({"adv_colour": asdict(ColourBox())} if adv_colour else {}),
              "train_seconds": round(time.time() - t0, 1)}
    print(f"[{name}] fresh accuracy {acc:.4f} on {n_test}; rejects {reject_acc:.4f}; {record['params']} params; "
          f"{record['train_seconds']} s", flush=True)
    if export:
        export_classifier(name, net, record, Path(out) if out else None)
    return record


def export_classifier(name: str, net: ShapesClassifier, record: dict, root: Path | None = None) -> None:
    """Write ``weights/classifiers/<name>/`` through the world's exporter (fp16, atomic) and the manifest; with
    ``root``, ``root/<name>/`` and no manifest (a candidate D, measured before it is shipped)."""
    from safetensors.torch import save_file

    from sage_lightning.shapesworld import world

    cfg = {**net.config, "train": record}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in net.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    world.replace_dir(_weights_dir(name, root), write)
    if root is not None:
        return
    world.update_world(f"classifier_{name}", fresh_accuracy=record["fresh_accuracy"], params=record["params"],
                       steps=record["steps"], seed=record["seed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train and ship members")
    t.add_argument("--name", default="all", choices=[*NAMES, "all"])
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-export", action="store_true")
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--extra", default=None, help=".npz of judge-labelled generator images (images, labels)")
    t.add_argument("--init-from", default=None, help="member folder whose weights start training (warm start)")
    t.add_argument("--data-cache", default=None, help=".npz where the training set is saved once and reused")
    t.add_argument("--adv-eps", type=float, default=None, help="PGD radius in [0, 1] pixels (default: the member's)")
    t.add_argument("--adv-steps", type=int, default=3, help="PGD steps per training batch")
    t.add_argument("--adv-colour", action="store_true", help="PGD recolours first (adversarial.ColourBox)")
    t.add_argument("--out", default=None, help="write the member under OUT/<name>/ instead of the shipped weights")
    e = sub.add_parser("eval", help="accuracy of shipped members on fresh images")
    e.add_argument("--n", type=int, default=2000)
    e.add_argument("--seed", type=int, default=31337)
    args = parser.parse_args(argv)
    if args.cmd == "train":
        try:
            for name in NAMES if args.name == "all" else (args.name,):
                train(name, steps=args.steps, seed=args.seed, export=not args.no_export, extra=args.extra,
                      init_from=args.init_from, lr=args.lr, data_cache=args.data_cache, adv_eps=args.adv_eps,
                      adv_steps=args.adv_steps, out=args.out, adv_colour=args.adv_colour)
        except ValueError as err:  # options that do not go together: one line, no traceback
            parser.error(str(err))
    else:
        images, _, ids, _ = make_batch(args.n, seed=args.seed)
        for name in NAMES:
            print(f"{name}: {accuracy(load_classifier(name), images, ids):.4f} on {args.n} fresh images")


if __name__ == "__main__":
    main()
