"""The job's readers: OMOP Parquet/CSV as strings by column name, export time, input listing."""
from __future__ import annotations

import datetime as dt
import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from emr_ingest_support import FIXTURES

from jobs.emr_export import export_time_us, fingerprint, list_inputs, read_omop_table
from preprocessing.emr_record import parse_datetime_us
from preprocessing.omop import TABLE_COLUMNS


def test_omop_parquet_and_csv_read_as_strings_by_name(spark, tmp_path: Path):
    # Typed Parquet, upper-case names, a column order of its own, an extra column, one missing.
    table = pa.table({"EXTRA_COL": ["x"], "PERSON_ID": pa.array([42], pa.int64()),
                      "YEAR_OF_BIRTH": pa.array([1961], pa.int32()),
                      "birth_datetime": pa.array([dt.datetime(1961, 4, 12, 6, 30)], pa.timestamp("us")),
                      "gender_concept_id": pa.array([8507], pa.int64())})
    pq.write_table(table, tmp_path / "PERSON.parquet")
    cols = TABLE_COLUMNS["person"]
    rows = read_omop_table(spark, tmp_path / "PERSON.parquet", cols).collect()
    assert len(rows) == 1
    got = rows[0].asDict()
    assert got["person_id"] == "42" and got["year_of_birth"] == "1961" and got["gender_concept_id"] == "8507"
    assert got["birth_datetime"].startswith("1961-04-12") and got["month_of_birth"] is None
    assert "extra_col" not in got and "ord" in got
    # CSV: quoted multi-line note text stays one row.
    notes = read_omop_table(spark, FIXTURES / "omop" / "note.csv", TABLE_COLUMNS["note"]).collect()
    assert len(notes) == 2 and "\n" in notes[0]["note_text"]


def test_export_time_comes_from_the_export(tmp_path: Path):
    assert export_time_us(FIXTURES / "fhir", "fhir") == (parse_datetime_us("2023-12-31T23:00:00Z"),
                                                        "manifest.json transactionTime")
    t, src = export_time_us(FIXTURES / "omop", "omop")
    assert src == "cdm_source.cdm_release_date"
    assert t == parse_datetime_us("2024-01-01") - 1
    _, src = export_time_us(tmp_path, "fhir")
    assert src == "run time"
    (tmp_path / "manifest.json").write_text('{"transactionTime": "last tuesday"}')
    with pytest.raises(ValueError, match="export time"):
        export_time_us(tmp_path, "fhir")


def test_list_inputs_and_fingerprint(tmp_path: Path):
    (tmp_path / "Patient.000.ndjson").write_text("{}\n")
    with gzip.open(tmp_path / "Condition.001.ndjson.gz", "wt") as f:
        f.write("{}\n")
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / ".hidden.ndjson").write_text("{}\n")
    files = list_inputs(tmp_path, "fhir")
    assert [f.name for f in files] == ["Condition.001.ndjson.gz", "Patient.000.ndjson"]
    fp = fingerprint(tmp_path, files)
    assert [e["name"] for e in fp["files"]] == ["Condition.001.ndjson.gz", "Patient.000.ndjson"]
    assert len(fp["sha256"]) == 64
    with pytest.raises(ValueError, match="unknown EMR format"):
        list_inputs(tmp_path, "hl7v2")
    with pytest.raises(FileNotFoundError, match="no OMOP CDM tables"):
        list_inputs(tmp_path, "omop")


def test_bad_code_groups_file_fails_before_any_work(make_settings, tmp_path: Path):
    from jobs.emr_ingest import run
    from preprocessing.code_groups import CodeGroupsError

    bad = tmp_path / "groups.yaml"
    bad.write_text("version: t\nsources:\n  s: {title: a source, version: '1'}\n"
                   "groups:\n  stroke:\n    sources: [s]\n    icd10cm: [I64]\n")
    settings = make_settings(**{"extraction.code_groups_file": str(bad)})
    with pytest.raises(CodeGroupsError, match="'stroke'.*'I64'"):
        run(settings, FIXTURES / "fhir", "fhir")
    assert not (settings.lake.root / "emr").exists()
