"""ICD-10-CM / ICD-9-CM normalisation and validation against the real code set."""
from __future__ import annotations

import random

import pytest

from preprocessing.icd import (code_set_version, icd10cm_codes, is_valid_icd10cm,
                               looks_like_icd9cm, normalise_icd9cm, normalise_icd10cm,
                               normalise_system, parse_icd10cm)


@pytest.mark.parametrize("raw, expected", [
    ("E11.9", "E11.9"), ("e11.9", "E11.9"), ("E119", "E11.9"), (" E11.9 ", "E11.9"),
    ("E11.9,", "E11.9"), ("E11.9.", "E11.9"), ("(E11.9)", "E11.9"), ("E 11.9", "E11.9"),
    ("E11 .9", "E11.9"), ("ICD-10-CM: E11.9", "E11.9"), ("icd10 e119", "E11.9"),
    ("E11.9 Type 2 diabetes mellitus", "E11.9"), ("I10", "I10"), ("i10;", "I10"),
    ("T38.3x5a", "T38.3X5A"), ("S72001A", "S72.001A"), ("Z68.41", "Z68.41"),
    ("E11.", "E11"),
    # not code-shaped
    ("", None), ("   ", None), (None, None), ("E1.19", None), ("11.9E", None), ("E11..9", None),
    ("EE11", None), ("E11.99999", None), ("250.00", None), ("diabetes", None),
])
def test_normalise_icd10cm(raw, expected):
    assert normalise_icd10cm(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("E11.9", ("E11.9", None)), ("e119", ("E11.9", None)), ("I13.2", ("I13.2", None)),
    ("E11", ("E11", None)),                        # categories are real codes too
    ("E11.99X", (None, "invalid_icd10cm")),        # code-shaped, not in the code set
    ("I64", (None, "invalid_icd10cm")),            # WHO ICD-10 only
    ("U99.9", (None, "invalid_icd10cm")),
    ("E1.19", (None, "malformed_code")), ("", (None, "malformed_code")),
])
def test_parse_icd10cm(raw, expected):
    assert parse_icd10cm(raw) == expected


def test_code_set_is_the_packages_and_agrees_with_simple_icd_10_cm():
    import simple_icd_10_cm as cm

    codes = icd10cm_codes()
    assert len(codes) > 90_000
    assert code_set_version().startswith("icd10cm-")
    rnd = random.Random(3)
    for code in rnd.sample(sorted(codes), 500):
        assert cm.is_valid_item(code), code
        assert not cm.is_chapter_or_block(code), code
    # Shape-valid codes not in the set are not valid items either.
    for code in ("E11.99X", "A00.9", "Z99.999", "I64"):
        assert is_valid_icd10cm(code) == cm.is_valid_item(code)


@pytest.mark.parametrize("raw, expected", [
    ("250.00", "250.00"), ("25000", "250.00"), ("401.9", "401.9"), ("4019", "401.9"), ("401", "401"),
    ("V58.67", "V58.67"), ("v5867", "V58.67"), ("E849.0", "E849.0"), ("E8490", "E849.0"),
    ("E11.9", None), ("E700.1", None), ("40055000", None), ("", None), (None, None),
])
def test_normalise_icd9cm(raw, expected):
    assert normalise_icd9cm(raw) == expected


@pytest.mark.parametrize("raw, expected", [
    ("250.00", True), ("V58.67", True), ("E849.0", True),
    ("V43.52XA", False),   # ICD-10-CM external cause, not ICD-9
    ("40055000", False), ("E11.9", False), ("I10", False),
])
def test_looks_like_icd9cm(raw, expected):
    assert looks_like_icd9cm(raw) is expected


@pytest.mark.parametrize("uri, expected", [
    ("http://hl7.org/fhir/sid/icd-10-cm", "icd10cm"), ("urn:oid:2.16.840.1.113883.6.90", "icd10cm"),
    ("http://hl7.org/fhir/sid/icd-9-cm", "icd9cm"), ("http://snomed.info/sct", "snomed"),
    ("http://loinc.org/", "loinc"), ("HTTP://LOINC.ORG", "loinc"), ("http://hl7.org/fhir/sid/icd-10", "icd10"),
    ("http://www.nlm.nih.gov/research/umls/rxnorm", "rxnorm"),
    ("http://terminology.hl7.org/CodeSystem/v3-ActCode", "actcode"),
    ("https://local.example.org/codes", "https://local.example.org/codes"),
    (None, "unknown"), ("  ", "unknown"),
])
def test_normalise_system(uri, expected):
    assert normalise_system(uri) == expected
