"""The prompt encoder a search uses on an SD3 / FLUX model: the pipeline's own ``encode_prompt``, no slots yet."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from sage_lightning.errors import SageError
from sage_lightning.flow_models.records import FlowModel
from sage_lightning.text import XLConditioning


class FlowPromptEncoder(nn.Module):
    """Prompts -> :class:`~sage_lightning.text.XLConditioning` of a flow model (``FlowModel.encode``).

    Free embedding slots (prompt and universal-token search) are not supported on these models yet: a prompt
    with slot vectors is refused with one line rather than encoded without them."""

    def __init__(self, model: FlowModel) -> None:
        super().__init__()
        self.__dict__["model"] = model  # the frozen model is not a submodule of the encoder
        self.tokenizer = model.tokenizer

    def forward(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> XLConditioning:
        if slots:
            raise SageError(f"{type(self.model).__name__} does not take embedding slots yet (issue 23 item 4): use "
                            "LatentSearch on SD3 / FLUX")
        return self.model.encode(prompts)

    def unconditional(self) -> XLConditioning:
        """The negative branch: the empty prompt (the pipelines' default negative prompt)."""
        return self.model.unconditional()
