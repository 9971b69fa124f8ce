"""Benchmark: clinical notes per second per core through the notes NLP pipeline.

Measures, in one process over the same notes (CPU time, so per core):

- ``nlp_pipeline``: preprocessing.notes.NoteExtractor (spaCy tokenizer,
  sentences, entity ruler, five negspacy passes, sections), built once, as
  each Spark Python worker builds it; its build time is reported apart;
- the named baseline ``literal_codes``: the extractor it replaced (literal
  ICD-10-CM code shapes, a six-word look-back for negation/history cues),
  kept here only to be measured against.

The notes are the gold set's Synthea-layout notes and clinician-style notes
assembled from its sentences (tests/fixtures/notes/gold_sentences.txt), so
their length and mix of findings is that of the evaluation. Prints one JSON
object last. Usage: ``python bench/notes.py [--notes N] [--seed S]``.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLD = ROOT / "tests" / "fixtures" / "notes" / "gold_sentences.txt"


class LiteralCodeBaseline:
    """The literal-code extractor the pipeline replaced: code shapes + a six-word cue look-back."""

    _CODE = re.compile(r"(?<![0-9A-Za-z])(?:(?P<dotted>[A-Za-z][0-9][0-9A-Za-z]\.[0-9A-Za-z]{1,4})"
                       r"|(?P<plain>[A-Z][0-9][0-9A-Z]{1,5}))(?![0-9A-Za-z])")
    _SENT = re.compile(r"[.!?](?=\s|$)|;|\n\s*\n|\r?\n(?=\s*[-*\u2022]|\s*[A-Z][A-Za-z ]{0,30}:)")
    _WORD = re.compile(r"[A-Za-z0-9/']+(?:[.\-][A-Za-z0-9/']+)*")

    def __init__(self, window_words: int = 6) -> None:
        from preprocessing.icd import is_valid_icd10cm

        def cues(words: Sequence[str]) -> re.Pattern[str]:
            alt = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
            return re.compile(r"(?<![0-9a-z])(?:" + alt + r")(?![0-9a-z])")

        self._valid = is_valid_icd10cm
        self._neg = cues(["no", "denies", "denied", "negative for", "without", "ruled out", "rule out",
                          "free of", "no evidence of", "not"])
        self._hist = cues(["history of", "h/o", "hx of", "past history of"])
        self._fam = cues(["family history of", "family hx of", "fhx of", "fh of", "mother", "father",
                          "brother", "sister", "sibling", "parent", "grandmother", "grandfather",
                          "maternal", "paternal"])
        self._break = cues(["but", "however", "although", "though", "except", "yet", "aside from",
                            "apart from", "which", "whereas"])
        self.window = window_words

    def __call__(self, text: str) -> list[tuple[str, str]]:
        out: dict[tuple[str, str], None] = {}
        start = 0
        bounds = [m for m in self._SENT.finditer(text)]
        parts = []
        for m in bounds:
            parts.append(text[start:m.start()])
            start = m.end()
        parts.append(text[start:])
        for sentence in parts:
            for m in self._CODE.finditer(sentence):
                plain = m.group("plain")
                code = m.group("dotted").upper() if m.group("dotted") else \
                    plain if len(plain) == 3 else f"{plain[:3]}.{plain[3:]}"
                if not self._valid(code):
                    continue
                low = sentence[:m.start()].lower()
                last = None
                for last in self._break.finditer(low):
                    pass
                if last is not None:
                    low = low[last.end():]
                window = " ".join(self._WORD.findall(low)[-self.window:])
                a = ("negated" if self._neg.search(window) else "family" if self._fam.search(window)
                     else "history" if self._hist.search(window) else "affirmed")
                out.setdefault((code, a), None)
        return list(out)


def make_notes(n: int, seed: int) -> list[str]:
    """``n`` notes: the gold set's Synthea-layout notes and notes of 6-14 of its sentences under headers."""
    from preprocessing.notes_evaluation import read_gold

    items = read_gold(GOLD)
    synthea = [i.text for i in items if "# Assessment and Plan" in i.text]
    sentences = [i.text for i in items if "\n" not in i.text]
    rng = random.Random(seed)
    notes = []
    for k in range(n):
        if k % 2 == 0:
            notes.append(synthea[k // 2 % len(synthea)])
        else:
            body = rng.sample(sentences, rng.randint(6, 14))
            cut = len(body) // 2
            notes.append("HPI: " + " ".join(body[:cut]) + "\n\nAssessment and Plan:\n"
                         + "\n".join(f"- {s}" for s in body[cut:]))
    return notes


def _rate(fn, notes: list[str]) -> tuple[float, int]:
    found = 0
    start = time.process_time()
    for text in notes:
        found += len(fn(text))
    elapsed = time.process_time() - start
    return len(notes) / elapsed if elapsed > 0 else float("inf"), found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--notes", type=int, default=2000)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from conf.settings import ExtractionSettings
    from preprocessing.notes import NoteExtractor

    notes = make_notes(args.notes, args.seed)
    start = time.process_time()
    pipeline = NoteExtractor.from_settings(ExtractionSettings())
    build_s = time.process_time() - start
    baseline = LiteralCodeBaseline()
    pipeline(notes[0])  # first call warms spaCy's lazily built tables
    nlp_rate, nlp_found = _rate(pipeline, notes)
    base_rate, base_found = _rate(baseline, notes)
    result = {
        "benchmark": "notes",
        "notes": len(notes),
        "mean_chars_per_note": round(sum(map(len, notes)) / len(notes), 1),
        "nlp_pipeline": {"notes_per_s_per_core": round(nlp_rate, 1), "build_cpu_s": round(build_s, 2),
                         "diagnoses_found": nlp_found},
        "baseline": {"name": "literal_codes", "notes_per_s_per_core": round(base_rate, 1),
                     "diagnoses_found": base_found},
        "slowdown_vs_baseline": round(base_rate / nlp_rate, 1) if nlp_rate else None,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
