"""Diagnoses from real exports count, correctly and at the right time.

Synthea-style FHIR Bulk (SNOMED CT only, status codings, recordedDate) and an
OMOP CDM 5.4 with its own vocabulary tables (tests/fixtures/emr/synthea_fhir,
omop_vocabulary), through the parsers, the Spark ingest and the Spark features
job, which must agree with the pure rules."""
from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest

from emr_ingest_support import FIXTURES, INGEST_KEY, ingest, make_ctx

from lake.keys import pseudonymise
from preprocessing.emr_record import parse_datetime_us, parse_known_time_us
from preprocessing.fhir import condition_assertion, parse_fhir_line
from preprocessing.omop import parse_omop_row
from preprocessing.timelines import timelines_table
from preprocessing.vocabulary import default_vocabulary

SUBJ = {"reference": "urn:uuid:b1f6c3a2-5e0d-4c1a-9a51-6f0e2d7c9a11"}
SCT = "http://snomed.info/sct"
T2D = {"coding": [{"system": SCT, "code": "44054006", "display": "Diabetes mellitus type 2 (disorder)"}]}


def _condition(ctx, **extra):
    res = {"resourceType": "Condition", "id": "c1", "subject": SUBJ, "code": T2D,
           "onsetDateTime": "2015-05-05T10:00:00-04:00", **extra}
    return parse_fhir_line(json.dumps({k: v for k, v in res.items() if v is not None}), ctx)


def _status(system: str, code: str) -> dict:
    return {"coding": [{"system": f"http://terminology.hl7.org/CodeSystem/{system}", "code": code}]}


@pytest.mark.parametrize("verification, clinical, expected", [
    ("confirmed", "active", "affirmed"), (None, None, "affirmed"), ("confirmed", "recurrence", "affirmed"),
    ("confirmed", "relapse", "affirmed"), ("confirmed", "inactive", "history"),
    ("confirmed", "remission", "history"), ("confirmed", "resolved", "history"), (None, "resolved", "history"),
    ("refuted", "active", "negated"), ("unconfirmed", "active", "possible"),
    ("provisional", None, "possible"), ("differential", "resolved", "possible"),
])
def test_fhir_status_rules(ctx, verification, clinical, expected):
    assert condition_assertion(verification, clinical) == expected
    r = _condition(ctx, verificationStatus=_status("condition-ver-status", verification) if verification else None,
                   clinicalStatus=_status("condition-clinical", clinical) if clinical else None)
    assert r.status == "ok" and [e.assertion for e in r.events] == [expected]
    assert r.events[0].code_groups == ["diabetes", "t2d"]  # SNOMED CT only, as Synthea writes it


def test_entered_in_error_is_not_an_event(ctx):
    r = _condition(ctx, verificationStatus=_status("condition-ver-status", "entered-in-error"))
    assert (r.status, r.reason, r.events) == ("ignored", "entered_in_error", [])


@pytest.mark.parametrize("value, expected", [
    ("2019", "2019-12-31T23:59:59.999999+00:00"), ("2019-03", "2019-03-31T23:59:59.999999+00:00"),
    ("2019-12", "2019-12-31T23:59:59.999999+00:00"), ("2020-02", "2020-02-29T23:59:59.999999+00:00"),
    ("2019-03-04", "2019-03-04T23:59:59.999999+00:00"), ("20190304", "2019-03-04T23:59:59.999999+00:00"),
    ("2019-03-04T09:15:00-05:00", "2019-03-04T14:15:00+00:00"),
])
def test_partial_dates_are_known_at_the_end_of_their_period(value, expected):
    got = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=parse_known_time_us(value))
    assert got.isoformat() == expected


def test_condition_known_time_is_the_recorded_date(ctx):
    r = _condition(ctx, onsetDateTime="2005", recordedDate="2018-07-01T11:30:00-04:00")
    e = r.events[0]
    assert e.event_time_us == parse_datetime_us("2005-01-01")
    assert e.known_time_us == parse_datetime_us("2018-07-01T15:30:00Z")
    # Without recordedDate the clinical time is the known time, a partial one at its end.
    e = _condition(ctx, onsetDateTime="2005").events[0]
    assert (e.event_time_us, e.known_time_us) == (parse_datetime_us("2005"), parse_datetime_us("2006") - 1)
    assert _condition(ctx, recordedDate="2019-02-30").reason == "invalid_date"
    assert _condition(ctx, recordedDate="2024-06-01").reason == "future_date"  # after the export


def test_observation_is_known_when_issued(ctx):
    obs = {"resourceType": "Observation", "id": "o1", "status": "final", "subject": SUBJ,
           "code": {"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
           "effectiveDateTime": "2019-03-04T09:00:00Z", "issued": "2019-03-06T12:00:00.000Z",
           "valueQuantity": {"value": 7.1, "unit": "%"}}
    e = parse_fhir_line(json.dumps(obs), ctx).events[0]
    assert (e.event_time_us, e.known_time_us) == (parse_datetime_us("2019-03-04T09:00:00Z"),
                                                  parse_datetime_us("2019-03-06T12:00:00Z"))


_ROW = {"condition_occurrence_id": "1", "person_id": "1", "condition_start_date": "2015-05-05"}


@pytest.mark.parametrize("row, system, code, concept_id, groups", [
    # No vocabulary tables: the concept sets' OMOP and SNOMED entries still apply.
    ({"condition_concept_id": "201826", "condition_source_value": "44054006"}, "omop", "201826", 201826,
     ["diabetes", "t2d"]),
    ({"condition_concept_id": "4112343", "condition_source_value": "44054006"}, "omop", "4112343", 4112343,
     ["diabetes", "t2d"]),  # standard concept in no set: the SNOMED source value decides
    ({"condition_concept_id": "316139", "condition_source_value": "I50.9"}, "icd10cm", "I50.9", 316139,
     ["heart_failure"]),
    # With the CDM's concept table: the standard concept's own SNOMED code on the event.
    ({"condition_concept_id": "201826", "_concept_vocabulary": "SNOMED", "_concept_code": "44054006",
      "_concept_standard": "S"}, "snomed", "44054006", 201826, ["diabetes", "t2d"]),
    # No standard concept in the row: the source concept 'Maps to' one.
    ({"condition_concept_id": "0", "condition_source_value": "4280", "condition_source_concept_id": "44821949",
      "_maps_to": "319835"}, "icd9cm", "428.0", 319835, ["heart_failure"]),
    # Mapped to no standard concept: the source concept stays the code, no concept_id.
    ({"condition_concept_id": "0", "condition_source_value": "LOCAL-XYZ",
      "condition_source_concept_id": "2000000001"}, "omop", "2000000001", None, []),
])
def test_omop_condition_standard_concept_first(ctx, row, system, code, concept_id, groups):
    r = parse_omop_row("condition_occurrence", {**_ROW, **row}, ctx)
    assert r.status == "ok", r.detail
    e = r.events[0]
    assert (e.code_system, e.code, e.concept_id, e.code_groups) == (system, code, concept_id, groups)
    # OMOP has no recorded time: known at the end of the condition's date.
    assert e.known_time_us == parse_datetime_us("2015-05-06") - 1


def test_omop_descendants_through_concept_ancestor():
    ctx = make_ctx()
    ctx.groups = ctx.groups.with_omop_descendants([("201826", "443732")])
    r = parse_omop_row("condition_occurrence", {**_ROW, "condition_concept_id": "443732"}, ctx)
    assert r.events[0].code_groups == ["diabetes", "t2d"]
    assert parse_omop_row("condition_occurrence", {**_ROW, "condition_concept_id": "443732"},
                          make_ctx()).events[0].code_groups == []


# --- the Spark jobs on the published formats ------------------------------------------------------

def _pk(source_id: str) -> str:
    return pseudonymise(INGEST_KEY.encode(), source_id)


@pytest.fixture(scope="module")
def synthea(spark, tmp_path_factory):
    return ingest(spark, tmp_path_factory, "fhir", FIXTURES / "synthea_fhir")


@pytest.fixture(scope="module")
def omop_vocab(spark, tmp_path_factory):
    return ingest(spark, tmp_path_factory, "omop", FIXTURES / "omop_vocabulary")


def _features(lake_result, as_of: dt.date, horizon_days: int = 365) -> dict[str, dict]:
    from jobs import emr_features
    from lake.paths import LakePaths

    settings = lake_result["settings"].model_copy(deep=True)
    settings.features.horizon_days = horizon_days
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", INGEST_KEY)  # the key the lake was ingested with
        summary = emr_features.run(settings, as_of.isoformat(), with_labels=True)
    import pyarrow.parquet as pq
    out = LakePaths(lake_result["lake"]).timelines(as_of)
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))]).to_pylist()
    rows = sorted(rows, key=lambda r: r["patient_key"])
    tables = lake_result["tables"][-1]
    from lake.commit import read_partition

    # The observation periods ingest wrote (FHIR: registration at the first known record).
    periods = read_partition(LakePaths(lake_result["lake"]).observation_periods)
    expected = timelines_table(tables["events"], tables["patients"], as_of, settings.features.lookback_days,
                               settings.features.max_tokens, horizon_days, periods=periods).to_pylist()
    assert rows == expected  # the Spark job and the pure rules agree
    assert summary["rows"] == len(rows)
    return {r["patient_key"]: r for r in rows}


def test_synthea_export_events_and_ledger(synthea):
    summary = synthea["summaries"][-1]
    events = synthea["tables"][-1]["events"]
    assert summary["ignored"] == {"entered_in_error": 1}
    assert summary["diagnoses"]["by_vocabulary"] == {"snomed": {"in_group": 8, "no_group": 3}}
    assert set(events.column("code_system").to_pylist()) == {"snomed"}
    assert events.column("known_time").null_count == 0 and events.column("concept_id").null_count == events.num_rows
    assert sorted(set(events.column("assertion").to_pylist())) == ["affirmed", "history", "negated", "possible"]


def test_synthea_snomed_diagnoses_make_patients_prevalent_and_labels_positive(synthea):
    rows = _features(synthea, dt.date(2021, 12, 31))
    p1, p2, p3 = (rows[_pk(f"a1c2e3f4-000{i}-4d5e-8f70-00000000000{i}")] for i in range(1, 4))
    assert (p1["prevalent_t2d"], p1["prevalent_ckd"], p1["prevalent_hf"]) == (True, True, False)
    assert (p2["prevalent_t2d"], p2["prevalent_hf"]) == (False, True)  # T2D only provisional
    assert (p3["prevalent_t2d"], p3["prevalent_ckd"], p3["prevalent_hf"]) == (False, False, True)
    # Patient 4's first record (its T2D) is from 2022-03-01: not yet registered, so no timeline.
    assert _pk("a1c2e3f4-0004-4d5e-8f70-000000000004") not in rows
    # Its SNOMED CKD diagnosis reaches the model as its group's token (SNOMED has no ICD category token).
    assert default_vocabulary().id_of("dx:ckd") in p1["tokens"]
    # Heart failure with an onset in "2005" was recorded on 2018-07-01: at the end of 2017 it was
    # not known (not prevalent), and it becomes known inside the horizon (a positive label).
    before = _features(synthea, dt.date(2017, 12, 31))
    assert (before[p3["patient_key"]]["prevalent_hf"], before[p3["patient_key"]]["label_hf"]) == (False, 1)
    assert before[p1["patient_key"]]["prevalent_t2d"] is True


def test_omop_cdm_with_vocabulary_tables(omop_vocab):
    summary = omop_vocab["summaries"][-1]
    events = omop_vocab["tables"][-1]["events"]
    # The vocabulary rows are counted (not patient records) and the ledger balances.
    assert summary["ignored"]["vocabulary_table"] == 9 + 3 + 7
    assert summary["counts"]["emr_ingest"]["balanced"]
    assert summary["diagnoses"]["standard_concept"] == {"mapped": 5, "not_mapped": 1}
    assert summary["diagnoses"]["by_vocabulary"] == {"icd9cm": {"in_group": 1, "no_group": 0},
                                                     "omop": {"in_group": 0, "no_group": 1},
                                                     "snomed": {"in_group": 3, "no_group": 1}}
    by_concept = dict(zip(events.column("concept_id").to_pylist(), events.column("code_groups").to_pylist()))
    assert by_concept[443732] == ["diabetes", "t2d"]  # a descendant of T2D through concept_ancestor
    assert by_concept[319835] == ["heart_failure"]    # 'Maps to' from the ICD-9-CM source concept
    rows = _features(omop_vocab, dt.date(2021, 12, 31))
    p1, p2, p3 = (rows[_pk(str(i))] for i in (1, 2, 3))
    assert (p1["prevalent_t2d"], p1["prevalent_ckd"], p1["prevalent_hf"]) == (True, True, False)
    assert (p2["prevalent_t2d"], p2["prevalent_ckd"], p2["prevalent_hf"]) == (True, False, True)
    assert not any(p3[f"prevalent_{h}"] for h in ("t2d", "ckd", "hf"))
