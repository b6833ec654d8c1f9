"""The UNet stage: text-conditioned latent diffusion on the frozen text tower and VAE, with an EMA copy that is
shipped, classes drawn by their judged error, and a judged sample check at every export."""

from __future__ import annotations

import copy

import numpy as np
import torch

from sage_lightning.errors import SageError
from sage_lightning.models import DiffusionModel, clip_tokenizer
from sage_lightning.sampler import DiffusionSampler
from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.generator import SHAPES
from sage_lightning.shapesworld.judge import judge_shapes
from sage_lightning.shapesworld.pools import LatentPool
from sage_lightning.shapesworld.training.base import EVAL_SEED, WorldModule, log, to_uint8


class UnetModule(WorldModule):
    """The world's UNet, trained on latents of a pool encoded once by the frozen VAE (sampled from each drawing's
    posterior), captions dropped to "" with probability ``dropout`` (classifier-free guidance), min-SNR-weighted
    loss (``snr_gamma``); the EMA copy (``ema_decay``) is what is shipped and judged."""

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
        """The UNet (the EMA copy follows it after every step)."""
        return self.unet

    def on_fit_start(self):
        """Move the frozen VAE and text tower (not submodules) to the training device."""
        for model in self.frozen.values():
            model.to(self.device)

    def on_save_checkpoint(self, checkpoint):
        """Record the text tower the UNet trains on."""
        checkpoint["text_tower_sha256"] = W.state_sha256(self.frozen["text"])
        return checkpoint  # frozen models are not submodules (a plain dict), so not in the state dict

    def on_load_checkpoint(self, checkpoint):
        """SageError when the checkpoint was trained on another text tower than the shipped one."""
        saved, now = checkpoint.get("text_tower_sha256"), W.state_sha256(self.frozen["text"])
        if saved is not None and saved != now:
            raise SageError(f"unet: {W.WORK / 'unet'} was trained on text tower {saved}, the shipped one is {now}: "
                             "start over with --fresh")

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> torch.Tensor:
        """The frozen text tower's hidden states of ``captions`` ``[B, 77, d]``."""
        return self.frozen["text"](self.tokens(captions))[0]

    def current_pool(self) -> LatentPool:
        """The latent pool of this step (encoded once, rebuilt from a new seed every ``pool_refresh`` steps)."""
        return self.refreshed_pool(lambda folder, index: LatentPool.load_or_build(
            folder, index, self.hparams.pool_size, self.frozen["vae"]))

    def training_step(self, batch, batch_idx):
        """Noise-prediction loss on a seeded batch from the pool, classes drawn by their judged error."""
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
        """Move the EMA copy towards the UNet (decay warmed up over the first steps)."""
        step = self.total_steps
        decay = min(self.hparams.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)

    def pipeline(self) -> DiffusionModel:
        """The EMA UNet with the frozen VAE and text tower and the world's DDIM, as a model record."""
        return DiffusionModel(self.ema, self.frozen["vae"], self.frozen["text"], clip_tokenizer(), W.ddim_scheduler(),
                              name="shapesworld-training")

    @torch.no_grad()
    def sample(self, prompts: list[str], seed: int, steps: int = 20, guidance: float = 3.0) -> np.ndarray:
        """uint8 images ``[N, H, W, 3]`` of ``prompts`` from the EMA UNet: the project's sampler (DDIM, ``steps``,
        classifier-free ``guidance``) from Gaussian latents of ``seed`` in the UNet's latent shape."""
        model = self.pipeline()
        config = model.unet.config
        g = torch.Generator().manual_seed(seed)
        z = torch.randn((len(prompts), config.in_channels, config.sample_size, config.sample_size), generator=g)
        sampler = DiffusionSampler(model, num_steps=steps, guidance_scale=guidance)
        images = sampler(z.to(self.device), self.encode_text(prompts), self.encode_text([""] * len(prompts)))
        return to_uint8(images)

    def sample_check(self, n: int = 200) -> dict:
        """Judge ``n`` draws of "a photo of a {shape}" (20 per class for n=200) on seeds training never uses."""
        ids = np.random.default_rng(EVAL_SEED + 2).permutation(np.arange(n) % len(SHAPES))
        images = np.concatenate([self.sample([f"a photo of a {SHAPES[i]}" for i in chunk], seed=EVAL_SEED + k)
                                 for k, chunk in enumerate(np.array_split(ids, max(1, n // 50)))])
        out = {"sample_prompts": "a photo of a {shape}", "sample_draws": n}
        ok = np.array([name == SHAPES[i] for name, i in zip(judge_shapes(images), ids, strict=True)])
        per_class = {s: round(float(ok[ids == k].mean()), 3) for k, s in enumerate(SHAPES)}
        out.update(judge_shape_accuracy=round(float(ok.mean()), 4), judge_per_class=per_class)
        self.class_error.copy_(torch.tensor([1.0 - per_class[s] for s in SHAPES]).clamp_min(0.02))
        return out

    def export(self) -> dict:
        """Ship the pipeline (EMA UNet, the newest VAE with this encoder, the text tower); figures: the sample
        check and the accuracy curve of this text tower."""
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
