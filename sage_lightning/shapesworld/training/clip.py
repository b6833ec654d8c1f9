"""The CLIP stage: a contrastive tiny CLIP; its vision side trains against the frozen text tower."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.gates import class_prompts, clip_features, clip_zero_shot, tokenize
from sage_lightning.shapesworld.pools import ImagePool
from sage_lightning.shapesworld.training.base import EVAL_SEED, WorldModule, log


def class_prompt_tokens() -> torch.Tensor:
    """Token ids of the class prompts "a photo of a {shape}" (the zero-shot task), unpadded."""
    return tokenize(class_prompts(), pad_to_77=False)


class ClipModule(WorldModule):
    """Contrastive CLIP on captioned drawings plus a term against the class prompts; ``freeze_text`` keeps the
    shipped text tower (the UNet depends on it) and trains the vision side and projections only."""

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
        """The whole CLIP (its text tower frozen by ``requires_grad`` when ``freeze_text``)."""
        return self.clip

    def batch_images(self) -> tuple[torch.Tensor, list[str], torch.Tensor]:
        """This step's images, captions and shape ids: freshly drawn, or from the image pool (``pool_size``)."""
        if not self.hparams.pool_size:
            return self.images(self.hparams.batch_size, self.batch_seed())
        pool = self.refreshed_pool(lambda folder, index: ImagePool.load_or_build(folder, index,
                                                                                 self.hparams.pool_size))
        x, captions, ids = pool.batch(pool.draw(np.random.default_rng(self.batch_seed()), self.hparams.batch_size))
        return x.to(self.device), captions, ids.to(self.device)

    def training_step(self, batch, batch_idx):
        """CLIP's contrastive loss plus ``class_weight`` x the class-prompt term."""
        x, captions, ids = self.batch_images()
        out = self.clip(input_ids=self.tokens(captions, pad_to_77=False), pixel_values=W.pixel_values(x),
                        return_loss=True)
        # plus a contrastive term against the class prompts "a photo of a {shape}" (the zero-shot task)
        prompts = class_prompt_tokens().to(self.device)
        text = F.normalize(clip_features(self.clip.get_text_features(input_ids=prompts)), dim=-1)
        img = F.normalize(out.image_embeds, dim=-1)
        cls = F.cross_entropy(self.clip.logit_scale.exp() * img @ text.T, ids)
        loss = out.loss + self.hparams.class_weight * cls
        self.log_step(loss, clip=out.loss.item(), cls=cls.item(), scale=self.clip.logit_scale.exp().item())
        return loss

    def zero_shot(self, n: int = 1000) -> float:
        """Zero-shot shape accuracy on ``n`` fresh drawings (seeds training never uses)."""
        self.clip.eval()
        acc = clip_zero_shot(self.clip, n, EVAL_SEED)
        self.clip.train()
        return acc

    def export(self) -> dict:
        """Ship the CLIP; figures: zero-shot accuracy and the text tower's hash."""
        acc = self.zero_shot()
        self.clip.eval()
        W.export_clip(self.clip)
        self.clip.train()
        log.info(f"clip export at step {self.total_steps}: zero-shot shape accuracy {acc:.4f}")
        return {"zero_shot_shape_accuracy": round(acc, 4), "steps": self.total_steps,
                "text_tower_sha256": W.state_sha256(self.clip.text_model),
                "text_frozen": self.hparams.freeze_text,
                "prompt": "a photo of a {shape}", "eval_images": 1000}

