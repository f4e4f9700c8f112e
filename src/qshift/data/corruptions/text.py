"""Text query corruptions in the style of the COCO-C / Flickr-C text benchmarks.

Sixteen types at severities 1–5, as listed by those benchmarks (Qiu et al., "Benchmarking
robustness of multimodal image-text models under distribution shift"):

* character (nlpaug, whose keyboard/OCR tables ship with it): ``keyboard``, ``ocr``,
  ``char_insert``, ``char_substitute``, ``char_swap``, ``char_delete`` — a share
  ``0.05 × severity`` of the words is altered (``aug_word_p``), as in the benchmarks;
* word (EDA, Wei & Zou 2019, with α = 0.05 × severity; at least one edit):
  ``synonym_replace`` (WordNet), ``word_insert`` (a synonym of a random word inserted
  at a random place), ``word_swap``, ``word_delete`` (each word dropped with prob. α),
  ``punct_insert`` (AEDA-style punctuation marks);
* sentence: ``formal``, ``casual``, ``passive``, ``active``, ``back_translation``.
  The benchmarks used Styleformer and WMT19 models from a model hub; qshift has no hub,
  so these are **rule-based** rewrites (lexicon substitutions, contractions, voice
  changes of the caption patterns "NP V-ing NP" / "NP is V-ing NP" / verbless NPs, and
  a synonym-and-reorder paraphrase as the back-translation stand-in). Each optional
  rewrite fires with probability 0.2 × severity. The local-LLM paraphraser in
  :mod:`qshift.llm` can replace them (``generator="llm"``); results record which
  generator made each set.

Word- and sentence-level outputs can be re-drawn until a sentence encoder scores them
≥ ``min_similarity`` cosine to the original (the benchmarks' 0.9 filter), keeping the
closest draw. Every draw is seeded by (seed, type, severity, index, attempt).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from qshift.errors import InputError

SEVERITIES = (1, 2, 3, 4, 5)
CHAR = ("keyboard", "ocr", "char_insert", "char_substitute", "char_swap", "char_delete")
WORD = ("synonym_replace", "word_insert", "word_swap", "word_delete", "punct_insert")
SENTENCE = ("formal", "casual", "passive", "active", "back_translation")
TEXT_CORRUPTIONS = CHAR + WORD + SENTENCE
LEVEL = {**{c: "character" for c in CHAR}, **{c: "word" for c in WORD}, **{c: "sentence" for c in SENTENCE}}
STOPWORDS = frozenset("""a an the of in on at to and or is are was were be been being with by for from
that this these those it its there their his her he she they them as into over under near next up down
out off some any each other""".split())


def check_corruption(name: str, severity: int, known: Sequence[str] = TEXT_CORRUPTIONS) -> None:
    if name not in known:
        import difflib

        close = difflib.get_close_matches(name, known, n=3)
        raise InputError(f"unknown corruption {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else "")
                         + f"; known: {', '.join(known)}")
    if severity not in SEVERITIES:
        raise InputError(f"severity must be an integer 1–5, got {severity!r}")


# -- character level (nlpaug) ----------------------------------------------------------------
_NLPAUG: dict[tuple[str, int], object] = {}


def _char_aug(name: str, severity: int):  # noqa: ANN202 - an nlpaug augmenter
    key = (name, severity)
    if key not in _NLPAUG:
        import nlpaug.augmenter.char as nac

        p = 0.05 * severity
        if name == "keyboard":
            aug = nac.KeyboardAug(aug_word_p=p, include_special_char=False, include_numeric=False)
        elif name == "ocr":
            aug = nac.OcrAug(aug_word_p=p)
        else:
            aug = nac.RandomCharAug(action=name.removeprefix("char_"), aug_word_p=p, include_numeric=False)
        _NLPAUG[key] = aug
    return _NLPAUG[key]


def _character(name: str) -> Callable[[str, int, random.Random], str]:
    def fn(text: str, severity: int, rng: random.Random) -> str:
        seed = rng.randrange(2**31)
        random.seed(seed)  # nlpaug draws from the global generators
        np.random.seed(seed)
        out = _char_aug(name, severity).augment(text)
        return out[0] if isinstance(out, list) else out
    return fn


# -- word level (EDA / AEDA) -----------------------------------------------------------------
_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _n_edits(words: list[str], severity: int) -> int:
    return max(1, int(0.05 * severity * len(words)))


def _synonym_choices(word: str) -> tuple[str, ...]:
    from qshift.data.wordnet import synonyms

    return synonyms(word) if word.lower() not in STOPWORDS else ()


def synonym_replace(text: str, severity: int, rng: random.Random) -> str:
    words = text.split()
    candidates = [i for i, w in enumerate(words) if _WORD_RE.fullmatch(w.strip(string.punctuation))
                  and _synonym_choices(w.strip(string.punctuation))]
    rng.shuffle(candidates)
    for i in candidates[:_n_edits(words, severity)]:
        core = words[i].strip(string.punctuation)
        words[i] = words[i].replace(core, rng.choice(_synonym_choices(core)))
    return " ".join(words)


def word_insert(text: str, severity: int, rng: random.Random) -> str:
    words = text.split()
    for _ in range(_n_edits(words, severity)):
        pool = [w.strip(string.punctuation) for w in words if _synonym_choices(w.strip(string.punctuation))]
        if not pool:
            break
        words.insert(rng.randrange(len(words) + 1), rng.choice(_synonym_choices(rng.choice(pool))))
    return " ".join(words)


def word_swap(text: str, severity: int, rng: random.Random) -> str:
    words = text.split()
    if len(words) < 2:
        return text
    for _ in range(_n_edits(words, severity)):
        i, j = rng.sample(range(len(words)), 2)
        words[i], words[j] = words[j], words[i]
    return " ".join(words)


def word_delete(text: str, severity: int, rng: random.Random) -> str:
    words = text.split()
    if len(words) <= 1:
        return text
    p = 0.05 * severity
    kept = [w for w in words if rng.random() > p]
    if len(kept) == len(words):  # at least one edit, as EDA's n >= 1
        kept.pop(rng.randrange(len(kept)))
    return " ".join(kept) if kept else rng.choice(words)


PUNCT = (".", ";", "?", ":", "!", ",")


def punct_insert(text: str, severity: int, rng: random.Random) -> str:
    words = text.split()
    for _ in range(_n_edits(words, severity)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(PUNCT))
    return " ".join(words)


# -- sentence level (rule-based) ------------------------------------------------------------
FORMAL = {"kid": "child", "kids": "children", "guy": "man", "guys": "men", "pic": "picture", "photo": "photograph",
          "big": "large", "huge": "very large", "tiny": "very small", "little": "small", "lots of": "many",
          "a lot of": "numerous", "bunch of": "group of", "bike": "bicycle", "tv": "television",
          "fridge": "refrigerator", "mom": "mother", "dad": "father", "cop": "police officer", "got": "has",
          "really": "truly", "next to": "adjacent to", "near": "in proximity to", "shows": "depicts",
          "show": "depict", "looks like": "resembles", "get": "obtain", "around": "approximately",
          "on top of": "upon", "dog": "canine", "phone": "telephone", "plane": "aircraft", "cat": "feline"}
CASUAL = {"child": "kid", "children": "kids", "man": "guy", "men": "guys", "picture": "pic", "image": "pic",
          "photograph": "photo", "large": "big", "small": "little", "many": "lots of", "several": "a bunch of",
          "bicycle": "bike", "television": "tv", "refrigerator": "fridge", "very": "super", "shows": "has",
          "depicts": "shows", "is": "'s", "there is": "there's", "it is": "it's", "going to": "gonna",
          "want to": "wanna", "person": "dude", "people": "folks", "some": "a few"}
CONTRACTIONS = {"there's": "there is", "it's": "it is", "that's": "that is", "he's": "he is", "she's": "she is",
                "they're": "they are", "we're": "we are", "isn't": "is not", "aren't": "are not",
                "don't": "do not", "doesn't": "does not", "can't": "cannot", "won't": "will not",
                "gonna": "going to", "wanna": "want to"}
FILLERS = ("like", "kinda", "basically", "just", "so")
CASUAL_TAILS = (" lol", " haha", " ngl", " tbh", "!!", " :)")
FORMAL_FRAMES = ("This image depicts {}.", "The photograph shows {}.", "Depicted here is {}.",
                 "One can observe {}.")
IRREGULAR_PP = {"ride": "ridden", "eat": "eaten", "hold": "held", "throw": "thrown", "fly": "flown",
                "drive": "driven", "take": "taken", "sit": "sat", "stand": "stood", "lie": "lain",
                "catch": "caught", "hit": "hit", "cut": "cut", "put": "put", "make": "made", "read": "read",
                "swing": "swung", "bring": "brought", "carry": "carried", "wear": "worn", "feed": "fed",
                "build": "built", "hang": "hung", "keep": "kept", "lead": "led", "leave": "left",
                "show": "shown", "give": "given", "see": "seen", "write": "written", "draw": "drawn",
                "grow": "grown", "blow": "blown", "break": "broken", "shake": "shaken", "steal": "stolen",
                "sell": "sold", "buy": "bought", "have": "had", "get": "gotten", "do": "done", "go": "gone",
                "run": "run", "win": "won", "hold up": "held up", "light": "lit", "spin": "spun",
                "sweep": "swept", "shoot": "shot", "split": "split", "set": "set", "let": "let"}
THIRD_PERSON = {"have": "has", "do": "does", "go": "goes", "be": "is"}
DETERMINERS = ("a", "an", "the", "two", "three", "four", "some", "several", "many", "his", "her", "their", "its")
VERBLESS_PASSIVE = ("{} is shown", "{} can be seen", "{} is depicted in the picture", "{} is pictured here")
VERBLESS_ACTIVE = ("the picture shows {}", "we can see {}", "someone photographed {}", "the image contains {}")


def _apply_lexicon(text: str, lexicon: dict[str, str], p: float, rng: random.Random) -> str:
    for src in sorted(lexicon, key=len, reverse=True):
        pattern = re.compile(rf"(?<![\w']){re.escape(src)}(?![\w'])", re.IGNORECASE)
        text = pattern.sub(lambda m: lexicon[src] if rng.random() < p else m.group(0), text)
    return text


def _lemma_verb(word: str) -> str | None:
    from qshift.data.wordnet import wordnet

    return wordnet().morphy(word.lower(), "v")


def _past_participle(verb: str) -> str:
    if verb in IRREGULAR_PP:
        return IRREGULAR_PP[verb]
    if verb.endswith("e"):
        return verb + "d"
    if re.fullmatch(r".*[^aeiou]y", verb):
        return verb[:-1] + "ied"
    if re.fullmatch(r"[^aeiou]*[aeiou][^aeiouwxy]", verb):  # one-syllable CVC: stop -> stopped
        return verb + verb[-1] + "ed"
    return verb + "ed"


def _third_person(verb: str) -> str:
    if verb in THIRD_PERSON:
        return THIRD_PERSON[verb]
    if re.fullmatch(r".*(s|sh|ch|x|z|o)", verb):
        return verb + "es"
    if re.fullmatch(r".*[^aeiou]y", verb):
        return verb[:-1] + "ies"
    return verb + "s"


def _split_caption(text: str) -> tuple[str, str]:
    body = text.strip()
    end = body[-1] if body and body[-1] in ".!?" else ""
    return (body[:-1] if end else body).strip(), end


def _find_gerund(words: list[str]) -> int | None:
    """Index of a '-ing' verb that has a subject before it and an object after it."""
    for i, w in enumerate(words[1:-1], start=1):
        lw = w.lower().strip(string.punctuation)
        if lw.endswith("ing") and len(lw) > 4 and _lemma_verb(lw) and words[i + 1].lower() in DETERMINERS:
            return i
    return None


def _object_span(words: list[str], start: int) -> int:
    """End (exclusive) of the noun phrase starting at ``start``: up to a preposition or clause break."""
    stops = {"in", "on", "at", "with", "near", "next", "by", "while", "and", "under", "over", "behind",
             "beside", "from", "into", "through", "across", "along", "to", "down", "up", "outside", "inside"}
    end = start + 1
    while end < len(words) and words[end].lower() not in stops and not words[end - 1].endswith(","):
        end += 1
    return end


def _has_finite_verb(words: list[str]) -> bool:
    return any(w.lower() in ("is", "are", "was", "were", "has", "have") for w in words)


def _cap(s: str, like: str) -> str:
    return s[:1].upper() + s[1:] if like[:1].isupper() else s[:1].lower() + s[1:]


def passive(text: str, severity: int, rng: random.Random) -> str:
    body, end = _split_caption(text)
    words = body.split()
    aux = next((i for i, w in enumerate(words[1:-1], 1) if w.lower() in ("is", "are")
                and words[i + 1].lower().endswith("ing") and _lemma_verb(words[i + 1])), None)
    g = aux + 1 if aux is not None else _find_gerund(words)
    if g is not None and g + 1 < len(words) and words[g + 1].lower() in DETERMINERS:
        verb = _lemma_verb(words[g].strip(string.punctuation)) or words[g]
        subj = " ".join(words[:aux if aux is not None else g])
        oend = _object_span(words, g + 1)
        obj, rest = " ".join(words[g + 1:oend]), " ".join(words[oend:])
        be = ("is" if aux is not None and words[aux].lower() == "is" else "are") + " being" if aux is not None \
            else "being"
        out = f"{obj} {be} {_past_participle(verb)} by {subj[:1].lower() + subj[1:]} {rest}"
        return _cap(out.strip(), body) + end
    if words and words[0].lower() in DETERMINERS and not _has_finite_verb(words):  # verbless: passive frame
        return _cap(rng.choice(VERBLESS_PASSIVE).format(body[:1].lower() + body[1:]), body) + end
    return text


def active(text: str, severity: int, rng: random.Random) -> str:
    body, end = _split_caption(text)
    m = re.match(r"(?P<obj>.+?)\s+(?:(?:is|are)\s+)?(?:being\s+)?(?P<pp>\w+(?:ed|en|wn|ld|ght|ung|ne|t))"
                 r"\s+by\s+(?P<subj>.+)$", body, re.IGNORECASE)
    if m and _lemma_verb(m["pp"]):
        verb = _lemma_verb(m["pp"])
        out = f"{m['subj']} {_third_person(verb)} {m['obj'][:1].lower() + m['obj'][1:]}"
        return _cap(out, body) + end
    words = body.split()
    g = _find_gerund(words)
    if g is not None and rng.random() < 0.5 + 0.1 * severity:  # "a man riding a horse" -> "a man rides a horse"
        verb = _lemma_verb(words[g].strip(string.punctuation)) or words[g]
        prev = words[g - 1].lower()
        if prev in ("is", "are"):  # progressive -> simple present
            plural = prev == "are"
            del words[g - 1]
            g -= 1
        else:
            plural = prev.endswith("s") and not prev.endswith("ss")
        words[g] = verb if plural else _third_person(verb)
        return " ".join(words) + end
    if words and words[0].lower() in DETERMINERS and not _has_finite_verb(words):
        return _cap(rng.choice(VERBLESS_ACTIVE).format(body[:1].lower() + body[1:]), body) + end
    return text


def formal(text: str, severity: int, rng: random.Random) -> str:
    body, _ = _split_caption(_apply_lexicon(text, CONTRACTIONS, 1.0, rng))
    body = _apply_lexicon(body, FORMAL, 0.2 * severity + 0.2, rng)
    if rng.random() < 0.2 * severity and not _has_finite_verb(body.split()):
        return rng.choice(FORMAL_FRAMES).format(body[:1].lower() + body[1:])
    return body[:1].upper() + body[1:] + "."


def casual(text: str, severity: int, rng: random.Random) -> str:
    body, _ = _split_caption(text)
    body = _apply_lexicon(body.lower(), CASUAL, 0.2 * severity + 0.2, rng).replace(" 's", "'s")
    words = body.split()
    for _ in range(max(0, severity - 2)):
        words.insert(rng.randrange(1, len(words) + 1) if len(words) > 1 else 0, rng.choice(FILLERS))
    body = " ".join(words)
    if rng.random() < 0.2 * severity:
        body += rng.choice(CASUAL_TAILS)
    return body


def back_translation(text: str, severity: int, rng: random.Random) -> str:
    """Stand-in for EN→X→EN: content-word synonyms, article drift, clause reordering."""
    body, end = _split_caption(text)
    words = body.split()
    for i, w in enumerate(words):
        core = w.strip(string.punctuation)
        if core.lower() in ("a", "an") and rng.random() < 0.1 * severity:
            words[i] = w.replace(core, "the" if core.islower() else "The")
        elif rng.random() < 0.1 * severity and _synonym_choices(core):
            options = [s for s in _synonym_choices(core) if " " not in s] or list(_synonym_choices(core))
            words[i] = w.replace(core, rng.choice(options[:3]))
    out = " ".join(words)
    parts = re.split(r",\s+|\s+(?=(?:with|next to|near|on top of)\b)", out, maxsplit=1)
    if len(parts) == 2 and rng.random() < 0.15 * severity:  # move the trailing clause to the front
        out = f"{parts[1][:1].upper() + parts[1][1:]}, {parts[0][:1].lower() + parts[0][1:]}"
    return out + end


_FUNCS: dict[str, Callable[[str, int, random.Random], str]] = {
    **{c: _character(c) for c in CHAR},
    "synonym_replace": synonym_replace, "word_insert": word_insert, "word_swap": word_swap,
    "word_delete": word_delete, "punct_insert": punct_insert,
    "formal": formal, "casual": casual, "passive": passive, "active": active, "back_translation": back_translation,
}


def _rng(seed: int, name: str, severity: int, index: int, attempt: int) -> random.Random:
    # str seeds go through SHA-512: stable across processes (unlike hash())
    return random.Random(f"{seed}/{name}/{severity}/{index}/{attempt}")


def corrupt_text(text: str, name: str, severity: int, seed: int = 0, index: int = 0, attempt: int = 0) -> str:
    """One corrupted version of ``text`` (rule-based / nlpaug generators)."""
    check_corruption(name, severity)
    return _FUNCS[name](text, severity, _rng(seed, name, severity, index, attempt)).strip()


@dataclass
class CorruptedTexts:
    texts: list[str]
    name: str
    severity: int
    seed: int
    generator: str
    stats: dict = field(default_factory=dict)


def corrupt_texts(texts: Sequence[str], name: str, severity: int, seed: int = 0, *,
                  min_similarity: float | None = None, encoder=None, max_tries: int = 3,  # noqa: ANN001
                  generator: str = "rule", llm=None) -> CorruptedTexts:  # noqa: ANN001
    """Corrupt every text; empty results keep the original (counted in ``stats``).

    With ``min_similarity`` (and a text ``encoder``), word- and sentence-level outputs
    below that cosine to their original are re-drawn up to ``max_tries`` times; the
    closest draw is kept. ``generator='llm'`` makes sentence-level rewrites with the
    local LLM in :mod:`qshift.llm` (``llm`` = a loaded :class:`qshift.llm.LocalLLM`).
    """
    check_corruption(name, severity)
    texts = list(texts)
    if generator not in ("rule", "llm"):
        raise InputError(f"generator must be 'rule' or 'llm', got {generator!r}")
    use_llm = generator == "llm" and LEVEL[name] == "sentence"
    if use_llm and llm is None:
        from qshift.llm import LocalLLM

        llm = LocalLLM.default()

    def draw(i: int, attempt: int) -> str:
        if use_llm:
            return llm.rewrite(texts[i], style=name, severity=severity, seed=_rng(seed, name, severity, i, attempt).randrange(2**31))
        return corrupt_text(texts[i], name, severity, seed, i, attempt)

    out = [draw(i, 0) for i in range(len(texts))]
    stats = {"empty_kept_original": 0, "unchanged": 0, "redrawn": 0, "below_similarity": 0}
    filtered = min_similarity is not None and LEVEL[name] != "character"
    if filtered:
        if encoder is None:
            raise InputError("min_similarity needs a text encoder (e.g. st:all-MiniLM-L6-v2)")
        base = encoder.encode_text(texts)
        best = out[:]
        best_sim = _cosine(base, encoder.encode_text([t if t.strip() else "-" for t in out]))
        for attempt in range(1, max_tries):
            low = np.flatnonzero(best_sim < min_similarity)
            if low.size == 0:
                break
            stats["redrawn"] += int(low.size)
            cand = [draw(int(i), attempt) for i in low]
            sims = _cosine(base[low], encoder.encode_text([t if t.strip() else "-" for t in cand]))
            for j, i in enumerate(low):
                if sims[j] > best_sim[i]:
                    best[i], best_sim[i] = cand[j], sims[j]
        out = best
        stats["below_similarity"] = int((best_sim < min_similarity).sum())
        stats["mean_similarity"] = float(best_sim.mean()) if len(best_sim) else 1.0
    for i, t in enumerate(out):
        if not t.strip():
            out[i] = texts[i]
            stats["empty_kept_original"] += 1
        elif t == texts[i]:
            stats["unchanged"] += 1
    gen = ("llm:" + llm.name if use_llm else
           {"character": "nlpaug", "word": "eda+wordnet", "sentence": "rule-based"}[LEVEL[name]])
    return CorruptedTexts(out, name, severity, seed, gen, stats)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
