"""ICD-10-CM codes mentioned in free-text notes, with their assertion.

A NegEx-like reading: candidate codes are found by shape (dotted ``E11.9``,
any case; undotted ``E119``/``I10`` upper case only, since lower-case
undotted shapes are mostly ordinary words), kept only if they are real
ICD-10-CM codes, and each mention is assigned

- ``negated``  — a negation cue ("denies", "no evidence of") precedes it,
- ``family``   — a family cue ("family history of", "mother") precedes it,
- ``history``  — a history cue ("history of", "h/o") precedes it,
- ``affirmed`` — otherwise,

looking back at most ``cue_window_words`` words and never across a sentence
end or a scope break ("but", "however", ";"). Negation wins over family and
history ("no family history of I10" is not a finding about anyone).

Note text is never logged or returned; only (code, assertion) pairs leave.
Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from preprocessing.icd import is_valid_icd10cm

AFFIRMED = "affirmed"
NEGATED = "negated"
HISTORY = "history"
FAMILY = "family"
ASSERTIONS = (AFFIRMED, NEGATED, HISTORY, FAMILY)

# Cues that put a mention on a relative rather than the patient. Configured
# history cues that mention "family" are added to these.
FAMILY_CUES: tuple[str, ...] = ("family history of", "family hx of", "fhx of", "fh of", "mother",
                                "father", "brother", "sister", "sibling", "parent", "grandmother",
                                "grandfather", "maternal", "paternal")
# Words that end a cue's scope inside a sentence (NegEx's conjunctions).
SCOPE_BREAKS: tuple[str, ...] = ("but", "however", "although", "though", "except", "yet",
                                 "aside from", "apart from", "which", "whereas")

# Dotted: any case. Undotted: upper case only. Not glued to other letters/digits.
_CODE_RE = re.compile(
    r"(?<![0-9A-Za-z])(?:"
    r"(?P<dotted>[A-Za-z][0-9][0-9A-Za-z]\.[0-9A-Za-z]{1,4})"
    r"|(?P<plain>[A-Z][0-9][0-9A-Z]{1,5})"
    r")(?![0-9A-Za-z])")
# Sentence ends: . ! ? followed by space/end (so "E11.9" is not split), ";" and line breaks.
_SENTENCE_RE = re.compile(r"[.!?](?=\s|$)|;|\n\s*\n|\r?\n(?=\s*[-*\u2022]|\s*[A-Z][A-Za-z ]{0,30}:)")
_WORD_RE = re.compile(r"[A-Za-z0-9/']+(?:[.\-][A-Za-z0-9/']+)*")


def _cue_regex(cues: Iterable[str]) -> re.Pattern[str] | None:
    words = sorted({c.strip().lower() for c in cues if c and c.strip()}, key=len, reverse=True)
    if not words:
        return None
    return re.compile(r"(?<![0-9a-z])(?:" + "|".join(re.escape(w) for w in words) + r")(?![0-9a-z])")


class NoteExtractor:
    """Find (code, assertion) pairs in note text; build once, call per note.

    ``negation_cues``, ``history_cues`` and ``cue_window_words`` normally come
    from ``conf.settings.ExtractionSettings`` (see :meth:`from_settings`).
    """

    def __init__(self, negation_cues: Sequence[str], history_cues: Sequence[str],
                 cue_window_words: int = 6, family_cues: Sequence[str] = FAMILY_CUES,
                 scope_breaks: Sequence[str] = SCOPE_BREAKS) -> None:
        if cue_window_words < 1:
            raise ValueError(f"cue_window_words must be at least 1, got {cue_window_words}")
        family = list(family_cues) + [c for c in history_cues if "family" in c.lower()]
        history = [c for c in history_cues if "family" not in c.lower()]
        self.window_words = cue_window_words
        self._neg = _cue_regex(negation_cues)
        self._hist = _cue_regex(history)
        self._fam = _cue_regex(family)
        self._break = _cue_regex(scope_breaks)

    @classmethod
    def from_settings(cls, extraction: object) -> "NoteExtractor":
        """Build from an ``ExtractionSettings`` (anything with the three cue attributes)."""
        return cls(negation_cues=list(getattr(extraction, "negation_cues")),
                   history_cues=list(getattr(extraction, "history_cues")),
                   cue_window_words=int(getattr(extraction, "cue_window_words")))

    def __call__(self, text: str | None) -> list[tuple[str, str]]:
        """Distinct (code, assertion) pairs in order of first mention; [] for empty text."""
        if not text:
            return []
        out: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for sentence in _sentences(text):
            for m in _CODE_RE.finditer(sentence):
                code = _canonical(m)
                if code is None or not is_valid_icd10cm(code):
                    continue
                pair = (code, self._assertion(sentence[:m.start()]))
                if pair not in seen:
                    seen.add(pair)
                    out.append(pair)
        return out

    def _assertion(self, before: str) -> str:
        low = before.lower()
        if self._break is not None:
            last = None
            for last in self._break.finditer(low):
                pass
            if last is not None:
                low = low[last.end():]
        words = _WORD_RE.findall(low)
        window = " ".join(words[-self.window_words:])
        if self._neg is not None and self._neg.search(window):
            return NEGATED
        if self._fam is not None and self._fam.search(window):
            return FAMILY
        if self._hist is not None and self._hist.search(window):
            return HISTORY
        return AFFIRMED


def _sentences(text: str) -> list[str]:
    parts, start = [], 0
    for m in _SENTENCE_RE.finditer(text):
        parts.append(text[start:m.start()])
        start = m.end()
    parts.append(text[start:])
    return parts


def _canonical(m: re.Match[str]) -> str | None:
    if m.group("dotted"):
        return m.group("dotted").upper()
    plain = m.group("plain")
    return plain if len(plain) == 3 else f"{plain[:3]}.{plain[3:]}"


def extract_codes(text: str | None, negation_cues: Sequence[str], history_cues: Sequence[str],
                  cue_window_words: int = 6) -> list[tuple[str, str]]:
    """ICD-10-CM codes in ``text`` with assertion affirmed | negated | history | family.

    Convenience wrapper; for many notes build one :class:`NoteExtractor` and reuse it.
    """
    return NoteExtractor(negation_cues, history_cues, cue_window_words)(text)
