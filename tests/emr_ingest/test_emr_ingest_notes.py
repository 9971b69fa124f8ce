"""Diagnoses in note text: terms, abbreviations and literal codes, with their assertion."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conf.settings import ExtractionSettings
from preprocessing.code_groups import load_code_groups
from preprocessing.notes import NoteExtractor, NoteRulesError, literal_code, load_note_rules

CONF = Path(__file__).resolve().parents[2] / "conf"


@pytest.fixture(scope="module")
def extract() -> NoteExtractor:
    return NoteExtractor.from_settings(ExtractionSettings())


T2D = [("text", "t2d", "affirmed"), ("text", "diabetes", "affirmed")]


@pytest.mark.parametrize("text, expected", [
    # the cases the literal-code extractor got wrong
    ("Diabetes not well controlled: E11.65",
     [("text", "diabetes", "affirmed"), ("icd10cm", "E11.65", "affirmed")]),
    ("no other complaints today and E11.9 is stable", [("icd10cm", "E11.9", "affirmed")]),
    ("Possible E11.9", [("icd10cm", "E11.9", "possible")]),
    ("E11.9 ruled out", [("icd10cm", "E11.9", "negated")]),
    ("I48.91 was ruled out", [("icd10cm", "I48.91", "negated")]),
    ("Wearing N95 mask", []),
    ("Type 2 diabetes mellitus", T2D),
    # codes: dotted in any case, undotted only upper case and billable
    ("dx e11.9 and E119 again", [("icd10cm", "E11.9", "affirmed")]),
    ("B12 deficiency, A1C 7.2, E11.99X, COVID19, N95 and ab E11.9x", []),
    ("I10 noted; P100 respirator fitted", [("icd10cm", "I10", "affirmed")]),
    # words: abbreviations, punctuation, case
    ("Pt with T2DM, CKD 3b and HFrEF.", [*T2D, ("text", "ckd", "affirmed"), ("text", "heart_failure", "affirmed")]),
    ("type-2 diabetes; diabetes mellitus, type II", T2D),
    ("hx of a-fib", [("text", "atrial_fibrillation", "history")]),
    ("Pre-diabetes and gestational diabetes in the past pregnancy, pulmonary hypertension", []),
    # assertions
    ("Denies CHF but has HTN.", [("text", "heart_failure", "negated"), ("text", "hypertension", "affirmed")]),
    ("No family history of CKD.", [("text", "ckd", "negated")]),
    ("Mother had a stroke; patient has COPD.", [("text", "stroke", "family"), ("text", "copd", "affirmed")]),
    ("Suspected atrial fibrillation.", [("text", "atrial_fibrillation", "possible")]),
    ("Screening for chronic kidney disease.", [("text", "ckd", "hypothetical")]),
    ("Not only hypertension but also obesity.", [("text", "hypertension", "affirmed"), ("text", "obesity", "affirmed")]),
    ("No increase in CHF symptoms.", [("text", "heart_failure", "affirmed")]),
    ("Family History:\nMother: CKD\n\nPast Medical History:\nCAD", [("text", "ckd", "family"), ("text", "cad", "history")]),
    ("", []), (None, []), ("   \n", []),
])
def test_mentions_with_assertions(extract, text, expected):
    assert extract(text) == expected


def test_mentions_carry_offsets_not_text(extract):
    text = "Assessment: stable.\nPatient has CKD stage 3."
    (m,) = extract.mentions(text)
    assert (m.system, m.code, m.assertion, m.section) == ("text", "ckd", "affirmed", "assessment")
    assert text[m.start:m.end] == "CKD"
    assert text[m.sentence_start:m.sentence_end].startswith("Patient has CKD")
    assert all(isinstance(v, (int, str, type(None))) and v != "CKD" for v in vars(m).values())


def test_literal_code_rules():
    assert literal_code("E11.9") == "E11.9"
    assert literal_code("e11.65") == "E11.65"
    assert literal_code("I10") == "I10"
    assert literal_code("E119") == "E11.9"
    assert literal_code("N95") is None      # a category, and a respirator
    assert literal_code("i10") is None      # lower-case undotted: a word
    assert literal_code("E11.99") is None   # not a code


def test_rules_are_data(tmp_path):
    targets = yaml.safe_load((CONF / "note_targets.yaml").read_text())
    targets["groups"]["ckd"]["abbreviations"].append("kidney stage thing")
    context = yaml.safe_load((CONF / "note_context.yaml").read_text())
    context["kinds"]["negated"]["preceding"].append("clear of")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(targets))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(context))
    x = NoteExtractor.from_files(tmp_path / "t.yaml", tmp_path / "c.yaml")
    assert x("Clear of kidney-stage thing.") == [("text", "ckd", "negated")]


def test_bad_rules_fail_with_the_entry(tmp_path):
    targets = yaml.safe_load((CONF / "note_targets.yaml").read_text())
    targets["groups"]["ckdd"] = targets["groups"].pop("ckd")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(targets))
    with pytest.raises(NoteRulesError, match="'ckdd' is not a code group"):
        load_note_rules(tmp_path / "t.yaml", CONF / "note_context.yaml",
                        load_code_groups(CONF / "code_groups.yaml").names)
    context = yaml.safe_load((CONF / "note_context.yaml").read_text())
    context["priority"] = ["negated", "family"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(context))
    with pytest.raises(NoteRulesError, match="priority"):
        load_note_rules(CONF / "note_targets.yaml", tmp_path / "c.yaml")
    with pytest.raises(NoteRulesError, match="does not exist"):
        load_note_rules(tmp_path / "missing.yaml", CONF / "note_context.yaml")


def test_parsers_emit_word_diagnoses_as_text_events_with_their_group(ctx):
    import base64
    import json

    from preprocessing.fhir import parse_fhir_line
    from preprocessing.omop import parse_omop_row

    text = "Carlota12 has a history of CHF. Possible CKD. Assessment: T2DM, E11.65."
    doc = {"resourceType": "DocumentReference", "id": "d1", "status": "current",
           "subject": {"reference": "Patient/p1"}, "date": "2021-06-10T14:00:00Z",
           "content": [{"attachment": {"contentType": "text/plain; charset=utf-8",
                                       "data": base64.b64encode(text.encode()).decode()}}]}
    fhir = parse_fhir_line(json.dumps(doc), ctx)
    omop = parse_omop_row("note", {"note_id": "9", "person_id": "1", "note_date": "2021-06-10",
                                   "note_text": text}, ctx)
    expected = [("dx_text", "text", "heart_failure", "history", ["heart_failure"]),
                ("dx_text", "text", "ckd", "possible", ["ckd"]),
                ("dx_text", "text", "t2d", "affirmed", ["t2d"]),
                ("dx_text", "text", "diabetes", "affirmed", ["diabetes"]),
                ("dx_text", "icd10cm", "E11.65", "affirmed", ["diabetes", "t2d"])]
    for r in (fhir, omop):
        assert [(e.kind, e.code_system, e.code, e.assertion, e.code_groups) for e in r.events] == expected
        assert "Carlota12" not in repr(r)


def test_only_affirmed_and_history_count_for_tokens_and_prevalence():
    import datetime as dt

    from preprocessing.timelines import prevalence
    from preprocessing.vocabulary import token_for

    for a in ("negated", "possible", "family", "hypothetical"):
        assert token_for("dx_text", "icd10cm", "E11.9", None, a) is None
        assert token_for("dx_text", "text", "t2d", None, a) is None
    assert token_for("dx_text", "icd10cm", "E11.9", None, "history") == "icd10:E11"
    # A mention in words carries its group as code and as its code_groups (groups_for("text", group)).
    assert token_for("dx_text", "text", "t2d", None, "affirmed", groups=["t2d"]) == "dx:t2d"
    t = [1_600_000_000_000_000] * 6
    kinds = ["dx_text"] * 6
    groups = [["t2d"], ["ckd"], ["heart_failure"], ["t2d"], ["ckd"], ["heart_failure"]]
    as_of = dt.date(2023, 1, 1)
    assert prevalence(t, kinds, groups, ["affirmed", "history", "affirmed", "negated", "family",
                                         "possible"], as_of) == {"t2d": True, "ckd": True, "hf": True}
    assert prevalence(t, kinds, groups, ["negated", "possible", "family", "hypothetical",
                                         "negated", "family"], as_of) == \
        {"t2d": False, "ckd": False, "hf": False}
    # a group name that is not the head's group does not count ("diabetes" is not t2d)
    assert prevalence(t[:1], kinds[:1], [["diabetes"]], ["affirmed"], as_of)["t2d"] is False


def test_bad_notes_rules_fail_the_ingest_before_any_work(make_settings, tmp_path):
    from emr_ingest_support import FIXTURES

    from jobs.emr_ingest import run

    targets = yaml.safe_load((CONF / "note_targets.yaml").read_text())
    targets["groups"]["kidney"] = targets["groups"].pop("ckd")
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(targets))
    settings = make_settings(**{"extraction.note_targets_file": str(tmp_path / "t.yaml")})
    with pytest.raises(NoteRulesError, match="'kidney' is not a code group"):
        run(settings, FIXTURES / "fhir", "fhir")
    assert not (settings.lake.root / "emr").exists()
