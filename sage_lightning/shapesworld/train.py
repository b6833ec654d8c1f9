"""Train ShapesWorld's models with Lightning: ``python -m sage_lightning.shapesworld.train <stage>``.

Stages: ``text`` (CLIP's text tower taught to state each caption's attributes, then frozen), ``clip``
(contrastive tiny CLIP; its vision side against the frozen text tower), ``vae`` (4x AutoencoderKL),
``unet`` (text-conditioned latent diffusion on the frozen text tower and VAE). Each run
- resumes from ``shapesworld_work/<stage>/last.ckpt`` when it exists (model, optimizer, step);
- otherwise warm-starts from the shipped weights when they exist (weights only), else starts from seed;
- trains ``--max-steps`` more steps on freshly generated data (batch k of a run uses seed f(stage, step));
- exports the current weights to the shipped folder every ``--export-minutes`` and at the end, with
  its gate figure, into ``weights/world.json`` (cumulative step counts across runs and sessions).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import math
import sys
import time

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.caption_labels import HEADS, caption_batch
from sage_lightning.shapesworld.gates import class_prompts, clip_features, clip_zero_shot, text_gates, tokenize
from sage_lightning.shapesworld.generator import SHAPES, make_batch
from sage_lightning.shapesworld.pools import ImagePool, LatentPool

STAGES = ("text", "clip", "vae", "unet")
STAGE_SEEDS = {"clip": 1, "vae": 2, "unet": 3, "text": 4}
EVAL_SEED = 10**9  # fresh images for gates: far from every training seed
EOS = 49407  # <|endoftext|>: CLIP pools its state; Stable Diffusion pads with it
log = logging.getLogger("shapesworld")


class _Steps(Dataset):
    """Placeholder items: every batch is generated inside ``training_step`` from the global step."""

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> int:
        return i


def _images(n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    images, captions, ids, _ = make_batch(n, seed)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return x, captions, torch.from_numpy(ids)


def CLASS_PROMPTS() -> torch.Tensor:  # noqa: N802
    return tokenize(class_prompts(), pad_to_77=False)


class WorldModule(L.LightningModule):
    stage = ""

    def __init__(self, batch_size: int, lr: float, base_steps: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.t0 = time.time()
        self.last_log = (time.time(), 0)

    def images(self, n: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        x, captions, ids = _images(n, seed)
        return x.to(self.device), captions, ids.to(self.device)

    def tokens(self, captions: list[str], pad_to_77: bool = True) -> torch.Tensor:
        return tokenize(captions, pad_to_77).to(self.device)

    @property
    def total_steps(self) -> int:
        return self.hparams.base_steps + self.global_step

    def batch_seed(self) -> int:
        return STAGE_SEEDS[self.stage] * 10**8 + self.total_steps * 7919 % 10**8

    def refreshed_pool(self, load_or_build):
        """The training pool of this step: ``load_or_build(folder, index)`` for refresh ``index`` (a new seed
        every ``pool_refresh`` steps); the old pool is dropped before the new one is built."""
        index = self.total_steps // self.hparams.pool_refresh
        if self.pool is None or self.pool.index != index:
            self.pool = None
            self.pool = load_or_build(W.WORK / self.stage, index)
        return self.pool

    def log_step(self, loss: torch.Tensor, **extra: float) -> None:
        self.log("loss", loss, prog_bar=True)
        if self.global_step % 25 == 0:
            now, step = time.time(), self.global_step
            rate = (step - self.last_log[1]) / max(now - self.last_log[0], 1e-9)
            self.last_log = (now, step)
            more = " ".join(f"{k}={v:.4g}" for k, v in extra.items())
            log.info(f"{self.stage} step {self.total_steps} (run {step}) loss {loss.item():.5f} {more} "
                     f"{rate:.3f} steps/s lr {self.optimizers().param_groups[0]['lr']:.2e}")

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.trainable().parameters(), lr=self.hparams.lr, weight_decay=self.wd)
        warm = 100 if self.hparams.base_steps == 0 else 50
        anneal = self.anneal

        def factor(s: int) -> float:
            f = min(1.0, (s + 1) / warm)
            if anneal is not None:  # cosine from 1 to `final` over this run's steps (start, steps, final)
                start, steps, final = anneal
                progress = min(max((s - start) / max(steps, 1), 0.0), 1.0)
                f *= final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    wd = 0.0
    anneal: tuple[int, int, float] | None = None  # set by train() for one run; never saved in checkpoints

    def trainable(self) -> torch.nn.Module:
        raise NotImplementedError

    def export(self) -> dict:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- CLIP
class ClipModule(WorldModule):
    stage = "clip"
    wd = 0.05

    def __init__(self, batch_size: int = 128, lr: float = 1e-3, base_steps: int = 0, warm: bool = False,
                 freeze_text: bool = False, class_weight: float = 1.0, pool_size: int = 0,
                 pool_refresh: int = 2000):
        super().__init__(batch_size, lr, base_steps)
        # pool_size 0 (default): freshly rendered images every step (0.1 s per 128 drawings). A pool of 10,000
        # refreshed every 2,000 steps let the ViT memorise it: zero-shot on fresh drawings stalled at 65.8%
        # (class term 0.46 on the pool); on fresh images it rose to 91.8% in the next 2,260 steps.
        self.pool: ImagePool | None = None
        self.clip = W.load_clip() if warm else W.build_clip(seed=0)
        if freeze_text and not warm:  # a frozen text tower is the shipped one (the text stage's)
            self.clip.text_model.load_state_dict(W.load_clip().text_model.state_dict())
        self.clip.train()
        # Once the UNet trains on the text tower, only the vision side (and projections) may move.
        self.clip.text_model.requires_grad_(not freeze_text)

    def trainable(self):
        return self.clip

    def batch_images(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        if not self.hparams.pool_size:
            return self.images(self.hparams.batch_size, self.batch_seed())
        pool = self.refreshed_pool(lambda folder, index: ImagePool.load_or_build(folder, index,
                                                                                 self.hparams.pool_size))
        x, captions, ids = pool.batch(pool.draw(np.random.default_rng(self.batch_seed()), self.hparams.batch_size))
        return x.to(self.device), captions, ids.to(self.device)

    def training_step(self, batch, batch_idx):
        x, captions, ids = self.batch_images()
        out = self.clip(input_ids=self.tokens(captions, pad_to_77=False), pixel_values=W.pixel_values(x),
                        return_loss=True)
        # plus a contrastive term against the class prompts "a photo of a {shape}" (the zero-shot task)
        prompts = CLASS_PROMPTS().to(self.device)
        text = F.normalize(clip_features(self.clip.get_text_features(input_ids=prompts)), dim=-1)
        img = F.normalize(out.image_embeds, dim=-1)
        cls = F.cross_entropy(self.clip.logit_scale.exp() * img @ text.T, ids)
        loss = out.loss + self.hparams.class_weight * cls
        self.log_step(loss, clip=out.loss.item(), cls=cls.item(), scale=self.clip.logit_scale.exp().item())
        return loss

    def zero_shot(self, n: int = 1000) -> float:
        self.clip.eval()
        acc = clip_zero_shot(self.clip, n, EVAL_SEED)
        self.clip.train()
        return acc

    def export(self) -> dict:
        acc = self.zero_shot()
        self.clip.eval()
        W.export_clip(self.clip)
        self.clip.train()
        log.info(f"clip export at step {self.total_steps}: zero-shot shape accuracy {acc:.4f}")
        return {"zero_shot_shape_accuracy": round(acc, 4), "steps": self.total_steps,
                "text_tower_sha256": W.state_sha256(self.clip.text_model),
                "text_frozen": self.hparams.freeze_text,
                "prompt": "a photo of a {shape}", "eval_images": 1000}


# ------------------------------------------------------------------------------------------- text
class TextModule(WorldModule):
    """CLIP's text tower, trained so that every attribute a caption states is linearly readable.

    Linear heads read each attribute (``caption_labels.HEADS``) from the first <|endoftext|> state and from
    the mean of all 77 states (what the UNet attends to); 10% empty captions say nothing. The tower is
    then frozen: the UNet and CLIP's vision side train against it.
    """

    stage = "text"

    def __init__(self, batch_size: int = 64, lr: float = 1e-3, base_steps: int = 0, warm: bool = False,
                 empty: float = 0.1):
        super().__init__(batch_size, lr, base_steps)
        self.clip = W.load_clip() if warm else W.build_clip(seed=0)
        self.clip.requires_grad_(False)
        self.clip.text_model.requires_grad_(True).train()
        d = self.clip.config.text_config.hidden_size
        self.heads = torch.nn.ModuleDict({f"{where}_{k}": torch.nn.Linear(d, n) for k, n in HEADS.items()
                                          for where in ("eos", "mean")})

    def trainable(self):
        return torch.nn.ModuleList([self.clip.text_model, self.heads])

    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first <|endoftext|> state, mean of the 77 states), each [B, d]."""
        h = self.clip.text_model(input_ids=ids).last_hidden_state
        eos = h[torch.arange(len(ids), device=h.device), (ids == EOS).int().argmax(1)]
        return eos, h.mean(1)

    def training_step(self, batch, batch_idx):
        texts, lab = caption_batch(self.hparams.batch_size, self.batch_seed(), self.hparams.empty)
        eos, mean = self.states(self.tokens(texts))
        loss, hits = 0.0, {}
        for k in HEADS:
            for where, feat in (("eos", eos), ("mean", mean)):
                logits = self.heads[f"{where}_{k}"](feat)
                loss = loss + F.cross_entropy(logits, lab[k].to(self.device))
            hits[k] = (logits.argmax(1).cpu() == lab[k]).float().mean().item()
        self.log_step(loss, shape_acc=hits["shape"], colour_acc=hits["colour"])
        return loss

    def export(self) -> dict:
        self.clip.eval()
        figures = text_gates(W.text_tower(self.clip))
        W.export_clip(self.clip)
        self.clip.text_model.train()
        figures.update(steps=self.total_steps, text_tower_sha256=W.state_sha256(self.clip.text_model))
        log.info(f"text export at step {self.total_steps}: {figures}")
        return figures


# -------------------------------------------------------------------------------------------- VAE
def sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


class VaeModule(WorldModule):
    stage = "vae"

    def __init__(self, batch_size: int = 16, lr: float = 1e-3, base_steps: int = 0, warm: bool = False,
                 kl_weight: float = 1e-6, edge_weight: float = 0.1, freeze_encoder: bool = False):
        super().__init__(batch_size, lr, base_steps)
        self.vae = W.load_vae() if warm else W.build_vae(seed=0)
        self.vae.train()
        # Once the UNet trains on the latents, only the decoder may move (as SD's ft-MSE decoders).
        for part in (self.vae.encoder, self.vae.quant_conv):
            part.requires_grad_(not freeze_encoder)

    def trainable(self):
        return self.vae

    def training_step(self, batch, batch_idx):
        x, _, _ = self.images(self.hparams.batch_size, self.batch_seed())
        x = W.pixel_values(x)
        if self.hparams.freeze_encoder:
            with torch.no_grad():
                post = self.vae.encode(x).latent_dist
        else:
            post = self.vae.encode(x).latent_dist
        rec = self.vae.decode(post.sample()).sample
        l1, mse = F.l1_loss(rec, x), F.mse_loss(rec, x)
        edge = F.l1_loss(sobel(rec), sobel(x))
        kl = post.kl().mean()
        loss = l1 + mse + self.hparams.edge_weight * edge + self.hparams.kl_weight * kl
        self.log_step(loss, l1=l1.item(), edge=edge.item(), kl=kl.item())
        return loss

    @torch.no_grad()
    def evaluate(self, n: int = 500) -> dict:
        self.vae.eval()
        x, _, _ = self.images(n, EVAL_SEED + 1)
        lat, rec = [], []
        for c in W.pixel_values(x).split(100):
            z = self.vae.encode(c).latent_dist.mean
            lat.append(z)
            rec.append(self.vae.decode(z).sample)
        z, rec = torch.cat(lat), (torch.cat(rec).clamp(-1, 1) + 1) / 2
        mse = ((rec - x) ** 2).flatten(1).mean(1)
        psnr = (10 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item()
        scale = 1.0 / z.std().item()
        self.vae.train()
        return {"psnr_db": round(psnr, 2), "scaling_factor": round(scale, 5), "recon": rec, "images": x}

    def export(self) -> dict:
        if self.hparams.freeze_encoder and (W.PIPELINE_DIR / "vae").exists():
            shipped = W.state_sha256(W.load_vae().encoder)
            if shipped != W.state_sha256(self.vae.encoder):
                log.error("vae: not exported: the shipped encoder differs from this run's frozen encoder "
                          "(decoder-only training must warm-start from the shipped VAE)")
                return {}
        ev = self.evaluate()
        if not self.hparams.freeze_encoder:  # a frozen encoder keeps its latent scale
            self.vae.register_to_config(scaling_factor=ev["scaling_factor"])
        self.vae.eval()
        W.export_vae(self.vae)
        self.vae.train()
        figures = {"psnr_db": ev["psnr_db"], "scaling_factor": self.vae.config.scaling_factor,
                   "latent_std_inverse": ev["scaling_factor"], "steps": self.total_steps, "eval_images": 500,
                   "encoder_sha256": W.state_sha256(self.vae.encoder), "encoder_frozen": self.hparams.freeze_encoder}
        judged = judge_accuracy(_uint8(ev["recon"]), make_batch(500, EVAL_SEED + 1)[2])
        if judged is not None:
            figures["judge_accuracy_on_reconstructions"] = round(judged, 4)
        log.info(f"vae export at step {self.total_steps}: {figures}")
        return figures


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def judge_accuracy(images: np.ndarray, ids: np.ndarray) -> float | None:
    """Share of images the geometric judge names as their shape (None while no judge exists)."""
    try:
        from sage_lightning.shapesworld.judge import judge_shapes  # written by another developer
    except Exception:
        return None
    names = judge_shapes(images)
    return float(np.mean([n == SHAPES[i] for n, i in zip(names, ids, strict=True)]))


# ------------------------------------------------------------------------------------------- UNet
class UnetModule(WorldModule):
    stage = "unet"

    def __init__(self, batch_size: int = 32, lr: float = 1e-3, base_steps: int = 0, warm: bool = False,
                 dropout: float = 0.1, ema_decay: float = 0.995, snr_gamma: float = 5.0,
                 check_draws: int = 200, pool_size: int = 12000, pool_refresh: int = 4000,
                 error_sampling: float = 0.5):
        super().__init__(batch_size, lr, base_steps)
        self.unet = W.load_unet() if warm else W.build_unet(seed=0)
        self.unet.train()
        self.ema = copy.deepcopy(self.unet).requires_grad_(False).eval()
        self.noise = W.ddpm_scheduler()
        # frozen parts: loaded from the shipped folder, kept out of checkpoints
        self.frozen = {"vae": W.load_vae().requires_grad_(False),
                       "text": W.text_tower(W.load_clip()).requires_grad_(False)}
        self.pool: LatentPool | None = None
        # per-class error of the last judged check: classes are drawn in proportion to it (share error_sampling)
        self.register_buffer("class_error", torch.ones(len(SHAPES)))

    def trainable(self):
        return self.unet

    def on_fit_start(self):
        for model in self.frozen.values():
            model.to(self.device)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["text_tower_sha256"] = W.state_sha256(self.frozen["text"])
        return checkpoint  # frozen models are not submodules (a plain dict), so not in the state dict

    def on_load_checkpoint(self, checkpoint):
        saved, now = checkpoint.get("text_tower_sha256"), W.state_sha256(self.frozen["text"])
        if saved is not None and saved != now:
            raise SystemExit(f"unet: {W.WORK / 'unet'} was trained on text tower {saved}, the shipped one is {now}: "
                             "start over with --fresh")

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        return self.frozen["text"](self.tokens(captions))[0]

    def current_pool(self) -> LatentPool:
        """The latent pool of this step (encoded once, rebuilt from a new seed every ``pool_refresh`` steps)."""
        return self.refreshed_pool(lambda folder, index: LatentPool.load_or_build(
            folder, index, self.hparams.pool_size, self.frozen["vae"]))

    def training_step(self, batch, batch_idx):
        bs = self.hparams.batch_size
        seed = self.batch_seed()
        pool = self.current_pool()
        rng = np.random.default_rng(seed)
        weights = (1 - self.hparams.error_sampling) / len(SHAPES) + self.hparams.error_sampling * (
            self.class_error.cpu() / self.class_error.sum().cpu())
        idx = pool.draw(rng, bs, weights.numpy())
        captions = ["" if rng.random() < self.hparams.dropout else pool.captions[i] for i in idx]
        g = torch.Generator().manual_seed(seed)
        z = pool.sample(idx, g).to(self.device)
        cond = self.encode_text(captions)
        noise = torch.randn(z.shape, generator=g).to(self.device)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (bs,), generator=g).to(self.device)
        noisy = self.noise.add_noise(z, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=cond).sample
        per = ((pred - noise) ** 2).flatten(1).mean(1)
        if self.hparams.snr_gamma:
            ac = self.noise.alphas_cumprod.to(self.device)[t]
            snr = ac / (1 - ac)
            per = per * torch.clamp(snr, max=self.hparams.snr_gamma) / snr
        loss = per.mean()
        self.log_step(loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        step = self.total_steps
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, steps: int = 20, guidance: float = 3.0) -> np.ndarray:
        sched = W.ddim_scheduler()
        sched.set_timesteps(steps)
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((len(prompts), 4, 16, 16), generator=g).to(self.device)
        cond = torch.cat([self.encode_text([""] * len(prompts)), self.encode_text(prompts)])
        for t in sched.timesteps:
            eps_u, eps_c = self.ema(torch.cat([z, z]), t, encoder_hidden_states=cond).sample.chunk(2)
            z = sched.step(eps_u + guidance * (eps_c - eps_u), t, z).prev_sample
        vae = self.frozen["vae"]
        x = (vae.decode(z / vae.config.scaling_factor).sample + 1) / 2
        return _uint8(x)

    def sample_check(self, n: int = 200) -> dict:
        """Judge ``n`` draws of "a photo of a {shape}" (20 per class for n=200) on seeds training never uses."""
        ids = np.random.default_rng(EVAL_SEED + 2).permutation(np.arange(n) % len(SHAPES))
        images = np.concatenate([self.sample([f"a photo of a {SHAPES[i]}" for i in chunk], seed=EVAL_SEED + k)
                                 for k, chunk in enumerate(np.array_split(ids, max(1, n // 50)))])
        out = {"sample_prompts": "a photo of a {shape}", "sample_draws": n}
        from sage_lightning.shapesworld.judge import judge_shapes

        ok = np.array([name == SHAPES[i] for name, i in zip(judge_shapes(images), ids, strict=True)])
        per_class = {s: round(float(ok[ids == k].mean()), 3) for k, s in enumerate(SHAPES)}
        out.update(judge_shape_accuracy=round(float(ok.mean()), 4), judge_per_class=per_class)
        self.class_error.copy_(torch.tensor([1.0 - per_class[s] for s in SHAPES]).clamp_min(0.02))
        return out

    def export(self) -> dict:
        vae = self.frozen["vae"]
        try:  # the VAE stage may go on training the decoder alone: ship its newest decoder
            shipped = W.load_vae()
            if W.state_sha256(shipped.encoder) == W.state_sha256(vae.encoder):
                vae = shipped
        except OSError:
            pass
        W.export_pipeline(self.ema, vae, self.frozen["text"])
        figures = {"steps": self.total_steps, "batch_size": self.hparams.batch_size,
                   "text_tower_sha256": W.state_sha256(self.frozen["text"]),
                   "params": sum(p.numel() for p in self.unet.parameters())}
        figures.update(self.sample_check(self.hparams.check_draws))
        shipped = W.read_world().get("stages", {}).get("unet", {})
        # a curve belongs to one text tower
        curve = shipped.get("curve", []) if shipped.get("text_tower_sha256") == figures["text_tower_sha256"] else []
        figures["curve"] = [c for c in curve if c[0] < self.total_steps] + [
            [self.total_steps, figures["judge_shape_accuracy"]]]
        log.info(f"unet export at step {self.total_steps}: {figures}")
        return figures


MODULES = {"text": TextModule, "clip": ClipModule, "vae": VaeModule, "unet": UnetModule}
SHIPPED = {"text": W.CLIP_DIR / "model.safetensors",
           "clip": W.CLIP_DIR / "model.safetensors", "vae": W.PIPELINE_DIR / "vae" / "config.json",
           "unet": W.PIPELINE_DIR / "unet" / "config.json"}


# --------------------------------------------------------------------------------------- callbacks
class Exporter(L.Callback):
    """Export to the shipped folder every ``minutes`` of training and at the end of the run."""

    def __init__(self, minutes: float):
        self.every = minutes * 60
        self.last = time.time()

    def _export(self, module: WorldModule) -> None:
        figures = module.export()
        if figures:
            W.update_world(module.stage, **figures)
        self.last = time.time()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if time.time() - self.last >= self.every:
            self._export(module)

    def on_train_end(self, trainer, module):
        self._export(module)


def _unet_matches_text_tower() -> bool:
    trained_on = W.read_world().get("stages", {}).get("unet", {}).get("text_tower_sha256")
    return trained_on == W.state_sha256(W.text_tower(W.load_clip()))


def setup_logging(stage: str) -> None:
    folder = W.WORK / stage
    folder.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for h in (logging.FileHandler(folder / "train.log"), logging.StreamHandler(sys.stdout)):
        h.setFormatter(fmt)
        log.addHandler(h)
    log.setLevel(logging.INFO)


def train(stage: str, max_steps: int, threads: int = 1, export_minutes: float = 12.0,
          batch_size: int | None = None, lr: float | None = None, fresh: bool = False,
          freeze_text: bool = False, check_draws: int | None = None,
          overrides: list[str] | None = None, accelerator: str = "cpu", anneal: float | None = None) -> dict:
    """Train ``stage`` for ``max_steps`` more steps (resume > warm start > seed); returns world.json.

    ``anneal``: cosine-anneal the learning rate from ``lr`` to ``anneal * lr`` over this run's steps (the
    schedule belongs to this run only: a later resume without it trains at ``lr`` again).
    """
    if anneal is not None and not 0 < anneal <= 1:
        raise SystemExit(f"--anneal {anneal}: give the final learning rate as a fraction of lr in (0, 1], e.g. 0.1")
    if stage not in MODULES:
        raise SystemExit(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")
    torch.set_num_threads(threads)
    setup_logging(stage)
    folder = W.WORK / stage
    ckpt = folder / "last.ckpt"
    kwargs = {k: v for k, v in {"batch_size": batch_size, "lr": lr}.items() if v is not None}
    if freeze_text:
        kwargs["freeze_text"] = True
    if check_draws is not None:
        kwargs["check_draws"] = check_draws
    cls = MODULES[stage]
    params = inspect.signature(cls.__init__).parameters
    for item in overrides or []:
        key, value = item.split("=", 1)
        if key not in params:
            raise SystemExit(f"--set {key}: {stage} has no such setting ({', '.join(list(params)[1:])})")
        default = params[key].default
        kwargs[key] = value.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(value)
    resume = ckpt.exists() and not fresh
    if resume:
        module = cls.load_from_checkpoint(ckpt, **kwargs) if kwargs else cls.load_from_checkpoint(ckpt)
        done = torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]
        how = f"resuming {ckpt} at run step {done} (total {module.hparams.base_steps + done})"
    else:
        warm = SHIPPED[stage].exists() and not fresh
        if warm and stage == "unet" and not _unet_matches_text_tower():
            warm = False
            log.info("unet: the shipped UNet was trained on another text tower than the shipped one: from seed")
        base = W.read_world().get("stages", {}).get(stage, {}).get("steps", 0) if warm else 0
        module = cls(base_steps=base, warm=warm, **kwargs)
        done = 0
        how = f"warm start from shipped weights (total steps {base})" if warm else "fresh start from seed 0"
    if anneal is not None:
        module.anneal = (done, max_steps, anneal)
        how += f"; lr cosine-annealed to {anneal} x lr over these steps"
    log.info(f"{stage}: {how}; training {max_steps} more steps with {threads} thread(s)")
    L.seed_everything(STAGE_SEEDS[stage] * 1000 + done, workers=True, verbose=False)
    trainer = L.Trainer(
        max_steps=done + max_steps, accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(folder), num_sanity_val_steps=0,
        gradient_clip_val=1.0,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=str(folder), filename="{step}", save_last=True,
                                                save_top_k=1, every_n_train_steps=100),
            Exporter(export_minutes),
        ],
    )
    loader = DataLoader(_Steps(), batch_size=1, num_workers=0)
    trainer.fit(module, loader, ckpt_path=str(ckpt) if resume else None)
    return W.read_world()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m sage_lightning.shapesworld.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    a = p.parse_args(argv)
    run_from_args(a)


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stage", choices=STAGES)
    p.add_argument("--max-steps", type=int, default=1000, help="steps to train in this run (added)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--export-minutes", type=float, default=12.0, help="export interval (minutes)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--anneal", type=float, default=None, metavar="FRACTION",
                   help="cosine-anneal the lr to FRACTION x lr over this run's steps (e.g. 0.1)")
    p.add_argument("--fresh", action="store_true", help="ignore checkpoints and shipped weights")
    p.add_argument("--freeze-text", action="store_true",
                   help="clip: train the vision side only (the UNet depends on the text tower)")
    p.add_argument("--check-draws", type=int, default=None,
                   help="unet: judged samples at each export (default 100)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu (default), gpu, auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a module setting, also on resume (e.g. freeze_encoder=true, class_weight=3)")


def run_from_args(a: argparse.Namespace) -> dict:
    world = train(a.stage, a.max_steps, threads=a.threads, export_minutes=a.export_minutes,
                  batch_size=a.batch_size, lr=a.lr, fresh=a.fresh,
                  freeze_text=getattr(a, "freeze_text", False), check_draws=getattr(a, "check_draws", None),
                  overrides=a.set, accelerator=a.accelerator, anneal=getattr(a, "anneal", None))
    log.info(f"{a.stage} done: {world['stages'].get(a.stage)}")
    return world


if __name__ == "__main__":
    main()
