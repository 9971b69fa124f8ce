"""OMOP mode: CDM 5.4 tables of the same simulated patients, with countable bad rows."""
from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import simple_icd_10_cm as icd

from synth.emr import read_truth
from synth.emr_omop import COLUMNS, DATE_COLUMNS

WELL_FORMED_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
ICD9 = re.compile(r"^(V\d{2}(\.\d{1,2})?|\d{3}(\.\d{1,2})?)$")


def _rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


# Column lists of the OHDSI CDM 5.4 DDL (inst/ddl/5.4 of OHDSI/CommonDataModel), in order.
CDM54 = {
    "observation_period": ["observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date", "period_type_concept_id"],
    "death": ["person_id", "death_date", "death_datetime", "death_type_concept_id",
              "cause_concept_id", "cause_source_value", "cause_source_concept_id"],
    "concept": ["concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                "standard_concept", "concept_code", "valid_start_date", "valid_end_date",
                "invalid_reason"],
    "concept_relationship": ["concept_id_1", "concept_id_2", "relationship_id",
                             "valid_start_date", "valid_end_date", "invalid_reason"],
    "concept_ancestor": ["ancestor_concept_id", "descendant_concept_id",
                         "min_levels_of_separation", "max_levels_of_separation"],
}


def _dicts(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_tables_have_cdm_columns_and_match_the_fhir_cohort(omop_export, fhir_export) -> None:
    out, summary = omop_export
    fhir_out, fhir_summary = fhir_export
    for table in ("person", "visit_occurrence", "condition_occurrence", "measurement",
                  "observation", "note", "cdm_source", "drug_exposure", *CDM54):
        header, rows = _rows(out / f"{table}.csv")
        assert tuple(header) == COLUMNS[table]
        if table in CDM54:
            assert header == CDM54[table]
        assert header == [h.lower() for h in header]
        assert len(rows) == summary["files"][f"{table}.csv"]
    # One simulation behind both formats: same patients, visits, diagnoses, notes and signal.
    assert summary["records"]["person"] == fhir_summary["records"]["Patient"] == 400
    assert summary["records"]["visit_occurrence"] == fhir_summary["records"]["Encounter"]
    assert summary["records"]["note"] == fhir_summary["records"]["DocumentReference"]
    assert summary["signal"] == fhir_summary["signal"]
    # An OMOP ETL loads every FHIR Condition except refuted and entered-in-error ones.
    # (The good FHIR Conditions, by id, as the truth lists them: planted bad copies excluded.)
    truth_ids = {r["condition"] for r in read_truth(fhir_out, "conditions")}
    statuses = Counter()
    for f in fhir_out.glob("Condition*.ndjson"):
        for line in f.read_text().splitlines():
            try:
                res = json.loads(line)
            except json.JSONDecodeError:
                continue
            if res["id"] in truth_ids:
                truth_ids.discard(res["id"])  # a duplicated line counts once
                statuses[res["verificationStatus"]["coding"][0]["code"]] += 1
    assert statuses["refuted"] > 0 and statuses["entered-in-error"] > 0
    assert summary["records"]["condition_occurrence"] == (
        fhir_summary["records"]["Condition"] - statuses["refuted"] - statuses["entered-in-error"])
    _, persons = _rows(out / "person.csv")
    assert [int(r[0]) for r in persons] == list(range(1, 401))


def test_person_source_value_is_the_fhir_mrn(omop_export, fhir_export) -> None:
    out, _ = omop_export
    fhir_out, _ = fhir_export
    mrns = []
    for line in (fhir_out / "Patient.ndjson").read_text().splitlines():
        p = json.loads(line)
        mrns += [i["value"] for i in p["identifier"]
                 if any(c["code"] == "MR" for c in i.get("type", {}).get("coding", []))]
    assert [r["person_source_value"] for r in _dicts(out / "person.csv")] == mrns


def test_conditions_use_standard_snomed_concepts_with_vocabulary_rows(omop_export) -> None:
    out, _ = omop_export
    concept = {int(r["concept_id"]): r for r in _dicts(out / "concept.csv")}
    maps_to = {(int(r["concept_id_1"]), int(r["concept_id_2"]))
               for r in _dicts(out / "concept_relationship.csv") if r["relationship_id"] == "Maps to"}
    ancestor = {(int(r["ancestor_concept_id"]), int(r["descendant_concept_id"])): int(r["min_levels_of_separation"])
                for r in _dicts(out / "concept_ancestor.csv")}
    header, rows = _rows(out / "condition_occurrence.csv")
    col = {c: i for i, c in enumerate(header)}
    vocab: Counter = Counter()
    for r in rows:
        if len(r) != len(header) or r[col["condition_concept_id"]] == "0":
            continue  # bad rows (counted in test_bad_rows_match_the_summary)
        std = int(r[col["condition_concept_id"]])
        src = int(r[col["condition_source_concept_id"]])
        c = concept[std]
        assert c["standard_concept"] == "S" and c["vocabulary_id"] == "SNOMED" and c["domain_id"] == "Condition"
        assert (std, std) in ancestor and ancestor[(std, std)] == 0
        s = concept.get(src)
        if s is None:
            continue  # an invalid source code planted as a bad row keeps no source concept
        vocab[s["vocabulary_id"]] += 1
        if s["vocabulary_id"] == "SNOMED":
            assert src == std and s["concept_code"] == r[col["condition_source_value"]]
        else:
            assert s["standard_concept"] == "" and (src, std) in maps_to
            assert s["concept_code"] == r[col["condition_source_value"]]
    assert vocab["SNOMED"] > vocab["ICD10CM"] > vocab["ICD9CM"] > 0
    # OHDSI's own ids for the target conditions, and the hierarchy between them.
    used = {int(r[col["condition_concept_id"]]) for r in rows if len(r) == len(header)}
    assert {201826, 46271022, 316139} <= used  # T2DM, CKD, heart failure
    assert ancestor[(46271022, 443612)] == 1   # CKD stage 4 is a CKD
    assert (316139, 4229440) in ancestor       # chronic congestive heart failure is heart failure


def test_observation_periods_and_deaths_frame_every_record(omop_export) -> None:
    out, summary = omop_export
    periods = {r["person_id"]: r for r in _dicts(out / "observation_period.csv")}
    truth = read_truth(out, "patients")
    for t in truth:  # one period per registered person, from the first record to its end
        p = periods[str(t["patient"])]
        assert p["observation_period_start_date"] == t["first_record_date"] <= t["registration_date"]
        assert p["observation_period_end_date"] == t["observation_end_date"]
    deaths = {r["person_id"]: r["death_date"] for r in _dicts(out / "death.csv")}
    assert deaths and set(deaths) <= set(periods)
    for pid, d in deaths.items():
        assert periods[pid]["observation_period_end_date"] == d
    assert any(p["observation_period_end_date"] < "2025-12-31" and p["person_id"] not in deaths
               for p in periods.values())  # some left the hospital's care
    assert any(p["observation_period_start_date"] > "2024-06-30" for p in periods.values())
    header, rows = _rows(out / "visit_occurrence.csv")
    col = {c: i for i, c in enumerate(header)}
    release = summary["transaction_time"][:10]
    for r in rows:
        if len(r) != len(header) or r[1] not in periods or not r[col["visit_start_date"]] \
                or r[col["visit_start_date"]] > release:
            continue  # bad rows
        p = periods[r[1]]
        assert p["observation_period_start_date"] <= r[col["visit_start_date"]] \
            <= p["observation_period_end_date"], r


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
    from synth.emr import generate

    a = generate(tmp_path / "a", patients=50, seed=5, bad_share=0.05, fmt="omop")
    b = generate(tmp_path / "b", patients=50, seed=5, bad_share=0.05, fmt="omop")
    assert a == b
    for f in sorted((tmp_path / "a").rglob("*.*")):
        rel = f.relative_to(tmp_path / "a")
        assert f.read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    clean = generate(tmp_path / "c", patients=50, seed=5, bad_share=0.0, fmt="omop")
    assert clean["bad_records_total"] == 0
    assert not (tmp_path / "c" / "drug_exposure.csv").exists()
    # The good rows do not depend on the bad share: the clean tables are the bad ones minus
    # the planted rows.
    _, clean_rows = _rows(tmp_path / "c" / "person.csv")
    _, bad_rows = _rows(tmp_path / "a" / "person.csv")
    assert clean_rows == bad_rows


def test_the_truth_beside_the_export_is_never_read_as_input(omop_export, fhir_export) -> None:
    """The ingest job lists its input files; the ground truth must not be among them."""
    from jobs.emr_export import list_inputs

    for (out, _), fmt in ((omop_export, "omop"), (fhir_export, "fhir")):
        assert (out / "synth_truth" / "patients.json").is_file()
        assert not [p for p in list_inputs(out, fmt) if "synth_truth" in p.parts]
        names = {p.name for p in list_inputs(out, fmt)}
        if fmt == "omop":  # the new CDM tables are there for a reader to take
            assert {"observation_period.csv", "death.csv", "concept.csv",
                    "concept_relationship.csv", "concept_ancestor.csv"} <= names


def test_both_formats_share_one_truth(omop_export, fhir_export) -> None:
    """Same seed, same people: the truths differ only in the ids each format uses."""
    omop, fhir = read_truth(omop_export[0], "patients"), read_truth(fhir_export[0], "patients")
    assert [t["patient"] for t in omop] == list(range(1, len(omop) + 1))
    for a, b in zip(omop, fhir):
        assert {k: v for k, v in a.items() if k != "patient"} == \
            {k: v for k, v in b.items() if k != "patient"}
    notes = {r["note"] for r in read_truth(omop_export[0], "mentions")}
    header, rows = _rows(omop_export[0] / "note.csv")
    assert notes <= {int(r[0]) for r in rows if len(r) == len(header)}
