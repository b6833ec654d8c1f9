"""Loading: the real CLIP tokenizer built offline, save/reload round trip, clear errors."""

from __future__ import annotations

import logging

import open_clip
import pytest
import torch

from sage_lightning.errors import SageError
from sage_lightning.models import clip_tokenizer, load_diffusion

PROMPTS = [
    "a photo of a golden retriever",
    "A blue ring on a yellow background!",
    "a painting of a small  purple heart, drawn in 1990's style",
    "an astronaut riding a horse on mars, 4k",
    "",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_ids_equal_open_clip(prompt):
    ids = clip_tokenizer()(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    reference = open_clip.tokenize([prompt])[0].tolist()
    n = reference.index(49407) + 1
    assert ids[:n] == reference[:n]
    assert ids[n:] == [49407] * (77 - n)  # Stable Diffusion 1.x pads with <|endoftext|>, open_clip with 0


def test_tokenizer_vocabulary_is_full_clip():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406


def test_saved_tiny_reloads_with_identical_weights(tiny, tiny_loaded):
    for a, b in zip(tiny.modules(), tiny_loaded.modules(), strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any(p.requires_grad for m in tiny_loaded.modules() for p in m.parameters())


def test_scheduler_is_replaced_by_family(tiny_dir):
    model = load_diffusion(tiny_dir, scheduler="euler")
    assert type(model.scheduler).__name__ == "EulerDiscreteScheduler"
    assert model.scheduler.config.beta_schedule == "scaled_linear"


@pytest.mark.parametrize(
    ("source", "needle"),
    [("./no/such/folder", "does not exist"), ("/tmp", "no model_index.json")],
)
def test_bad_model_path_is_one_clear_line(source, needle):
    with pytest.raises(SageError) as err:
        load_diffusion(source)
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_bad_scheduler_and_dtype(tiny_dir):
    with pytest.raises(SageError, match="unknown scheduler 'heun'"):
        load_diffusion(tiny_dir, scheduler="heun")
    with pytest.raises(SageError, match="unknown dtype 'float8'"):
        load_diffusion(tiny_dir, dtype="float8")


def test_half_precision_load_is_quiet(tiny_dir, caplog):
    """diffusers warns 'modules ... should be kept in float32: []' on every cast; with none to keep it is noise."""
    with caplog.at_level(logging.WARNING):
        model = load_diffusion(tiny_dir, dtype="bfloat16")
    assert model.unet.dtype == model.vae.dtype == model.text_encoder.dtype == torch.bfloat16
    assert not [r for r in caplog.records if "kept in float32" in r.getMessage()]
