"""The prompt-embedding adapter: free slots reproduce real tokens exactly and carry gradients."""

from __future__ import annotations

import pytest
import torch

from sage_lightning.errors import SageError
from sage_lightning.text import PromptEncoder, slot

X, Y = slot("x"), slot("y")


@pytest.fixture(scope="module")
def encoder(tiny):
    return PromptEncoder(tiny.tokenizer, tiny.text_encoder)


def test_plain_prompt_equals_pipeline_encoding(tiny, encoder):
    prompt = "a photo of a golden retriever"
    ids = tiny.tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        reference = tiny.text_encoder(ids.input_ids)[0]
        ours = encoder([prompt])
    assert encoder.tokenize(prompt).ids == ids.input_ids[0].tolist()
    assert torch.equal(ours, reference)


def test_slot_with_existing_token_embedding_reproduces_prompt(encoder):
    word_id = encoder.word_ids("retriever")
    assert len(word_id) == 1
    vector = encoder.token_embedding.weight[word_id[0]].detach().clone()
    with torch.no_grad():
        reference = encoder(["a photo of a golden retriever", "a red star retriever"])
        slotted = encoder([f"a photo of a golden {X}", f"a red star {X}"], {"x": vector})
    assert torch.equal(slotted, reference)


def test_two_slots_per_prompt_vectors_and_gradients(encoder):
    x = torch.randn(2, encoder.embed_dim, requires_grad=True)
    y = torch.randn(encoder.embed_dim, requires_grad=True)
    hidden = encoder([f"a photo of a cat {X} {Y}", f"{X} a dog {Y}"], {"x": x, "y": y})
    hidden.square().sum().backward()
    assert x.grad is not None and (x.grad.abs().sum(dim=1) > 0).all()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert encoder.token_embedding.weight.grad is None  # the vocabulary itself is never touched


def test_slot_errors(encoder):
    with pytest.raises(SageError, match=r"slot \[x\] but no vector"):
        encoder([f"a {X}"])
    with pytest.raises(SageError, match="appears twice"):
        encoder.tokenize(f"{X} and {X}")
    with pytest.raises(SageError, match="too long"):
        encoder.tokenize("word " * 80 + X)


def test_hook_is_removed_after_encoding(encoder):
    vector = torch.zeros(encoder.embed_dim)
    encoder([f"a {X}"], {"x": vector})
    assert not encoder.token_embedding._forward_hooks


@pytest.mark.parametrize("text", ["a photo of a [a] and a [x]", "star [*] [y] [z]"])
def test_text_that_looks_like_a_slot_is_plain_text(tiny, encoder, text):
    """Literal "[a]".."[z]", "[*]" in a user's prompt are words, never slots (issue 10 item 13)."""
    ids = tiny.tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert encoder.tokenize(text).ids == ids and not encoder.tokenize(text).slots
    vector = torch.zeros(encoder.embed_dim)
    with torch.no_grad():
        slotted = encoder([f"{text} {X}"], {"x": vector})
    assert encoder.tokenize(f"{text} {X}").slots == {"x": len(tiny.tokenizer(text).input_ids) - 1}
    assert slotted.shape == (1, 77, encoder.embed_dim)


def test_slot_markers_are_checked():
    with pytest.raises(SageError, match="slot name 'xy'"):
        slot("xy")
