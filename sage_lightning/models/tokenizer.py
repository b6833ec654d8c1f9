"""The CLIP BPE tokenizer (Stable Diffusion 1.x's, and SDXL's second one), built offline from open_clip's vocabulary."""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

TOKENIZER_CACHE = Path(os.environ.get("SAGE_CACHE", Path.home() / ".cache" / "sage_lightning")) / "clip_bpe"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable mapping (as in open_clip's SimpleTokenizer)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2**8):
        if b not in bs:
            bs.append(b)
            cs.append(2**8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_bpe_files(folder: Path) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` of the real CLIP BPE (49408 tokens) into ``folder``.

    Built offline from ``bpe_simple_vocab_16e6.txt.gz`` that open_clip ships, in the order open_clip's
    ``SimpleTokenizer`` uses, so ids equal open_clip's (and OpenAI CLIP's / Stable Diffusion 1.x's).
    """
    import open_clip.tokenizer as oct

    with gzip.open(oct.default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp_vocab, tmp_merges = folder / "vocab.json.tmp", folder / "merges.txt.tmp"
    tmp_vocab.write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    tmp_merges.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tmp_vocab.replace(folder / "vocab.json")
    tmp_merges.replace(folder / "merges.txt")
    return folder


@lru_cache(maxsize=4)
def clip_tokenizer(folder: str | None = None, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The Stable Diffusion 1.x CLIP tokenizer (pads with ``<|endoftext|>``), built offline.

    ``pad_token="!"``: SDXL's second tokenizer (OpenCLIP's padding, id 0), same vocabulary."""
    path = Path(folder) if folder else TOKENIZER_CACHE
    if not (path / "vocab.json").exists() or not (path / "merges.txt").exists():
        write_clip_bpe_files(path)
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True, model_max_length=77, pad_token=pad_token)

