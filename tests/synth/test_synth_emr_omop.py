"""OMOP mode: CDM 5.4 tables of the same simulated patients, with countable bad rows."""
from __future__ import annotations

import csv
import re
from collections import Counter
from pathlib import Path

import simple_icd_10_cm as icd

from medscreen.synth_emr_omop import COLUMNS, DATE_COLUMNS

WELL_FORMED_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
ICD9 = re.compile(r"^(V\d{2}(\.\d{1,2})?|\d{3}(\.\d{1,2})?)$")


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def test_tables_have_cdm_columns_and_match_the_fhir_cohort(omop_export, fhir_export) -> None:
    out, summary = omop_export
    _, fhir_summary = fhir_export
    for table in ("person", "visit_occurrence", "condition_occurrence", "measurement",
                  "observation", "note", "cdm_source", "drug_exposure"):
        header, rows = _rows(out / f"{table}.csv")
        assert tuple(header) == COLUMNS[table]
        assert header == [h.lower() for h in header]
        assert len(rows) == summary["files"][f"{table}.csv"]
    # One simulation behind both formats: same patients, visits, diagnoses, notes and signal.
    assert summary["records"]["person"] == fhir_summary["records"]["Patient"] == 400
    assert summary["records"]["visit_occurrence"] == fhir_summary["records"]["Encounter"]
    assert summary["records"]["condition_occurrence"] == fhir_summary["records"]["Condition"]
    assert summary["records"]["note"] == fhir_summary["records"]["DocumentReference"]
    assert summary["signal"] == fhir_summary["signal"]
    _, persons = _rows(out / "person.csv")
    assert [int(r[0]) for r in persons] == list(range(1, 401))


def test_bad_rows_match_the_summary(omop_export) -> None:
    out, summary = omop_export
    counts: Counter = Counter()
    _, persons = _rows(out / "person.csv")
    person_ids = {r[0] for r in persons}
    release = summary["transaction_time"][:10]
    for table in ("visit_occurrence", "condition_occurrence", "measurement", "observation", "note"):
        header, rows = _rows(out / f"{table}.csv")
        col = {c: i for i, c in enumerate(header)}
        seen: set[str] = set()
        for r in rows:
            if len(r) != len(header):
                counts["malformed_line"] += 1
                continue
            if r[0] in seen:
                counts["duplicate_id"] += 1
                continue
            seen.add(r[0])
            if r[1] not in person_ids:
                counts["unknown_patient"] += 1
                continue
            dates = [r[col[c]] for c in DATE_COLUMNS.get(table, ()) if c.endswith("date")]
            if dates and not any(dates):
                counts["missing_date"] += 1
                continue
            if any(d > release for d in dates):
                counts["future_date"] += 1
                continue
            if table == "condition_occurrence":
                src = r[col["condition_source_value"]]
                if src.isdigit() and len(src) > 5 or ICD9.match(src):
                    continue  # SNOMED or ICD-9-CM source value
                if not WELL_FORMED_ICD10.match(src):
                    counts["malformed_code"] += 1
                elif not icd.is_valid_item(src):
                    counts["invalid_icd10"] += 1
                else:
                    assert icd.is_leaf(src), src
    _, drugs = _rows(out / "drug_exposure.csv")
    counts["unused_table"] = len(drugs)
    assert dict(counts) == summary["bad_records"]


def test_omop_is_byte_identical_per_seed_and_clean_without_bad_share(tmp_path: Path) -> None:
    from medscreen.synth_emr import generate

    a = generate(tmp_path / "a", patients=50, seed=5, bad_share=0.05, fmt="omop")
    b = generate(tmp_path / "b", patients=50, seed=5, bad_share=0.05, fmt="omop")
    assert a == b
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    clean = generate(tmp_path / "c", patients=50, seed=5, bad_share=0.0, fmt="omop")
    assert clean["bad_records_total"] == 0
    assert not (tmp_path / "c" / "drug_exposure.csv").exists()
    # The good rows do not depend on the bad share: the clean tables are the bad ones minus
    # the planted rows.
    _, clean_rows = _rows(tmp_path / "c" / "person.csv")
    _, bad_rows = _rows(tmp_path / "a" / "person.csv")
    assert clean_rows == bad_rows
