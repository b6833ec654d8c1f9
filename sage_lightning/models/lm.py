"""Loading the causal language model that proposes a prompt search's candidate words."""

from __future__ import annotations

import torch

from sage_lightning.models.sources import check_lm_source, load_error


def load_causal_lm(source: str, local_files_only: bool = False, device: str = "cpu"):
    """``(tokenizer, model)`` of a Hugging Face causal LM (hub id, folder or a world's name such as
    ``"shapesworld"``), frozen, float32, on ``device``; ``trust_remote_code`` is never set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, is_local = check_lm_source(source)
    where, offline = (str(path) if is_local else source), local_files_only or is_local
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=offline, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            where, local_files_only=offline, trust_remote_code=False, dtype=torch.float32
        )
    except (OSError, ValueError) as err:
        raise load_error("the candidate language model", source, err) from err
    return tokenizer, model.requires_grad_(False).eval().to(device)

