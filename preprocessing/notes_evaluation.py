"""Precision and recall of the notes pipeline against a hand-labelled gold set.

Gold file format (``tests/fixtures/notes/gold_sentences.txt``): one item per
line, ``text || labels``; ``#`` starts a comment line; ``\\n`` in the text is
a line break. ``labels`` is ``-`` (no diagnosis) or ``;``-separated items
``concepts=assertion`` whose ``concepts`` are ``,``-separated code group
names (code_system ``text``) or dotted ICD-10-CM codes (``icd10cm``).

Scoring is over distinct (item, code_system, code, assertion) facts: per
assertion kind, a predicted fact of that kind is a true positive when the
gold item has the same fact. "counted" scores the facts that count towards
prevalence (affirmed and history merged into one kind).
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from preprocessing.notes import ASSERTIONS, COUNTED_ASSERTIONS, SYSTEM_ICD10CM, SYSTEM_TEXT

_CODE = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
COUNTED = "counted"

Fact = tuple[str, str, str]   # (code_system, code, assertion)


@dataclass(frozen=True)
class GoldItem:
    line: int
    text: str
    facts: frozenset[Fact]


def read_gold(path: str | Path) -> list[GoldItem]:
    """Parse a gold file; raise ValueError naming the line of a malformed item."""
    items = []
    for n, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not raw.strip() or raw.startswith("#"):
            continue
        if raw.count(" || ") != 1:
            raise ValueError(f"{path}:{n}: an item is 'text || labels' with exactly one ' || '")
        text, labels = raw.split(" || ")
        facts: set[Fact] = set()
        if labels.strip() != "-":
            for part in labels.split(";"):
                concepts, sep, assertion = part.strip().rpartition("=")
                if not sep or assertion not in ASSERTIONS or not concepts:
                    raise ValueError(f"{path}:{n}: label {part.strip()!r} is not 'concepts=assertion' "
                                     f"with an assertion in {ASSERTIONS}")
                for c in concepts.split(","):
                    c = c.strip()
                    facts.add((SYSTEM_ICD10CM if _CODE.match(c) else SYSTEM_TEXT, c, assertion))
        items.append(GoldItem(n, text.replace("\\n", "\n"), frozenset(facts)))
    return items


def _counted(facts: Iterable[Fact]) -> set[Fact]:
    return {(s, c, COUNTED) for s, c, a in facts if a in COUNTED_ASSERTIONS}


def score(extract: Callable[[str], Iterable[Fact]], items: list[GoldItem]) -> dict[str, dict[str, float]]:
    """Per assertion kind (and ``counted``): tp, fp, fn, precision, recall, support (gold facts)."""
    kinds = (*ASSERTIONS, COUNTED)
    tally = {k: {"tp": 0, "fp": 0, "fn": 0} for k in kinds}
    for item in items:
        pred = set(extract(item.text))
        gold = set(item.facts)
        pred |= _counted(pred)
        gold |= _counted(gold)
        for k in kinds:
            p = {f for f in pred if f[2] == k}
            g = {f for f in gold if f[2] == k}
            tally[k]["tp"] += len(p & g)
            tally[k]["fp"] += len(p - g)
            tally[k]["fn"] += len(g - p)
    out = {}
    for k, t in tally.items():
        tp, fp, fn = t["tp"], t["fp"], t["fn"]
        out[k] = {**t, "support": tp + fn,
                  "precision": tp / (tp + fp) if tp + fp else 1.0,
                  "recall": tp / (tp + fn) if tp + fn else 1.0}
    return out


def errors(extract: Callable[[str], Iterable[Fact]], items: list[GoldItem]) -> list[tuple[int, set[Fact], set[Fact]]]:
    """(gold line, missed facts, spurious facts) for every item the pipeline gets wrong."""
    out = []
    for item in items:
        pred = set(extract(item.text))
        if pred != item.facts:
            out.append((item.line, set(item.facts - pred), pred - item.facts))
    return out
