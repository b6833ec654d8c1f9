"""The text stage: CLIP's text tower taught to state each caption's attributes, then frozen."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sage_lightning.shapesworld import world as W
from sage_lightning.shapesworld.caption_labels import HEADS, caption_batch
from sage_lightning.shapesworld.gates import text_gates
from sage_lightning.shapesworld.training.base import WorldModule, log

EOS = 49407  # <|endoftext|>: CLIP pools its state; Stable Diffusion pads with it


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
        """The text tower and the attribute heads."""
        return torch.nn.ModuleList([self.clip.text_model, self.heads])

    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(first <|endoftext|> state, mean of the 77 states), each [B, d]."""
        h = self.clip.text_model(input_ids=ids).last_hidden_state
        eos = h[torch.arange(len(ids), device=h.device), (ids == EOS).int().argmax(1)]
        return eos, h.mean(1)

    def training_step(self, batch, batch_idx):
        """Cross-entropy of every head on a seeded batch of captions."""
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
        """Ship the CLIP (with this text tower); figures: the text gates."""
        self.clip.eval()
        figures = text_gates(W.text_tower(self.clip))
        W.export_clip(self.clip)
        self.clip.text_model.train()
        figures.update(steps=self.total_steps, text_tower_sha256=W.state_sha256(self.clip.text_model))
        log.info(f"text export at step {self.total_steps}: {figures}")
        return figures
