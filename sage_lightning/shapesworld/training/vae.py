"""The VAE stage: a 4x ``AutoencoderKL`` on the generator's drawings (L1 + MSE + Sobel edges + a small KL);
``freeze_encoder`` trains the decoder alone once the UNet depends on the latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.generator import make_batch
from sage_lightning.shapesworld.training.base import EVAL_SEED, WorldModule, judge_accuracy, log, to_uint8


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Horizontal and vertical Sobel responses of every channel of ``x`` ``[B, C, H, W]`` -> ``[B, 2C, H, W]``."""
    k = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([k, k.T])[:, None].repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k, groups=x.shape[1])


class VaeModule(WorldModule):
    """The world's VAE (scale factor 4, 4 latent channels); its latent scaling factor is measured at export."""

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
        """The VAE (the encoder frozen by ``requires_grad`` when ``freeze_encoder``)."""
        return self.vae

    def training_step(self, batch, batch_idx):
        """Reconstruction (L1 + MSE + ``edge_weight`` x Sobel) + ``kl_weight`` x KL on a seeded batch."""
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
        """PSNR and the latent scale (1 / std of the posterior means) on ``n`` fresh drawings, with the images."""
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
        """Ship the VAE (not when a frozen encoder differs from the shipped one); figures: PSNR, scaling factor,
        the judge's accuracy on reconstructions."""
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
        judged = judge_accuracy(to_uint8(ev["recon"]), make_batch(500, EVAL_SEED + 1)[2])
        figures["judge_accuracy_on_reconstructions"] = round(judged, 4)
        log.info(f"vae export at step {self.total_steps}: {figures}")
        return figures

