"""EMR ingest end to end on local Spark: reconciled counts, no leakage, stable keys, identical reruns."""
from __future__ import annotations

import base64
import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
from emr_ingest_support import FIXTURES, INGEST_KEY, ingest, read_lake_table, sorted_rows

from lake.commit import is_committed, read_manifest
from lake.keys import pseudonymise
from lake.schemas import EVENTS, OBSERVATION_PERIODS, PATIENTS, QUARANTINE

KEY = INGEST_KEY.encode()
FHIR_QUARANTINE = {"duplicate_id": 1, "unknown_patient": 2, "invalid_icd10cm": 1, "malformed_code": 1,
                   "missing_subject": 1, "missing_value": 1, "malformed_json": 1, "future_date": 1,
                   "missing_date": 2, "invalid_date": 1, "invalid_value": 1, "undecodable_attachment": 1}


def _ndjson_counts(export: Path) -> tuple[int, Counter]:
    """Plain-Python count of an NDJSON export: lines, and lines per resourceType (file name if unreadable)."""
    lines, per_type = 0, Counter()
    for f in sorted(export.glob("*.ndjson")):
        for raw in f.read_text().splitlines():
            lines += 1
            try:
                per_type[json.loads(raw)["resourceType"]] += 1
            except ValueError:
                per_type[f.name.split(".")[0]] += 1
    return lines, per_type


def _strings(table: pa.Table) -> list[str]:
    out = []
    for row in table.to_pylist():
        for v in row.values():
            vs = v if isinstance(v, list) else [v]
            out.extend(str(x) for x in vs if x is not None)
    return out


def _check_schema(table: pa.Table, schema: pa.Schema) -> None:
    assert table.schema.names == schema.names
    # Spark names list items "element", Arrow "item": compare by casting, which checks the types.
    table.cast(schema)
    for name in schema.names:
        got, want = table.schema.field(name).type, schema.field(name).type
        assert got == want or (pa.types.is_list(got) and pa.types.is_list(want)), (name, got, want)


def test_fhir_ledger_balances_and_matches_a_plain_count(fhir_ingest):
    summary = fhir_ingest["summaries"][-1]
    lines, per_type = _ndjson_counts(FIXTURES / "fhir")
    stage = summary["counts"]["emr_ingest"]
    assert stage["balanced"] and stage["records_in"] == lines == 42
    assert {t: sum(v.values()) for t, v in summary["by_resource_type"].items()} == dict(per_type)
    assert summary["quarantine_reasons"] == FHIR_QUARANTINE
    assert summary["ignored"] == {"non_numeric_value": 1, "unsupported_resource": 4}
    for name in ("emr_ingest.events", "emr_ingest.patients", "emr_ingest.quarantine"):
        assert summary["counts"][name]["balanced"], name
    tables = fhir_ingest["tables"][-1]
    assert tables["patients"].num_rows == 4 == summary["counts"]["emr_ingest.patients"]["records_out"]
    assert tables["quarantine"].num_rows == sum(FHIR_QUARANTINE.values())
    assert Counter(tables["quarantine"].column("reason").to_pylist()) == Counter(FHIR_QUARANTINE)
    # 27: 25 from codes, plus t2d and diabetes from the words "type 2 diabetes" in a note
    assert tables["events"].num_rows == summary["counts"]["emr_ingest.events"]["records_out"] == 27
    ledger = json.loads((Path(summary["run_dir"]) / "ledger.json").read_text())
    assert ledger["balanced"] and ledger["stages"]["emr_ingest"]["records_in"] == 42


def test_fhir_outputs_are_committed_with_manifests_and_lake_schemas(fhir_ingest):
    lake = fhir_ingest["lake"]
    summary = fhir_ingest["summaries"][-1]
    for name, schema in (("events", EVENTS), ("patients", PATIENTS), ("quarantine", QUARANTINE),
                         ("observation_periods", OBSERVATION_PERIODS)):
        path = lake / "emr" / name
        assert is_committed(path)
        m = read_manifest(path)
        assert m["run_id"] == summary["run_id"]
        assert m["code_set_version"].startswith("icd10cm-")
        assert m["export_time_from"] == "manifest.json transactionTime"
        assert {f["name"] for f in m["input"]["files"]} >= {"Patient.000.ndjson", "Claim.000.ndjson"}
        _check_schema(fhir_ingest["tables"][-1][name], schema)
    run_manifest = json.loads((Path(summary["run_dir"]) / "manifest.json").read_text())
    assert run_manifest["counts"]["records_in"] == 42
    # No staging or trash left behind: the tables (each a pointer to its current version)
    # and their version store, nothing else.
    assert sorted(p.name for p in (lake / "emr").iterdir()) == [".versions", "events", "observation_periods",
                                                               "patients", "quarantine"]


def test_fhir_events_carry_pseudonymised_keys_codes_and_utc_times(fhir_ingest):
    events = fhir_ingest["tables"][-1]["events"].to_pylist()
    p0 = pseudonymise(KEY, "b1f6c3a2-5e0d-4c1a-9a51-6f0e2d7c9a11")
    mine = [e for e in events if e["patient_key"] == p0]
    dx = {(e["code_system"], e["code"], e["assertion"], tuple(e["code_groups"]))
          for e in mine if e["kind"] == "dx"}
    assert ("icd10cm", "E11.9", "affirmed", ("diabetes", "t2d")) in dx
    # The SNOMED CT coding of the same Condition is type 2 diabetes too.
    assert ("snomed", "44054006", "affirmed", ("diabetes", "t2d")) in dx
    assert ("icd10cm", "I10", "affirmed", ("hypertension",)) in dx
    text = {(e["code"], e["assertion"]) for e in mine if e["kind"] == "dx_text"}
    # "type 2 diabetes E11.9": the words (code_system text, group names) and the literal code
    assert text == {("E11.9", "affirmed"), ("I50.9", "negated"), ("I21.9", "history"), ("C50.919", "family"),
                    ("t2d", "affirmed"), ("diabetes", "affirmed")}
    enc = sorted(e["event_time"].isoformat() for e in mine if e["kind"] == "encounter")
    assert enc == ["2019-03-04T14:15:00+00:00", "2021-06-10T14:00:00+00:00"]
    # The duplicate Condition id keeps its first occurrence (E11.9), not the later copy (E78.5).
    assert not any(e["code"] == "E78.5" for e in events)
    assert {e["source"] for e in events} == {"fhir"}
    assert all(len(e["source_ref"]) == 32 for e in events)


def _sensitive_fhir_strings() -> set[str]:
    """Raw ids, names, contact details and note text from the hand-written export."""
    out: set[str] = set()
    for f in sorted((FIXTURES / "fhir").glob("*.ndjson")):
        for raw in f.read_text().splitlines():
            try:
                res = json.loads(raw)
            except ValueError:
                continue
            out.add(res.get("id", ""))
            for name in res.get("name", []):
                out.update([name.get("family", "")] + name.get("given", []))
            out.update(t["value"] for t in res.get("telecom", []))
            out.update(i["value"] for i in res.get("identifier", []))
            for c in res.get("content", []):
                data = c.get("attachment", {}).get("data", "")
                try:
                    text = base64.b64decode(data, validate=True).decode()
                except ValueError:
                    continue
                out.add(text)
                out.update(s.strip() for s in text.split(".") if len(s.strip()) > 15)
    return {s for s in out if s}


def _assert_no_leak(lake: Path, run_dir: Path, sensitive: set[str]) -> None:
    values = []
    for name in ("events", "patients", "quarantine", "observation_periods"):
        values.extend(_strings(read_lake_table(lake / "emr" / name)))
    for p in list(run_dir.glob("*.json")) + list((lake / "emr").glob("*/manifest.json")):
        values.append(p.read_text())
    blob = "\n".join(values)
    leaked = sorted(s for s in sensitive if s in blob)
    assert not leaked, f"{len(leaked)} raw identifiers/text found in the lake"


def test_fhir_lake_holds_no_raw_ids_names_or_note_text(fhir_ingest):
    sensitive = _sensitive_fhir_strings()
    assert "Jacinto644" in sensitive and "b1f6c3a2-5e0d-4c1a-9a51-6f0e2d7c9a11" in sensitive
    assert any("Denies I50.9" in s for s in sensitive)
    _assert_no_leak(fhir_ingest["lake"], Path(fhir_ingest["summaries"][-1]["run_dir"]), sensitive)


def test_fhir_rerun_gives_identical_rows(fhir_ingest):
    first, second = fhir_ingest["tables"]
    for name in ("events", "patients", "quarantine", "observation_periods"):
        assert sorted_rows(first[name]) == sorted_rows(second[name]), name
    runs = [s["run_id"] for s in fhir_ingest["summaries"]]
    assert runs[0] != runs[1]
    assert read_manifest(fhir_ingest["lake"] / "emr" / "events")["run_id"] == runs[1]


def _csv_rows(export: Path) -> Counter:
    counts = Counter()
    for f in sorted(export.glob("*.csv")):
        with f.open(newline="") as fh:
            counts[f.stem] = sum(1 for _ in csv.DictReader(fh))
    return counts


def test_omop_ledger_balances_and_matches_a_plain_count(omop_ingest):
    summary = omop_ingest["summaries"][-1]
    rows = _csv_rows(FIXTURES / "omop")
    stage = summary["counts"]["emr_ingest"]
    assert stage["balanced"] and stage["records_in"] == sum(rows.values())
    assert {t: sum(v.values()) for t, v in summary["by_resource_type"].items()} == dict(rows)
    assert summary["ignored"] == {"non_numeric_value": 1,
                                  "unsupported_table": rows["drug_exposure"] + rows["cdm_source"]}
    assert summary["quarantine_reasons"] == {
        "duplicate_id": 1, "missing_id": 1, "unknown_patient": 1, "missing_date": 1,
        "invalid_icd10cm": 1, "missing_code": 1, "invalid_date": 1, "missing_value": 1,
        "invalid_value": 1}
    tables = omop_ingest["tables"][-1]
    patients = {r["patient_key"]: r for r in tables["patients"].to_pylist()}
    assert set(patients) == {pseudonymise(KEY, str(i)) for i in (1, 2, 3)}
    assert patients[pseudonymise(KEY, "1")]["sex"] == "M"
    events = tables["events"].to_pylist()
    p1 = [e for e in events if e["patient_key"] == pseudonymise(KEY, "1")]
    assert ("dx", "icd10cm", "E11.9") in {(e["kind"], e["code_system"], e["code"]) for e in p1}
    assert ("dx_text", "I50.9", "negated") in {(e["kind"], e["code"], e["assertion"]) for e in p1}
    assert ("obs", "loinc", "4548-4", 7.2) in {(e["kind"], e["code_system"], e["code"], e["value"]) for e in p1}
    assert {e["source"] for e in events} == {"omop"}
    assert read_manifest(omop_ingest["lake"] / "emr" / "events")["export_time_from"] == \
        "cdm_source.cdm_release_date"


def test_omop_lake_holds_no_note_text_or_source_values(omop_ingest):
    sensitive = set()
    with (FIXTURES / "omop" / "note.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            sensitive.add(row["note_text"])
            sensitive.update(s.strip() for s in row["note_text"].split(".") if len(s.strip()) > 15)
    with (FIXTURES / "omop" / "person.csv").open(newline="") as fh:
        sensitive.update(r["person_source_value"] for r in csv.DictReader(fh))
    _assert_no_leak(omop_ingest["lake"], Path(omop_ingest["summaries"][-1]["run_dir"]), sensitive)


def test_generated_export_reconciles_with_the_generators_bad_records(spark, tmp_path_factory):
    from synth.emr import generate

    export = tmp_path_factory.mktemp("synth_fhir") / "export"
    synth = generate(export, patients=30, seed=11, bad_share=0.05, fmt="fhir")
    result = ingest(spark, tmp_path_factory, "fhir", export)
    summary = result["summaries"][0]
    lines, per_type = _ndjson_counts(export)
    stage = summary["counts"]["emr_ingest"]
    assert stage["balanced"] and stage["records_in"] == lines
    assert {t: sum(v.values()) for t, v in summary["by_resource_type"].items()} == dict(per_type)
    bad, q = synth["bad_records"], summary["quarantine_reasons"]
    for ours, theirs in (("invalid_icd10cm", "invalid_icd10"), ("malformed_json", "malformed_json"),
                         ("duplicate_id", "duplicate_id"), ("unknown_patient", "unknown_patient"),
                         ("future_date", "future_date"), ("missing_date", "missing_date")):
        assert q.get(ours, 0) == bad[theirs], ours
    # The normaliser recovers some malformed codes (e.g. "I 10"), never invents any.
    assert q.get("malformed_code", 0) <= bad["malformed_code"]
    assert summary["ignored"]["unsupported_resource"] == bad["unused_resource"]
    assert set(q) <= set(FHIR_QUARANTINE) | {"malformed_code"}


def test_cli_entry_point_reports_bad_input(tmp_path: Path, capsys):
    from jobs.emr_ingest import main

    assert main(["--input", str(tmp_path / "nowhere"), "--format", "fhir", "--lake", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(tmp_path / "empty"), "--format", "omop", "--lake", str(tmp_path)]) == 2
    assert "no OMOP CDM tables" in capsys.readouterr().err


def test_generated_omop_export_reconciles_with_the_generators_bad_records(spark, tmp_path_factory):
    from synth.emr import generate

    export = tmp_path_factory.mktemp("synth_omop") / "export"
    synth = generate(export, patients=25, seed=5, bad_share=0.05, fmt="omop")
    summary = ingest(spark, tmp_path_factory, "omop", export)["summaries"][0]
    rows = _csv_rows(export)
    stage = summary["counts"]["emr_ingest"]
    assert stage["balanced"] and stage["records_in"] == sum(rows.values())
    assert {t: sum(v.values()) for t, v in summary["by_resource_type"].items()} == dict(rows)
    bad, q = synth["bad_records"], summary["quarantine_reasons"]
    for ours, theirs in (("invalid_icd10cm", "invalid_icd10"), ("duplicate_id", "duplicate_id"),
                         ("unknown_patient", "unknown_patient"), ("future_date", "future_date"),
                         ("missing_date", "missing_date"), ("malformed_line", "malformed_line")):
        assert q.get(ours, 0) == bad[theirs], ours
    assert q.get("malformed_code", 0) <= bad["malformed_code"]
    assert summary["ignored"]["unsupported_table"] == bad["unused_table"] + rows["cdm_source"]
