"""The prompt encoder a search uses on an SD3 / FLUX model, with free embedding slots in every text stream.

A slot (``text.slot``: the adversarial words' ``[x]`` / ``[y]``, the universal token's ``[*]``) is one vector per
text stream side by side, as SDXL's (:class:`~sage_lightning.text.XLPromptEncoder`): SD3 ``[D_clip_l + D_clip_g +
D_t5]``, FLUX ``[D_clip + D_t5]`` (``widths``). Each stream tokenises the prompt with its own tokenizer (T5: no BOS,
``max_sequence_length`` tokens) and its share of the slot vector replaces the slot's input embedding before its
encoder runs (:class:`~sage_lightning.text.PromptEncoder`'s hook); the streams' outputs are then put together as
the pipeline's ``encode_prompt`` does (:meth:`FlowModel.assemble`). Without slots the result equals
``encode_prompt``'s (tests/test_flow_slots.py).

CLIP and T5 read different vocabularies: a token id (``word_ids``, ``embedding_rows``: a random starting row, an
``init_word``) is CLIP's, and the T5 stream takes the mean T5 row of that token's text; a candidate word is
embedded by each tokenizer's own tokens (:meth:`FlowPromptEncoder.word_embedding`, the mean rule) and with
``multi_token: drop`` must be one token in each (``word_tokenizers``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from sage_lightning.flow_models.records import FlowModel
from sage_lightning.text import XLConditioning, XLPromptEncoder, side_by_side, unit_pooled


class FlowPromptEncoder(XLPromptEncoder):
    """Prompts (with slots) -> :class:`~sage_lightning.text.XLConditioning` of a flow model; ``parts``: one
    :class:`~sage_lightning.text.PromptEncoder` per text stream (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP, T5)."""

    def __init__(self, model: FlowModel) -> None:
        tokenizers, encoders, lengths = zip(*model.text_streams(), strict=True)
        super().__init__(tokenizers, encoders, force_zeros_for_empty_prompt=False, max_lengths=lengths)
        self.__dict__["model"] = model  # the frozen model is not a submodule of the encoder

    @property
    def t5(self):
        """The T5 stream (the last part)."""
        return self.parts[-1]

    @property
    def word_tokenizers(self) -> list:
        """A candidate word must be one token in CLIP's and in T5's tokenizer (``multi_token: drop``)."""
        return [self.tokenizer, self.t5.tokenizer]

    def token_text(self, token_id: int) -> str:
        """The text of one CLIP token (its end-of-word mark dropped)."""
        return self.tokenizer.convert_ids_to_tokens(int(token_id)).replace("</w>", " ").strip()

    def embedding_rows(self, ids: Sequence[int]) -> Tensor:
        """Each stream's input embeddings of the CLIP token ``ids``, side by side ``[n, D]``: the CLIP streams'
        rows, and for T5 the mean T5 row of each token's text (``<unk>``'s row for a text T5 reads as nothing)."""
        t5 = self.t5
        t5_rows = [t5.embedding_rows(t5.word_ids(self.token_text(i)) or [t5.tokenizer.unk_token_id]).float().mean(0)
                   for i in ids]
        return side_by_side([*(part.embedding_rows(ids) for part in self.parts[:-1]), torch.stack(t5_rows)])

    def word_embedding(self, word: str) -> Tensor:
        """``word``'s slot vector ``[D]`` (float32): in each stream the mean of its own tokens' rows."""
        return torch.cat([part.word_embedding(word) for part in self.parts])

    def forward(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> XLConditioning:
        return self.model.assemble(self._outputs(prompts, slots))

    def unconditional(self) -> XLConditioning:
        """The negative branch: the empty prompt (the pipelines' default negative prompt)."""
        return self([""])

    def pooled(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> Tensor:
        """The CLIP streams' pooled features (T5 has none), each L2-normalised, side by side (the universal
        token's text-similarity term; :func:`~sage_lightning.text.unit_pooled`)."""
        return unit_pooled(self._outputs(prompts, slots, first=len(self.parts) - 1))
