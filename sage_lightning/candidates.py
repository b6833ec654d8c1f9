"""Candidate-word sources of prompt search: what may be appended next to a prompt (METHOD.md).

A source proposes whole next words for the prompt so far, best first, with a score (the language
model's probability of the word; uniform for a word list). Prompt search then keeps the candidates that
:class:`WordFilter` accepts and snaps its adversarial slot to the nearest of them.

* :class:`CausalLMCandidates`: any Hugging Face ``AutoModelForCausalLM`` + tokenizer (GPT-2 for Stable
  Diffusion, ``"shapesworld"`` for ShapesWorld's own tiny LM). Never ``trust_remote_code``.
* :class:`WordListCandidates`: a fixed list of words (ablations, tests).
* :class:`WordFrequencyCandidates`: the most frequent words of a natural language, from the frequency lists
  the ``wordfreq`` package ships (no download): candidates that can say what the world's own caption LM
  never proposes (issue 20: ShapesWorld's LM only continues its caption grammar).

Whole words: a proposal is the text the LM writes from a token that starts a new word up to the next
word boundary (greedy completion of each top first token, at most ``max_word_tokens`` tokens), and must
be one run of ASCII letters. The diffusion model's CLIP tokenizer decides the rest (:class:`WordFilter`):
by default a candidate must be **one CLIP token** (the slot [x] is one token wide, so "nearest token
embedding" is exact); ``multi_token="mean"`` keeps multi-token words and compares them by the mean of
their token embeddings. Class names, their plurals and configured synonyms are never candidates.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from sage_lightning.errors import SageError
from sage_lightning.models import check_lm_source, load_causal_lm


@dataclass(frozen=True)
class Candidate:
    """One proposed next word and its score (probability under the source; higher is better)."""

    word: str
    score: float


def is_whole_word(word: str) -> bool:
    """One run of printable ASCII letters (no spaces, digits, punctuation or special tokens)."""
    return bool(word) and word.isascii() and word.isalpha()


class CandidateSource:
    """Proposes whole next words for a prompt. Subclasses implement :meth:`propose`."""

    def propose(self, prompt: str) -> list[Candidate]:
        """Whole next words for ``prompt``, best first, without duplicates."""
        raise NotImplementedError


class WordListCandidates(CandidateSource):
    """The same fixed words after every prompt (uniform scores), e.g. for ablations.

    Example::

        WordListCandidates(["on", "a", "red", "blue", "background"])
    """

    def __init__(self, words: Sequence[str]) -> None:
        words = list(dict.fromkeys(str(w).strip() for w in words))
        if not words:
            raise SageError("WordListCandidates has no words: give at least one word")
        bad = [w for w in words if not is_whole_word(w)]
        if bad:
            raise SageError(f"WordListCandidates: {bad[:5]} are not whole words (letters only, one word each)")
        self.words = words

    def propose(self, prompt: str) -> list[Candidate]:
        return [Candidate(w, 1.0 / len(self.words)) for w in self.words]


class WordFrequencyCandidates(CandidateSource):
    """The ``top_n`` most frequent whole words of ``language`` (``wordfreq.top_n_list``), scored by frequency.

    Args:
        top_n: how many of the most frequent words to draw from (before the whole-word and length filters).
        language: a ``wordfreq`` language code.
        min_length: shorter words are dropped ("a", "of": grammar, not content).

    Example::

        WordFrequencyCandidates(top_n=5000)   # "the", "people", "water", "music", ... for every prompt
    """

    def __init__(self, top_n: int = 5000, language: str = "en", min_length: int = 3) -> None:
        if top_n < 1:
            raise SageError(f"top_n={top_n} must be at least 1")
        try:
            import wordfreq
        except ImportError as err:
            raise SageError("WordFrequencyCandidates needs the wordfreq package: pip install wordfreq") from err
        if language not in wordfreq.available_languages():
            raise SageError(f"wordfreq has no language {language!r}: use e.g. 'en'")
        words = [w for w in wordfreq.top_n_list(language, top_n) if is_whole_word(w) and len(w) >= min_length]
        if not words:
            raise SageError(f"no whole word of at least {min_length} letters among wordfreq's top {top_n}")
        self.candidates = [Candidate(w, float(wordfreq.word_frequency(w, language))) for w in words]

    def propose(self, prompt: str) -> list[Candidate]:
        return list(self.candidates)


class CausalLMCandidates(CandidateSource):
    """Next words proposed by a causal language model (SAGE's "language model proposes natural words").

    Args:
        model_name_or_path: a hub id (``gpt2``), a local folder, or ``"shapesworld"`` (the world's LM).
        top_k: first tokens considered per proposal (the most probable ones).
        min_prob: proposals whose first-token probability is below this are dropped (junk words).
        max_word_tokens: LM tokens at most per word (longer completions are dropped).
        local_files_only: never touch the network (loading fails clearly if the weights are not cached).
        device: where the LM runs (``cpu`` by default: it is small next to the diffusion model).

    The LM and its tokenizer load on first use; ``trust_remote_code`` is never set.
    """

    def __init__(
        self,
        model_name_or_path: str = "gpt2",
        top_k: int = 20,
        min_prob: float = 1e-3,
        max_word_tokens: int = 4,
        local_files_only: bool = False,
        device: str = "cpu",
    ) -> None:
        if top_k < 1:
            raise SageError(f"CausalLMCandidates top_k={top_k} must be at least 1")
        if not 0.0 <= min_prob < 1.0:
            raise SageError(f"CausalLMCandidates min_prob={min_prob} must be in [0, 1)")
        if max_word_tokens < 1:
            raise SageError(f"CausalLMCandidates max_word_tokens={max_word_tokens} must be at least 1")
        self.source = model_name_or_path
        self.top_k, self.min_prob, self.max_word_tokens = top_k, min_prob, max_word_tokens
        self.local_files_only, self.device = local_files_only, device
        check_lm_source(model_name_or_path)  # a missing folder is named now, before anything loads
        self._model = self._tokenizer = None

    def load(self) -> None:
        """The language model and its tokenizer, through ``models.load_causal_lm`` (the one door to weights)."""
        if self._model is not None:
            return
        self._tokenizer, self._model = load_causal_lm(self.source, self.local_files_only, self.device)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _starts_word(self, before: list[int], token: int) -> bool:
        """Whether ``token`` begins a new word after ``before`` (the text grows by whitespace first)."""
        old, new = self._decode(before).rstrip(), self._decode([*before, token])
        grown = new[len(old) :] if new.startswith(old) else new
        return grown[:1].isspace() or (bool(grown) and not grown[:1].isalnum())

    @torch.no_grad()
    def _logits(self, sequences: list[list[int]]) -> torch.Tensor:
        ids = torch.tensor(sequences, device=self.device)
        return self._model(input_ids=ids).logits[:, -1].float().cpu()

    @torch.no_grad()
    def propose(self, prompt: str) -> list[Candidate]:
        self.load()
        tok = self._tokenizer
        specials = set(tok.all_special_ids)
        base = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + list(
            tok(prompt, add_special_tokens=False).input_ids
        )
        probs = self._logits([base])[0].softmax(-1)
        top = probs.topk(min(self.top_k, probs.numel()))
        firsts = [
            (int(t), float(p))
            for p, t in zip(top.values.tolist(), top.indices.tolist(), strict=True)
            if p >= self.min_prob and int(t) not in specials and self._starts_word(base, int(t))
        ]
        # Complete every first token greedily, all in one batch per extra token, to the next word boundary.
        seqs = [[t] for t, _ in firsts]
        done = [False] * len(seqs)
        for _ in range(self.max_word_tokens):
            open_rows = [i for i, d in enumerate(done) if not d]
            if not open_rows:
                break
            nxt = self._logits([base + seqs[i] for i in open_rows]).argmax(-1).tolist()
            for i, token in zip(open_rows, nxt, strict=True):
                if token in specials or self._starts_word(base + seqs[i], token):
                    done[i] = True
                elif len(seqs[i]) < self.max_word_tokens:
                    seqs[i].append(token)
                else:
                    done[i] = None  # longer than max_word_tokens: dropped
        out: dict[str, Candidate] = {}
        for (_, p), seq, finished in zip(firsts, seqs, done, strict=True):
            if finished is not True:
                continue
            word = self._decode([*base, *seq])[len(self._decode(base).rstrip()) :].strip()
            if is_whole_word(word) and word not in out:
                out[word] = Candidate(word, p)
        return list(out.values())


class WordFilter:
    """Which proposals may enter the prompt, and their token embeddings in the text encoder's space.

    Args:
        tokenizer: the diffusion model's CLIP tokenizer, or a list of tokenizers (SD3 / FLUX: CLIP's and T5's,
            the prompt encoder's ``word_tokenizers``): ids are the first one's, ``drop`` asks one token of each.
        excluded: words never allowed (the class's names and synonyms); their plurals (+s, +es) and each
            word of a multi-word name are excluded too, and so is every word that begins with the stem of one
            of them (:func:`stem`: its first ``max(4, len - 2)`` letters, so "circular" for circle, "triangular"
            for triangle, "hexagonal" for hexagon): the rule for class lists without a synonym table.
        excluded_whole: names never allowed as a whole (other classes' names and synonyms) and their
            plurals; the words inside a multi-word name stay allowed ("great" of "great white shark").
        multi_token: ``"drop"`` (a candidate must be one CLIP token) or ``"mean"`` (multi-token words are
            kept, embedded as the mean of their tokens).
    """

    def __init__(
        self, tokenizer, excluded: Iterable[str] = (), multi_token: str = "drop", excluded_whole: Iterable[str] = ()
    ) -> None:
        if multi_token not in ("drop", "mean"):
            raise SageError(f"multi_token={multi_token!r}: use 'drop' or 'mean'")
        self.tokenizers = list(tokenizer) if isinstance(tokenizer, list | tuple) else [tokenizer]
        self.tokenizer, self.multi_token = self.tokenizers[0], multi_token
        excluded = list(excluded)
        self.excluded = {f.lower() for w in excluded for f in _forms(w)}
        self.excluded |= {f.lower() for w in excluded_whole for f in _forms(w)[:3]}
        self.stems = tuple(sorted({stem(w) for w in excluded for w in w.split() if len(w) >= 4}))

    def token_ids(self, word: str, tokenizer=None) -> list[int]:
        """``word``'s ids in ``tokenizer`` (default: the first), no special tokens."""
        return list((tokenizer or self.tokenizer)(word, add_special_tokens=False).input_ids)

    def one_token_each(self, word: str) -> bool:
        """Whether ``word`` is one token in every tokenizer after the first (the first is checked by ``accept``)."""
        return all(len(self.token_ids(word, t)) == 1 for t in self.tokenizers[1:])

    def accept(self, candidates: Iterable[Candidate]) -> list[tuple[Candidate, list[int]]]:
        """Accepted candidates (order kept) with their CLIP token ids."""
        kept = []
        for c in candidates:
            if not is_whole_word(c.word) or c.word.lower() in self.excluded or c.word.lower().startswith(self.stems):
                continue
            ids = self.token_ids(c.word)
            if ids and ((len(ids) == 1 and self.one_token_each(c.word)) or self.multi_token == "mean"):
                kept.append((c, ids))
        return kept


def stem(word: str) -> str:
    """The beginning of ``word`` that its inflections and adjectives share: its first ``max(4, len - 2)`` letters,
    lower case ("circle" -> "circ", "triangle" -> "triang", "star" -> "star")."""
    word = word.strip().lower()
    return word[: max(4, len(word) - 2)]


def _forms(word: str) -> list[str]:
    word = word.strip()
    return [word, word + "s", word + "es"] + word.split()


def nearest(query: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Indices of ``embeddings [C, D]`` ordered by cosine similarity to ``query [D]``, nearest first.

    Ties keep the candidates' order (stable sort), so the result is deterministic.
    """
    sims = torch.nn.functional.cosine_similarity(embeddings.float(), query.float().view(1, -1), dim=-1)
    return torch.sort(-sims, stable=True).indices
