"""Disease definitions as concept sets: membership over every vocabulary, and a load that fails
on codes that do not exist, malformed SNOMED CT ids, missing descriptions or sources."""
from __future__ import annotations

from pathlib import Path

import pytest

from conf.settings import ExtractionSettings
from preprocessing.code_groups import CodeGroupsError, groups_for, is_snomed_concept_id, load_code_groups

HEADER = ("version: t1\nsources:\n  s:\n    title: a test source\n    version: '1'\n")


@pytest.fixture(scope="module")
def groups():
    return load_code_groups(ExtractionSettings().code_groups_file)


@pytest.mark.parametrize("code, expected", [
    ("E11.9", ["diabetes", "t2d"]), ("E11.65", ["diabetes", "t2d"]), ("E10.9", ["diabetes"]),
    ("E08.9", ["diabetes"]), ("E13.9", ["diabetes"]), ("E14.9", []), ("E07.9", []),
    ("I10", ["hypertension"]), ("I16.0", ["hypertension"]),
    ("I11.0", ["hypertension", "heart_failure"]), ("I11.9", ["hypertension"]),
    ("I13.0", ["hypertension", "heart_failure"]), ("I13.2", ["hypertension", "heart_failure"]),
    ("I13.10", ["hypertension"]), ("I50.9", ["heart_failure"]), ("I50.22", ["heart_failure"]),
    ("N18.3", ["ckd"]), ("N18.30", ["ckd"]), ("N17.9", []),
    ("J44.9", ["copd"]), ("J45.909", []), ("I25.10", ["cad"]), ("I20.9", ["cad"]), ("I26.99", []),
    ("I48.91", ["atrial_fibrillation"]), ("I63.9", ["stroke"]), ("E78.5", ["hyperlipidaemia"]),
    ("E66.9", ["obesity"]), ("Z68.30", ["obesity"]), ("Z68.41", ["obesity"]), ("Z68.29", []),
    ("A00.0", []),
])
def test_membership(groups, code, expected):
    assert groups.groups_for("icd10cm", code) == expected
    assert groups("icd10cm", code) == expected
    assert groups_for("icd10cm", code) == expected


@pytest.mark.parametrize("system, code, expected", [
    # Synthea's SNOMED CT conditions (expected groups from the concepts' meaning, not the code).
    ("snomed", "44054006", ["diabetes", "t2d"]), ("snomed", "46635009", ["diabetes"]),
    ("snomed", "431857002", ["ckd"]), ("snomed", "46177005", ["ckd"]), ("snomed", "88805009", ["heart_failure"]),
    ("snomed", "59621000", ["hypertension"]), ("snomed", "49436004", ["atrial_fibrillation"]),
    ("snomed", "195662009", []), ("snomed", "E11.9", []),
    # OMOP standard concepts.
    ("omop", "201826", ["diabetes", "t2d"]), ("omop", "316139", ["heart_failure"]), ("omop", "46271022", ["ckd"]),
    ("omop", "4112343", []),
    # ICD-9-CM through the CMS GEMs (250.00 → E11.9, 250.01 → E10.9, 428.0 → I50.9, 585.3 → N18.3).
    ("icd9cm", "250.00", ["diabetes", "t2d"]), ("icd9cm", "250.01", ["diabetes"]), ("icd9cm", "428.0", ["heart_failure"]),
    ("icd9cm", "585.3", ["ckd"]), ("icd9cm", "401.9", ["hypertension"]), ("icd9cm", "427.31", ["atrial_fibrillation"]),
    ("icd9cm", "V70.0", []), ("icd9cm", "V85.30", ["obesity"]),
    # A diagnosis recognised in note words carries its group name as the code.
    ("text", "ckd", ["ckd"]), ("text", "nonsense", []),
    ("loinc", "4548-4", []), (None, "E11.9", []), ("icd10cm", None, []),
])
def test_membership_across_vocabularies(groups, system, code, expected):
    assert groups.groups_for(system, code) == expected


def test_omop_descendants_join_their_ancestors_group(groups):
    # concept_ancestor rows: 201826 (T2D) → 443732 (a descendant); 4112343 is no listed ancestor.
    extended = groups.with_omop_descendants([("201826", "443732"), ("201820", "443732"), ("4112343", "1")])
    assert extended.groups_for("omop", "443732") == ["diabetes", "t2d"]
    assert extended.groups_for("omop", "1") == [] and groups.groups_for("omop", "443732") == []
    assert extended.sha256 != groups.sha256  # another definition, another fingerprint


def test_every_group_cites_a_source_and_the_file_is_versioned(groups):
    assert groups.version and all(s.sources for s in groups.sets)
    assert all(src["title"] and src["version"] for src in groups.sources.values())
    for s in groups.sets:
        assert s.snomed and s.omop and all(s.snomed.values()) and all(s.omop.values()), s.name
        assert all(is_snomed_concept_id(c) for c in s.snomed)


@pytest.mark.parametrize("sctid, ok", [
    ("44054006", True), ("90781000119102", True), ("44054007", False), ("4405400", False),
    ("044054006", False), ("44054016", False), ("12", False), ("E11.9", False),
])
def test_snomed_ids_are_checked_for_form(sctid, ok):
    assert is_snomed_concept_id(sctid) is ok


def test_the_shipped_groups_cover_the_screening_heads(groups):
    assert {"t2d", "ckd", "heart_failure"} <= set(groups.names)


@pytest.mark.parametrize("body, group, entry", [
    ("groups:\n  stroke:\n    sources: [s]\n    icd10cm: [I63, I64]\n", "stroke", "I64"),
    ("groups:\n  diabetes:\n    sources: [s]\n    icd10cm: [E08-E99]\n", "diabetes", "E08-E99"),
    ("groups:\n  obesity:\n    sources: [s]\n    icd10cm: [E66, Z68.3x]\n", "obesity", "Z68.3x"),
    ("groups:\n  t2d:\n    sources: [s]\n    icd10cm: [E11]\n    icd9cm: ['259.99']\n", "t2d", "259.99"),
    ("groups:\n  t2d:\n    sources: [s]\n    icd10cm: [E11]\n    snomed: {44054007: Diabetes}\n",
     "t2d", "44054007"),
    ("groups:\n  t2d:\n    sources: [s]\n    icd10cm: [E11]\n    snomed: {44054006: ''}\n", "t2d", "44054006"),
    ("groups:\n  t2d:\n    sources: [s]\n    icd10cm: [E11]\n    omop: {-5: x}\n", "t2d", "-5"),
])
def test_load_fails_naming_group_and_entry(tmp_path: Path, body, group, entry):
    path = tmp_path / "groups.yaml"
    path.write_text(HEADER + body)
    with pytest.raises(CodeGroupsError) as err:
        load_code_groups(path)
    assert repr(group) in str(err.value) and repr(entry) in str(err.value)


@pytest.mark.parametrize("body, match", [
    (HEADER + "groups:\n  cad:\n    sources: [s]\n    icd10cm: [I25-I20]\n", "low to high"),
    (HEADER + "groups:\n  x:\n    sources: [s]\n    icd10cm: []\n", "non-empty list"),
    (HEADER + "groups:\n  x:\n    icd10cm: [E11]\n", "sources"),
    (HEADER + "groups:\n  x:\n    sources: [nope]\n    icd10cm: [E11]\n", "not declared"),
    ("groups:\n  x:\n    sources: [s]\n    icd10cm: [E11]\n", "version"),
    ("nothing: here\n", "groups"),
    ("groups: [\n", "not valid YAML"),
])
def test_load_fails_on_bad_structure(tmp_path: Path, body, match):
    path = tmp_path / "groups.yaml"
    path.write_text(body)
    with pytest.raises(CodeGroupsError, match=match):
        load_code_groups(path)


def test_missing_file_names_the_setting(tmp_path: Path):
    with pytest.raises(CodeGroupsError, match="code_groups_file"):
        load_code_groups(tmp_path / "absent.yaml")
