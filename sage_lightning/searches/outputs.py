"""What one step of a latent search produced, for the writer and the loggers."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sage_lightning.surrogate import EnsembleOutput


@dataclass
class StepOutputs:
    """What one step produced, for the writer and the loggers (rows = real targets of this rank)."""

    targets: Tensor  # [b] target ids
    iterations: Tensor  # [b] updates applied before this evaluation
    images: Tensor  # [b, 3, H, W]
    latents: Tensor  # [b, C, h, w] the latents that produced the images
    output: EnsembleOutput  # sliced to the b real rows
    finished: Tensor  # [b] bool: found or exhausted at this evaluation
    found: Tensor  # [b] bool


def slice_output(output: EnsembleOutput, keep: Tensor) -> EnsembleOutput:
    return EnsembleOutput(
        loss=output.loss.detach(),
        per_sample_loss=output.per_sample_loss.detach()[keep],
        probs=output.probs.detach()[:, keep],
        topk=output.topk[:, keep],
        failed=output.failed[keep],
    )
