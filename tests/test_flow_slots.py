"""Embedding slots on SD3 and FLUX (issue 23 item 4): one vector per text stream (SD3: CLIP-L, CLIP-G, T5; FLUX:
CLIP, T5), put in at the slot token of each tokenizer, the conditioning assembled as the pipelines'
``encode_prompt``; each stream's step and box from its own table; candidate words in both vocabularies; the
universal token's export with its per-stream widths."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from callbacks.token_writer import TokenWriter
from sage_lightning.candidates import Candidate, WordFilter, WordListCandidates
from sage_lightning.datamodules import ClassPromptDataModule
from sage_lightning.flow_models import build_tiny_flux, build_tiny_sd3
from sage_lightning.flow_models.encoder import FlowPromptEncoder
from sage_lightning.optim import SignSGD
from sage_lightning.searches import PromptSearch, UniversalTokenSearch
from sage_lightning.searches.random_token import reference_token
from sage_lightning.targets import Target
from sage_lightning.text import slot

STACKS = {"tiny-sd3": (build_tiny_sd3, [32, 32, 80]), "tiny-flux": (build_tiny_flux, [32, 32])}


@pytest.fixture(scope="module", params=list(STACKS))
def stack(request):
    build, widths = STACKS[request.param]
    model = build()
    return request.param, model, FlowPromptEncoder(model), widths


def _equal(a, b) -> bool:
    return torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)


def test_encoding_equals_the_pipelines_encode_prompt_with_and_without_slots(stack):
    """Each stream's slot set to that stream's input embedding of a word (one token in each tokenizer) gives the
    pipeline's own encoding of the prompt with the word, bit for bit; per prompt rows ``[B, D]`` too."""
    _, model, encoder, widths = stack
    assert encoder.widths == widths and encoder.embed_dim == sum(widths)
    prompts = ["a photo of a star", "", "a red ring on a plain background " + "word " * 40]  # the last truncated
    assert _equal(encoder(prompts), model.encode(prompts)) and _equal(encoder.unconditional(), model.encode([""]))
    red, star = encoder.word_embedding("red"), encoder.word_embedding("star")
    t5, shares = encoder.t5, star.split(widths)
    assert len(encoder.word_ids("star")) == len(t5.word_ids("star")) == 1  # one token in each tokenizer
    assert torch.equal(shares[0], encoder.parts[0].embedding_rows(encoder.word_ids("star"))[0])
    assert torch.equal(shares[-1], t5.embedding_rows(t5.word_ids("star"))[0])  # T5's own row, not CLIP's
    slotted = encoder([f"a {slot('x')} {slot('y')} on a table", f"a {slot('x')} {slot('y')}"],
                      {"x": torch.stack([red, star]), "y": star})
    assert _equal(slotted, model.encode(["a red star on a table", "a star star"]))


def test_gradients_reach_every_stream_of_the_slots_and_nothing_in_the_frozen_model(stack):
    """Through the transformer, the sampler and D: each stream's share of the slots moves the loss."""
    source, model, _, widths = stack
    search = PromptSearch(candidates=WordListCandidates(["red"]), diffusion=source, scheduler="flow-euler",
                          num_steps=2, guidance_scale=3.0)
    search.prepare(ClassPromptDataModule(classes=["star"]).targets)
    search.trainer = None
    cond = search.frozen.encoder([search.slotted_prompt(0)], {"x": search.slots[0, 0], "y": search.slots[0, 1]})
    images = search.generate(search.step_latents([0]), cond, search.step_seeds([0]))
    search.frozen.ensemble(images, search.class_index[:1]).loss.backward()
    for stream in search.slots.grad[0].split(widths, dim=-1):
        assert stream[0].abs().sum() > 0 and stream[1].abs().sum() > 0  # [x] and [y], every stream
    frozen = [p for m in search.frozen.model.modules() for p in m.parameters()]
    assert frozen and all(not p.requires_grad and p.grad is None for p in frozen)


def test_each_stream_steps_and_stays_in_the_box_of_its_own_table(stack):
    source, model, encoder, widths = stack
    search = UniversalTokenSearch(target="star", diffusion=source, scheduler="flow-euler", num_steps=1)
    search.prepare(lambda known: [Target(0, "ring", "a photo of a ring", 0)])
    tables = [part.token_embedding.weight.detach().float() for part in search.frozen.encoder.parts]
    assert tables[-1].shape[0] == len(encoder.t5.tokenizer) != tables[0].shape[0]  # T5's table is another
    scale = search.scale
    stds = [float(t.std()) for t in tables]
    assert stds[0] != stds[-1]
    token = torch.nn.Parameter(torch.zeros(sum(widths)))
    token.grad = -torch.ones_like(token)
    SignSGD([token], lr=0.25, scale=scale.step_scale("table")).step()
    for moved, std in zip(token.detach().split(widths), stds, strict=True):
        assert torch.allclose(moved, torch.full_like(moved, 0.25 * std))  # lr x the stream's own entry std
    far = torch.full((sum(widths),), 100.0)
    for boxed, table in zip(scale.project(far, "range").split(widths), tables, strict=True):
        assert torch.equal(boxed, table.max(0).values)
    for boxed, table in zip(scale.project(far, "norm").split(widths), tables, strict=True):
        assert torch.isclose(boxed.norm(), table.norm(dim=1).max())
    start = search.token.detach()  # mean_noise, projected: every stream within its table's range
    for part, table in zip(start.split(widths), tables, strict=True):
        assert bool(((part >= table.min(0).values) & (part <= table.max(0).values)).all())


def test_candidates_are_one_token_in_each_tokenizer_or_the_mean_of_each(stack):
    """tiny T5 reads "dog" as two pieces: dropped with multi_token drop, each stream's mean with mean."""
    _, _, encoder, widths = stack
    t5 = encoder.t5
    assert len(encoder.word_ids("dog")) == 1 and len(t5.word_ids("dog")) == 2
    words = [Candidate("dog", 1.0), Candidate("red", 0.5)]
    assert [c.word for c, _ in WordFilter(encoder.word_tokenizers).accept(words)] == ["red"]
    assert [c.word for c, _ in WordFilter(encoder.word_tokenizers, multi_token="mean").accept(words)] == ["dog", "red"]
    dog = encoder.word_embedding("dog").split(widths)
    assert torch.equal(dog[-1], t5.embedding_rows(t5.word_ids("dog")).float().mean(0))
    assert torch.equal(dog[0], encoder.parts[0].embedding_rows(encoder.word_ids("dog"))[0])
    rows = encoder.embedding_rows(encoder.word_ids("red") + encoder.word_ids("dog"))  # CLIP ids, T5 by their text
    assert torch.equal(rows[0], encoder.word_embedding("red")) and torch.equal(rows[1][-widths[-1]:], dog[-1])


def test_the_universal_token_export_carries_the_stream_widths_and_reloads(stack, tmp_path):
    source, model, _, widths = stack
    search = UniversalTokenSearch(target="star", diffusion=source, scheduler="flow-euler", num_steps=1)
    search.prepare(lambda known: [Target(0, "ring", "a photo of a ring", 0)])
    meta = TokenWriter.metadata(search)
    encoders = "+".join(type(e).__name__ for e in model.modules()[2:])
    assert meta["widths"] == ",".join(map(str, widths)) and meta["dimension"] == str(sum(widths))
    assert meta["text_encoder"] == f"{source}:{encoders}" and meta["slot"] == "[*]"
    save_file({"embedding": search.token.detach().float()}, tmp_path / "token.safetensors", meta)
    token, reloaded = reference_token(tmp_path)
    assert reloaded == meta and torch.equal(token, search.token.detach())
    # a plain pipeline: the placeholder added to each stream's tokenizer (copies), its share into that stream's table
    expected = search.encode([Target(0, "ring", "a photo of a ring", 0)], with_token=True)
    flow, placeholder, loaded = search.frozen.model, reloaded["placeholder"], {}
    shares = token.split([int(w) for w in reloaded["widths"].split(",")])
    for k, share in enumerate(shares):
        suffix = "" if k == 0 else f"_{k + 1}"
        tokenizer = copy.deepcopy(getattr(flow, "tokenizer" + suffix))
        text_encoder = getattr(flow, "text_encoder" + suffix)
        tokenizer.add_tokens(placeholder)
        text_encoder.resize_token_embeddings(len(tokenizer))
        text_encoder.get_input_embeddings().weight.data[tokenizer.convert_tokens_to_ids(placeholder)] = share
        loaded["tokenizer" + suffix] = tokenizer
    assert _equal(dataclasses.replace(flow, **loaded).encode([f"a photo of a ring {placeholder}"]), expected)


def test_the_text_term_reads_the_clip_streams_pooled_features(stack):
    """The universal token's ``cos(text(p + e), text(p))``: the pooled features of the CLIP streams (T5 has none),
    each unit length; its gradient reaches the CLIP shares of the token and leaves T5's at zero."""
    source, _, _, widths = stack
    search = UniversalTokenSearch(target="star", diffusion=source, scheduler="flow-euler", num_steps=1)
    search.prepare(lambda known: [Target(0, "ring", "a photo of a ring", 0)])
    pooled = search.frozen.encoder.pooled(["a photo of a ring"])
    assert pooled.shape == (1, 32 * (len(widths) - 1)) and torch.isclose(pooled.norm(), torch.tensor(1.0))
    search.text_similarity([Target(0, "ring", "a photo of a ring", 0)]).sum().backward()
    *clip, t5 = search.token.grad.split(widths)
    assert all(share.abs().sum() > 0 for share in clip) and not t5.any()
