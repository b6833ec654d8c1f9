"""An offline T5 tokenizer for the tiny SD3 / FLUX stacks (no hub access, no sentencepiece).

Real T5 checkpoints ship ``spiece.model`` (a SentencePiece unigram model of 32k pieces); none ships offline
here and ``sentencepiece`` is not installed. ``tokenizers``' ``UnigramTrainer`` runs, but two trainings on the
same corpus gave the same pieces with different scores (so segmentations could differ) and took 3 to 76 s on
this shared CPU, so a tiny stack would not be bit-for-bit the same on two machines. What is built instead,
deterministically and in well under a second: transformers' own ``T5Tokenizer`` (a unigram model with T5's
Metaspace pre-tokenizer, ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and ``</s>`` appended) on a vocabulary taken
from the real CLIP BPE that open_clip ships: its most frequent tokens, each as a word start ``▁text`` and as a
piece inside a word, and every printable ASCII character (so no text falls to ``<unk>``), each scored by the log
of a Zipf estimate from its BPE merge rank. It tokenizes English prompts into words and pieces as a T5 tokenizer
does, but its ids are not those of a real T5: only the tiny stacks use it; a real SD3 / FLUX folder brings its
own ``tokenizer_3`` / ``tokenizer_2``.
"""

from __future__ import annotations

import math
import string
from functools import lru_cache

from transformers import T5Tokenizer

SPECIALS = ("<pad>", "</s>", "<unk>")
WORD_MARK = "\u2581"  # "▁": SentencePiece's word-start marker


def _clip_ranked_tokens() -> list[str]:
    """The CLIP BPE tokens in merge order (most frequent first), the 256 bare byte tokens skipped."""
    from sage_lightning.models.tokenizer import clip_tokenizer

    vocab = clip_tokenizer().get_vocab()
    return [token for token, index in sorted(vocab.items(), key=lambda kv: kv[1]) if index >= 256]


def unigram_vocabulary(size: int = 2000) -> list[tuple[str, float]]:
    """``size`` ``(piece, log-probability)`` pairs: the specials, ``▁`` and the printable ASCII characters,
    then each of CLIP's tokens as a word start (``▁text``) and as a piece inside a word, in rank order.
    Deterministic."""
    characters = [c for c in string.printable if not c.isspace()]
    pieces: list[tuple[str, float]] = [(s, 0.0) for s in SPECIALS] + [(WORD_MARK, -8.0)]
    pieces += [(c, -12.0) for c in characters]  # any text is covered, by single characters at worst
    seen = {p for p, _ in pieces}
    texts = [t.removesuffix("</w>") for t in _clip_ranked_tokens()]
    texts = [t for t in texts if t.isascii() and t.isalpha()]
    for rank, text in enumerate(texts):  # a word start and a piece inside a word, both at the token's rank
        for piece in (WORD_MARK + text, text):
            if piece not in seen and len(pieces) < size:
                seen.add(piece)
                pieces.append((piece, -math.log(rank + 10.0)))
    return pieces


@lru_cache(maxsize=2)
def t5_tokenizer(size: int = 2000, max_length: int = 512) -> T5Tokenizer:
    """The offline T5 tokenizer of ``size`` pieces (no sentinel ids), ``model_max_length`` = ``max_length``."""
    return T5Tokenizer(vocab=unigram_vocabulary(size), extra_ids=0, model_max_length=max_length)
