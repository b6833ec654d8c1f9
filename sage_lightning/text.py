"""Prompt encoding with free embedding slots: the one place that knows the text encoder's internals.

A prompt may hold named slots (``a``..``z`` or ``*``; shown as ``[x]``, ``[y]``, ``[*]``), each one token
wide, written with :func:`slot`: the name between two Unicode private-use characters, so no text a user
types, "[a]" included, ever becomes a slot. Their input embeddings are not looked up in the vocabulary but
taken from tensors the caller passes (SAGE's adversarial word slots and the universal token). Route: the
prompt is tokenised piece by piece around the slots, and a forward hook on the text encoder's
token-embedding module replaces the slot positions, so no transformers class is patched and gradients
reach the slot tensors.
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


class PromptEncoder(nn.Module):
    """Encode prompts into the text encoder's last hidden states ``[B, 77, D]``; slots take free vectors.

    Example::

        enc = PromptEncoder(model.tokenizer, model.text_encoder)
        e_x = torch.zeros(enc.embed_dim, requires_grad=True)
        h = enc([f"a photo of a dog {slot('x')}"], {"x": e_x})   # [1, 77, D], differentiable in e_x
    """

    def __init__(self, tokenizer, text_encoder: nn.Module) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = int(tokenizer.model_max_length)
        # A plain, non-special token id stands at slot positions before the hook overwrites it.
        self.slot_placeholder_id = int(tokenizer.convert_tokens_to_ids("!"))

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.text_encoder.get_input_embeddings()

    @property
    def embed_dim(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids) if text.strip() else []

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        """Ids ``[BOS, ..., EOS, pad...]`` as the tokenizer would give, with a slot id at each slot."""
        ids: list[int] = [self.tokenizer.bos_token_id]
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
            return self.text_encoder(ids)[0]

        def replace(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
            output = output.clone()
            output[rows, cols] = torch.stack(vectors).to(output.dtype)
            return output

        handle = self.token_embedding.register_forward_hook(replace)
        try:
            return self.text_encoder(ids)[0]
        finally:
            handle.remove()

    def pooled(self, prompts: Sequence[str], slots: Mapping[str, Tensor] | None = None) -> Tensor:
        """The pooled (EOS-position) text feature ``[B, D]``, e.g. for text-similarity terms."""
        hidden = self(prompts, slots)
        eos = torch.tensor(
            [self.tokenize(p).ids.index(self.tokenizer.eos_token_id) for p in prompts], device=hidden.device
        )
        return hidden[torch.arange(len(prompts), device=hidden.device), eos]
