"""Codes in free text, with negation / history / family assertions scoped to the sentence."""
from __future__ import annotations

import pytest

from conf.settings import ExtractionSettings
from preprocessing.notes import NoteExtractor, extract_codes


@pytest.fixture(scope="module")
def extract() -> NoteExtractor:
    return NoteExtractor.from_settings(ExtractionSettings())


@pytest.mark.parametrize("text, expected", [
    ("Assessment: type 2 diabetes E11.9, stable.", [("E11.9", "affirmed")]),
    ("Patient has E11.9 and I10.", [("E11.9", "affirmed"), ("I10", "affirmed")]),
    ("dx e11.9 and E119 again", [("E11.9", "affirmed")]),          # one pair per (code, assertion)
    ("Denies I50.9.", [("I50.9", "negated")]),
    ("No evidence of N18.3 on labs.", [("N18.3", "negated")]),
    ("I48.91 was ruled out", [("I48.91", "affirmed")]),              # cues look back, not forward
    ("Ruled out I48.91", [("I48.91", "negated")]),
    ("History of I21.9 in 2012.", [("I21.9", "history")]),
    ("h/o I63.9", [("I63.9", "history")]),
    ("Family history of E11.9.", [("E11.9", "family")]),
    ("Mother had I21.9.", [("I21.9", "family")]),
    ("No family history of I10.", [("I10", "negated")]),             # negation wins
    # scope: a negation stops at the sentence end, ";" and "but"
    ("Denies I50.9. Has I10.", [("I50.9", "negated"), ("I10", "affirmed")]),
    ("Denies I50.9; has I10", [("I50.9", "negated"), ("I10", "affirmed")]),
    ("No evidence of I50.9 but N18.3 present", [("I50.9", "negated"), ("N18.3", "affirmed")]),
    ("Family history of E11.9; patient has J44.9", [("E11.9", "family"), ("J44.9", "affirmed")]),
    # a hard-wrapped line does not end the sentence
    ("Patient denies\nI50.9 today", [("I50.9", "negated")]),
    # the window: a cue more than cue_window_words (6) words back does not apply
    ("Denies chest pain shortness of breath palpitations dizziness or syncope I48.91",
     [("I48.91", "affirmed")]),
    ("Denies palpitations or I48.91", [("I48.91", "negated")]),
    # candidates that are not real ICD-10-CM codes, or ordinary words, are not codes
    ("B12 deficiency, A1C 7.2, T2D, E11.99X, COVID19 and ab E11.9x", []),
    ("", []), (None, []),
])
def test_extract_with_assertions(extract, text, expected):
    assert extract(text) == expected


def test_cue_lists_are_configurable():
    text = "Pt negative for I10. Possible E11.9."
    assert extract_codes(text, ["negative for"], []) == [("I10", "negated"), ("E11.9", "affirmed")]
    assert extract_codes(text, ["possible"], []) == [("I10", "affirmed"), ("E11.9", "negated")]
    assert extract_codes("Previously I10.", [], ["previously"]) == [("I10", "history")]
    assert extract_codes("Denies a b c I10", ["denies"], [], cue_window_words=3) == [("I10", "affirmed")]
    assert extract_codes("Denies a b c I10", ["denies"], [], cue_window_words=4) == [("I10", "negated")]


def test_window_must_be_positive():
    with pytest.raises(ValueError, match="cue_window_words"):
        NoteExtractor(["no"], [], 0)
