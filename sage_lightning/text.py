"""Prompt encoding with free embedding slots: the one place that knows the text encoder's internals.

A prompt may hold named slots (``a``..``z`` or ``*``; shown as ``[x]``, ``[y]``, ``[*]``), each one token
wide, written with :func:`slot`: the name between two Unicode private-use characters, so no text a user
types, "[a]" included, ever becomes a slot. Their input embeddings are not looked up in the vocabulary but
taken from tensors the caller passes (SAGE's adversarial word slots and the universal token). Route: the
prompt is tokenised piece by piece around the slots, and a forward hook on the text encoder's
token-embedding module replaces the slot positions, so no transformers class is patched and gradients
reach the slot tensors. Stable Diffusion XL's two encoders: :class:`XLPromptEncoder` (one hook per encoder; a
slot's vector is split between them) and :func:`prompt_encoder`, which picks the encoder a model needs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from sage_lightning.errors import SageError

SLOT_OPEN, SLOT_CLOSE = "\ue000", "\ue001"  # private-use code points: never typed by accident
SLOT = re.compile(f"{SLOT_OPEN}([a-z]|\\*){SLOT_CLOSE}")


def slot(name: str) -> str:
    """The marker of slot ``name`` (``a``..``z`` or ``*``) to put in a prompt, e.g. ``f"a photo of a {slot('x')}"``."""
    if not re.fullmatch(r"[a-z]|\*", name):
        raise SageError(f"slot name {name!r}: use one letter a..z or '*'")
    return f"{SLOT_OPEN}{name}{SLOT_CLOSE}"


def readable(prompt: str) -> str:
    """``prompt`` with its slot markers shown as ``[x]`` (for messages and logs)."""
    return SLOT.sub(lambda m: f"[{m.group(1)}]", prompt)


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids padded to the encoder's length, and the position of each slot."""

    ids: list[int]
    slots: dict[str, int]


class CandidateWords:
    """How a prompt encoder embeds a whole candidate word (:class:`PromptEncoder`, :class:`XLPromptEncoder`: one
    vocabulary, read by ``word_ids`` and ``embedding_rows``)."""

    def word_embedding(self, word: str) -> Tensor:
        """``word``'s slot vector ``[embed_dim]`` (float32): the mean of its tokens' input embeddings (the
        candidates' mean rule; a one-token word: its row)."""
        return self.embedding_rows(self.word_ids(word)).float().mean(0)

    @property
    def word_tokenizers(self) -> list:
        """The tokenizers a candidate word must be one token in (``multi_token: drop``): the first one (SDXL's
        two share one vocabulary)."""
        return [self.tokenizer]


class PromptEncoder(CandidateWords, nn.Module):
    """Encode prompts into the text encoder's last hidden states ``[B, 77, D]``; slots take free vectors.

    Example::

        enc = PromptEncoder(model.tokenizer, model.text_encoder)
        e_x = torch.zeros(enc.embed_dim, requires_grad=True)
        h = enc([f"a photo of a dog {slot('x')}"], {"x": e_x})   # [1, 77, D], differentiable in e_x
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, max_length: int | None = None) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(max_length or tokenizer.model_max_length)
        # CLIP starts a prompt with BOS; T5 (SD3 / FLUX) has none and ends it with EOS only.
        bos = getattr(tokenizer, "bos_token_id", None)
        self.prefix_ids: list[int] = [] if bos is None else [int(bos)]
        # A plain, non-special token id stands at slot positions before the hook overwrites it.
        self.slot_placeholder_id = int(tokenizer.convert_tokens_to_ids("!"))

    @property
    def token_embedding(self) -> nn.Embedding:
        """The token-embedding module the encoder's forward calls (T5's ``encoder.embed_tokens``: the table is
        tied to ``get_input_embeddings()``, but that is another module, one a hook on would never fire)."""
        inner = getattr(getattr(self.text_encoder, "encoder", None), "embed_tokens", None)
        return inner if isinstance(inner, nn.Embedding) else self.text_encoder.get_input_embeddings()

    @property
    def embed_dim(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        """Ids ``[BOS, ..., EOS, pad...]`` as the tokenizer would give (no BOS for T5), with a slot id at each slot."""
        ids: list[int] = list(self.prefix_ids)
        slots: dict[str, int] = {}
        last = 0
        for match in SLOT.finditer(prompt):
            ids += self.word_ids(prompt[last : match.start()])
            name = match.group(1)
            if name in slots:
                raise SageError(f"slot [{name}] appears twice in prompt {readable(prompt)!r}: use each slot once")
            slots[name] = len(ids)
            ids.append(self.slot_placeholder_id)
            last = match.end()
        ids += self.word_ids(prompt[last:])
        if SLOT_OPEN in SLOT.sub("", prompt) or SLOT_CLOSE in SLOT.sub("", prompt):
            raise SageError(f"prompt {readable(prompt)!r} has a broken slot marker: write slots with text.slot(name)")
        ids = ids[: self.max_length - 1]
        if any(pos >= len(ids) for pos in slots.values()):
            raise SageError(f"prompt {readable(prompt)!r} is too long: a slot falls beyond {self.max_length} tokens")
        ids.append(self.tokenizer.eos_token_id)
        ids += [self.tokenizer.pad_token_id] * (self.max_length - len(ids))
        return TokenizedPrompt(ids, slots)

    def forward(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> Tensor:
        """Last hidden states ``[B, L, D]``. ``slots[name]`` is ``[D]`` (all prompts) or ``[B, D]``."""
        return self.encode(prompts, slots)[0]

    def encode(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None, **kwargs):
        """The text encoder's own output for ``prompts`` (``kwargs`` go to its forward), slots filled in."""
        slots = dict(slots or {})
        tokenized = [self.tokenize(p) for p in prompts]
        device = self.token_embedding.weight.device
        ids = torch.tensor([t.ids for t in tokenized], device=device)
        rows, cols, vectors = [], [], []
        for b, tok in enumerate(tokenized):
            for name, pos in tok.slots.items():
                if name not in slots:
                    raise SageError(f"prompt {readable(prompts[b])!r} has slot [{name}] but no vector was given for it")
                vec = slots[name]
                rows.append(b)
                cols.append(pos)
                vectors.append(vec if vec.dim() == 1 else vec[b])
        if not vectors:
            return self.text_encoder(ids, **kwargs)

        def replace(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
            output = output.clone()
            output[rows, cols] = torch.stack(vectors).to(output.dtype)
            return output

        handle = self.token_embedding.register_forward_hook(replace)
        try:
            return self.text_encoder(ids, **kwargs)
        finally:
            handle.remove()

    def embedding_rows(self, ids: Sequence[int]) -> Tensor:
        """Input embeddings of token ``ids``, ``[n, embed_dim]`` (the vectors a slot takes the place of)."""
        table = self.token_embedding.weight
        return table[torch.as_tensor(list(ids), dtype=torch.long, device=table.device)]

    def unconditional(self) -> Tensor:
        """The unconditional branch of classifier-free guidance: the empty prompt, ``[1, L, D]``."""
        return self([""])

    def pooled(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> Tensor:
        """The pooled (EOS-position) text feature ``[B, D]``, e.g. for text-similarity terms."""
        hidden = self(prompts, slots)
        eos = torch.tensor(
            [self.tokenize(p).ids.index(self.tokenizer.eos_token_id) for p in prompts], device=hidden.device
        )
        return hidden[torch.arange(len(prompts), device=hidden.device), eos]


# ------------------------------------------------------------------------------------- Stable Diffusion XL
@dataclass(frozen=True)
class XLConditioning:
    """SDXL's text conditioning of ``B`` prompts: ``hidden`` ``[B, L, D1 + D2]`` (both encoders' penultimate
    hidden states side by side, the UNet's ``encoder_hidden_states``) and ``pooled`` ``[B, P]`` (the second
    encoder's projected EOS feature, the UNet's ``text_embeds``)."""

    hidden: Tensor
    pooled: Tensor

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def to(self, *args, **kwargs) -> XLConditioning:
        return XLConditioning(self.hidden.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


def split_conditioning(cond: Tensor | XLConditioning) -> tuple[Tensor, Tensor | None]:
    """``(hidden states, pooled embedding or None)`` of a prompt encoder's output."""
    if isinstance(cond, XLConditioning):
        return cond.hidden, cond.pooled
    return cond, None


class XLPromptEncoder(CandidateWords, nn.Module):
    """Both SDXL text encoders behind :class:`PromptEncoder`'s interface; returns :class:`XLConditioning`.

    As ``StableDiffusionXLPipeline.encode_prompt``: each encoder reads the prompt through its own tokenizer
    (same vocabulary; the second pads with ``!``), ``hidden`` concatenates their penultimate hidden states,
    ``pooled`` is the second encoder's ``text_embeds``. A slot is one vector of ``D1 + D2`` entries: its
    first ``D1`` fill the first encoder's embedding table, the rest the second's (one vector per encoder).
    """

    def __init__(
        self, tokenizers: Sequence, text_encoders: Sequence[nn.Module], force_zeros_for_empty_prompt: bool = True,
        max_lengths: Sequence[int | None] | None = None,
    ) -> None:
        super().__init__()
        lengths = list(max_lengths or [None] * len(tokenizers))
        self.parts = nn.ModuleList(
            [PromptEncoder(*part) for part in zip(tokenizers, text_encoders, lengths, strict=True)]
        )
        self.tokenizer = tokenizers[0]
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @property
    def widths(self) -> list[int]:
        """Each encoder's share of a slot vector."""
        return [part.embed_dim for part in self.parts]

    @property
    def embed_dim(self) -> int:
        return sum(self.widths)

    def word_ids(self, text: str) -> list[int]:
        return self.parts[0].word_ids(text)

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        return self.parts[0].tokenize(prompt)

    def embedding_rows(self, ids: Sequence[int]) -> Tensor:
        """Both encoders' input embeddings of ``ids`` side by side, ``[n, D1 + D2]``."""
        return side_by_side([part.embedding_rows(ids) for part in self.parts])

    def _outputs(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None, first: int | None = None) -> list:
        """Each encoder's output (``first``: only the first ``first`` encoders run)."""
        pieces = {name: vec.split(self.widths, dim=-1) for name, vec in (slots or {}).items()}
        return [
            part.encode(prompts, {name: split[i] for name, split in pieces.items()}, output_hidden_states=True)
            for i, part in enumerate(self.parts[:first])
        ]

    def forward(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> XLConditioning:
        outputs = self._outputs(prompts, slots)
        pooled = [out[0] for out in outputs if out[0].ndim == 2]  # the encoder with a projection
        if not pooled:
            raise SageError("SDXL needs a second text encoder with a projection (CLIPTextModelWithProjection)")
        hidden = [out.hidden_states[-2] for out in outputs]
        device = hidden[0].device
        return XLConditioning(torch.cat([h.to(device) for h in hidden], -1), pooled[-1].to(device))

    def unconditional(self) -> XLConditioning:
        """The unconditional branch: all zeros when the model sets ``force_zeros_for_empty_prompt`` (the
        pipeline's rule without a negative prompt), else the empty prompt."""
        empty = self([""])
        if not self.force_zeros_for_empty_prompt:
            return empty
        return XLConditioning(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled))

    def pooled(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> Tensor:
        """Each encoder's pooled feature (the first's EOS state, the second's ``text_embeds``), L2-normalised and
        side by side ``[B, D1' + P]``: a cosine between two of them is the mean of the two encoders' cosines."""
        return unit_pooled(self._outputs(prompts, slots))


def unit_pooled(outputs: Sequence) -> Tensor:
    """The pooled features of CLIP encoders' ``outputs`` (a projection's ``text_embeds``, else the EOS state),
    each L2-normalised, side by side and scaled so that a cosine is the mean of the encoders' cosines."""
    features = [out[0] if out[0].ndim == 2 else out.pooler_output for out in outputs]
    device = features[0].device
    unit = [nn.functional.normalize(f.to(device).float(), dim=-1) for f in features]
    return torch.cat(unit, -1) / len(unit) ** 0.5


def side_by_side(rows: Sequence[Tensor]) -> Tensor:
    """Encoders' rows ``[n, D_i]`` concatenated along the last dimension (the first one's device, a common dtype)."""
    return torch.cat([r.to(rows[0].device, torch.promote_types(rows[0].dtype, r.dtype)) for r in rows], -1)


def prompt_encoder(model) -> PromptEncoder | XLPromptEncoder:
    """The prompt encoder of a :class:`~sage_lightning.models.DiffusionModel` (two encoders for SDXL)."""
    second = getattr(model, "text_encoder_2", None)
    if second is None:
        return PromptEncoder(model.tokenizer, model.text_encoder)
    return XLPromptEncoder(
        [model.tokenizer, model.tokenizer_2], [model.text_encoder, second], model.force_zeros_for_empty_prompt
    )
