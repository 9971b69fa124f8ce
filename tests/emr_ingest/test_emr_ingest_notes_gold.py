"""The notes pipeline against the hand-labelled gold set (tests/fixtures/notes/gold_sentences.txt).

The figures this test measures are the table in docs/notes.md.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from conf.settings import ExtractionSettings
from preprocessing.notes import ASSERTIONS, NoteExtractor
from preprocessing.notes_evaluation import read_gold, score

GOLD = Path(__file__).resolve().parents[1] / "fixtures" / "notes" / "gold_sentences.txt"


@pytest.fixture(scope="module")
def scores() -> dict[str, dict[str, float]]:
    return score(NoteExtractor.from_settings(ExtractionSettings()), read_gold(GOLD))


def test_gold_set_covers_every_assertion_kind():
    items = read_gold(GOLD)
    assert len(items) >= 300
    kinds = {a for item in items for _, _, a in item.facts}
    assert kinds == set(ASSERTIONS)
    assert sum(1 for item in items if not item.facts) >= 20          # sentences with nothing to find
    assert sum(1 for item in items if "# Assessment and Plan" in item.text) >= 10   # Synthea layout
    assert any(s == "icd10cm" for item in items for s, _, _ in item.facts)


def test_affirmed_diagnoses_precision_and_recall(scores):
    assert scores["affirmed"]["precision"] >= 0.95, scores["affirmed"]
    assert scores["affirmed"]["recall"] >= 0.90, scores["affirmed"]


def test_what_counts_towards_prevalence(scores):
    # affirmed + history: the facts that make a patient prevalent
    assert scores["counted"]["precision"] >= 0.95, scores["counted"]
    assert scores["counted"]["recall"] >= 0.90, scores["counted"]


@pytest.mark.parametrize("kind", ["negated", "possible", "family", "hypothetical", "history"])
def test_other_assertions(scores, kind):
    assert scores[kind]["support"] >= 20
    assert scores[kind]["precision"] >= 0.85, scores[kind]
    assert scores[kind]["recall"] >= 0.85, scores[kind]
