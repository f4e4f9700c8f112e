"""Spell correction: SymSpell candidates ranked by a noisy-channel model with a word
bigram language model of the domain.

For each word that is not known (known: in the domain vocabulary, or among English words
at least ``min_english_count`` frequent in the dictionary shipped with ``symspellpy``)
SymSpell proposes the dictionary words within ``max_edit`` edits (Damerau–Levenshtein;
one more for words longer than ``long_word``); the ``candidates`` best by
channel × prior are kept. A Viterbi pass over the sentence picks, per word, the
candidate w maximising

    log P(w | previous word) − edit_cost · distance(typed, w)            (noisy channel)

with an interpolated bigram model of the vocabulary texts,
P(w | v) = (1 − λ) c(v, w) / c(v) + λ P₁(w), and P₁ a mix of the domain's and English
unigram frequencies. Known words are kept as typed (a synonym is not a typo); rare
dictionary words compete with their neighbours, themselves included at distance 0.
Words in other scripts are kept; surrounding punctuation is kept; the first word keeps
its capital.

Reconstruction (ReEx names "spell correction" only as a fallback): the bigram context
and the channel weight are qshift's choices, because character noise at severity 5
leaves several dictionary words within two edits of most tokens and only the context
separates them (measured on the COCO dev split, bench/results/refine.md). Without a
vocabulary the corrector is plain English SymSpell (``context`` then uses English
unigrams only).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from qshift.io import stable_hash

WORD = re.compile(r"^([^\w]*)(.*?)([.,!?;:\"')\]]*)$", re.S)
BOS = "<s>"


_BUILT: dict[str, tuple[Any, dict[str, float]]] = {}
_ENGLISH: dict[str, int] = {}


def _english_dictionary() -> Path:
    import symspellpy

    return Path(symspellpy.__file__).parent / "frequency_dictionary_en_82_765.txt"


def _english_counts() -> dict[str, int]:
    """The English word frequencies shipped with symspellpy (read once)."""
    if not _ENGLISH:
        with open(_english_dictionary(), encoding="utf-8") as fh:
            for line in fh:
                w, _, c = line.rstrip("\n").partition(" ")
                _ENGLISH[w] = int(c)
    return _ENGLISH


class SpellRepairer:
    """``repair(texts) -> texts`` with a domain-aware noisy-channel spell corrector."""

    name = "spell"

    def __init__(self, vocabulary: Sequence[str] | None = None, *, english: bool = True, max_edit: int = 2,
                 long_word: int = 7, edit_cost: float = 2.5, interpolation: float = 0.4, domain_weight: float = 0.8,
                 context: bool = True, candidates: int = 12, min_english_count: int = 1_000_000) -> None:
        from symspellpy import SymSpell

        self.max_edit, self.long_word, self.edit_cost = int(max_edit), int(long_word), float(edit_cost)
        self.interpolation, self.context, self.candidates = float(interpolation), bool(context), int(candidates)
        self.min_english_count = int(min_english_count)
        texts = list(vocabulary or [])
        sentences = [self.words(t) for t in texts]
        self.domain = Counter(w for ws in sentences for w in ws)
        self.bigrams = Counter(p for ws in sentences for p in zip([BOS, *ws], ws))
        self.left = Counter()
        for (v, _), c in self.bigrams.items():
            self.left[v] += c
        vocab_hash = stable_hash(sorted(self.domain.items()))
        self.identity = stable_hash({"backend": "spell", "vocab": vocab_hash,
                                     "english": english, "max_edit": max_edit, "long_word": long_word,
                                     "edit_cost": edit_cost, "interpolation": interpolation,
                                     "domain_weight": domain_weight, "context": context, "candidates": candidates,
                                     "min_english_count": min_english_count})
        self.english = _english_counts() if english else {}
        key = stable_hash([vocab_hash, english, domain_weight, max_edit])
        if key not in _BUILT:  # the dictionary build takes seconds: once per process and setting
            total_en = sum(self.english.values()) or 1
            total_dom = sum(self.domain.values()) or 1
            w_dom = domain_weight if self.domain else 0.0
            w_en = 1.0 - w_dom if self.english else 0.0
            unigram = {w: w_dom * self.domain.get(w, 0) / total_dom + w_en * self.english.get(w, 0) / total_en
                       for w in set(self.domain) | set(self.english)}
            sym = SymSpell(max_dictionary_edit_distance=self.max_edit + 1, prefix_length=7)
            for w, p in unigram.items():
                sym.create_dictionary_entry(w, max(1, int(p * 1e9)))
            if len(_BUILT) >= 4:
                _BUILT.pop(next(iter(_BUILT)))
            _BUILT[key] = (sym, unigram)
        self.sym, self.unigram = _BUILT[key]

    @staticmethod
    def words(text: str) -> list[str]:
        return [w for w in (WORD.match(tok).group(2).lower() for tok in text.split()) if w]

    def known(self, word: str) -> bool:
        return word in self.domain or self.english.get(word, 0) >= self.min_english_count

    def log_p(self, word: str, prev: str) -> float:
        uni = self.unigram.get(word, 1e-10)
        if not self.context or prev is None or self.left.get(prev, 0) == 0:
            return math.log(uni)
        big = self.bigrams.get((prev, word), 0) / self.left[prev]
        return math.log((1 - self.interpolation) * big + self.interpolation * uni)

    def candidates_of(self, word: str) -> list[tuple[str, int]]:
        letters = [ch for ch in word if ch.isalpha()]
        if not letters or self.known(word) or any(ord(ch) >= 0x250 for ch in letters):
            return [(word, 0)]  # known, no letters, or not in the Latin script: kept as typed
        from symspellpy import Verbosity

        ed = self.max_edit + (1 if len(word) > self.long_word else 0)
        found = self.sym.lookup(word, Verbosity.ALL, max_edit_distance=ed, transfer_casing=False)
        found.sort(key=lambda s: self.edit_cost * s.distance - math.log(self.unigram.get(s.term, 1e-10)))
        out = [(s.term, s.distance) for s in found[: self.candidates]]
        return out or [(word, 0)]  # nothing close: keep the typed word

    def repair_one(self, text: str) -> str:
        tokens = text.split()
        parts = [WORD.match(t).groups() for t in tokens]
        lattice = [self.candidates_of(core.lower()) for _, core, _ in parts]
        # Viterbi over the candidates (state = the word chosen at each position)
        best: list[dict[str, tuple[float, str | None]]] = []
        prev_states: dict[str, tuple[float, str | None]] = {BOS: (0.0, None)}
        for cands in lattice:
            cur: dict[str, tuple[float, str | None]] = {}
            for w, d in cands:
                channel = -self.edit_cost * d
                score, back = max(((s + self.log_p(w, p) + channel, p) for p, (s, _) in prev_states.items()),
                                  key=lambda x: x[0])
                if w not in cur or score > cur[w][0]:
                    cur[w] = (score, back)
            best.append(cur)
            prev_states = cur
        if not best:
            return text
        w = max(best[-1], key=lambda k: best[-1][k][0])
        chosen = []
        for i in range(len(best) - 1, -1, -1):
            chosen.append(w)
            w = best[i][w][1]
        chosen.reverse()
        out = []
        for i, ((lead, core, trail), word) in enumerate(zip(parts, chosen)):
            if word == core.lower():
                out.append(lead + core + trail)
                continue
            if i == 0 and core[:1].isupper():
                word = word[:1].upper() + word[1:]
            out.append(lead + word + trail)
        return " ".join(out)

    def repair(self, texts: Sequence[str]) -> list[str]:
        return [self.repair_one(t) for t in texts]


def spell_repairer(vocabulary: Any = None, **options: Any) -> SpellRepairer:
    from qshift.data.texts import spec_texts

    return SpellRepairer(spec_texts(vocabulary), **options)
