"""Chronic-disease code groups: membership, and a load that fails on codes that do not exist."""
from __future__ import annotations

from pathlib import Path

import pytest

from conf.settings import ExtractionSettings
from preprocessing.code_groups import CodeGroupsError, load_code_groups


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
    assert groups.groups_for(code) == expected
    assert groups(code) == expected


def test_the_shipped_groups_cover_the_screening_heads(groups):
    assert {"t2d", "ckd", "heart_failure"} <= set(groups.names)


@pytest.mark.parametrize("body, group, entry", [
    ("groups:\n  stroke:\n    codes: [I63, I64]\n", "stroke", "I64"),
    ("groups:\n  diabetes:\n    codes: [E08-E99]\n", "diabetes", "E08-E99"),
    ("groups:\n  obesity:\n    codes: [E66, Z68.3x]\n", "obesity", "Z68.3x"),
])
def test_load_fails_naming_group_and_entry(tmp_path: Path, body, group, entry):
    path = tmp_path / "groups.yaml"
    path.write_text(body)
    with pytest.raises(CodeGroupsError) as err:
        load_code_groups(path)
    assert repr(group) in str(err.value) and repr(entry) in str(err.value)


@pytest.mark.parametrize("body, match", [
    ("groups:\n  cad:\n    codes: [I25-I20]\n", "low to high"),
    ("groups:\n  x:\n    codes: []\n", "non-empty list"),
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
