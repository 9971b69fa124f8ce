"""FHIR and OMOP record parsers: one raw record in, one outcome out, identifiers hashed."""
from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from emr_ingest_support import INGEST_KEY, make_ctx

from lake.keys import pseudonymise
from preprocessing.emr_record import RECORDS, parse_datetime_us, records_to_arrow
from preprocessing.fhir import parse_fhir_line
from preprocessing.omop import decimal_id, parse_omop_row, table_name

PID = "b1f6c3a2-5e0d-4c1a-9a51-6f0e2d7c9a11"
SUBJ = {"reference": f"Patient/{PID}"}


def us(iso: str) -> int:
    return parse_datetime_us(iso)


def line(**res) -> str:
    return json.dumps(res)


@pytest.mark.parametrize("value, expected", [
    ("2019-03-04T09:15:00-05:00", "2019-03-04T14:15:00+00:00"),
    ("2019-03-04T09:15:00Z", "2019-03-04T09:15:00+00:00"),
    ("2019-03-04T09:15:00.123456789+01:00", "2019-03-04T08:15:00.123456+00:00"),
    ("2019-03-04T09:15:00", "2019-03-04T09:15:00+00:00"),      # no offset: read as UTC
    ("2019-03-04", "2019-03-04T00:00:00+00:00"), ("2019-03", "2019-03-01T00:00:00+00:00"),
    ("2019", "2019-01-01T00:00:00+00:00"), ("20190304", "2019-03-04T00:00:00+00:00"),
    ("2019-03-04 10:00:00", "2019-03-04T10:00:00+00:00"),
])
def test_datetimes_are_utc(value, expected):
    got = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=parse_datetime_us(value))
    assert got.isoformat() == expected


@pytest.mark.parametrize("value", ["2019-13-01", "yesterday", "", "2019-02-30", 20190304])
def test_bad_datetimes_raise(value):
    with pytest.raises((ValueError, TypeError)):
        parse_datetime_us(value)


def test_patient(ctx):
    r = parse_fhir_line(line(resourceType="Patient", id=PID, gender="female", birthDate="1978-11-02",
                             name=[{"family": "Schowalter414", "given": ["Marisela17"]}]), ctx)
    assert (r.status, r.is_patient, r.sex, r.birth_date) == ("ok", True, "F", dt.date(1978, 11, 2))
    assert r.patient_key == pseudonymise(INGEST_KEY.encode(), PID)
    assert r.source_ref == pseudonymise(INGEST_KEY.encode(), f"Patient/{PID}")
    assert parse_fhir_line(line(resourceType="Patient", id="x", gender="other"), ctx).sex == "U"


def test_pseudonyms_are_stable_per_key():
    a, b, other = make_ctx(), make_ctx(), make_ctx(key="another-key-entirely-0002")
    raw = line(resourceType="Patient", id=PID, birthDate="1970-01-01")
    assert parse_fhir_line(raw, a).patient_key == parse_fhir_line(raw, b).patient_key
    assert parse_fhir_line(raw, a).patient_key != parse_fhir_line(raw, other).patient_key
    cond = line(resourceType="Condition", id="c1", subject={"reference": f"urn:uuid:{PID}"},
                code={"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]},
                onsetDateTime="2019-01-01")
    assert parse_fhir_line(cond, a).patient_key == parse_fhir_line(raw, a).patient_key
    assert len(parse_fhir_line(raw, a).patient_key) == 32


def test_condition_keeps_every_coding_normalised(ctx):
    r = parse_fhir_line(line(
        resourceType="Condition", id="c1", subject=SUBJ, onsetDateTime="2015-05-05T10:00:00+02:00",
        code={"coding": [{"system": "http://snomed.info/sct", "code": "44054006"},
                         {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "e119"}]}), ctx)
    assert r.status == "ok"
    assert [(e.kind, e.code_system, e.code, e.assertion, e.code_groups, e.event_time_us) for e in r.events] == [
        # One Condition, one diagnosis: the SNOMED CT coding is in the groups too.
        ("dx", "snomed", "44054006", "affirmed", ["diabetes", "t2d"], us("2015-05-05T08:00:00Z")),
        ("dx", "icd10cm", "E11.9", "affirmed", ["diabetes", "t2d"], us("2015-05-05T08:00:00Z"))]


@pytest.mark.parametrize("res, reason", [
    ({"code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E11.99X"}]}}, "invalid_icd10cm"),
    ({"code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"},
                          {"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "E1.19"}]}}, "malformed_code"),
    ({"code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-9-cm", "code": "ABC"}]}}, "malformed_code"),
    ({"code": {"text": "diabetes"}}, "missing_code"),
    ({"subject": None}, "missing_subject"),
    ({"subject": {"display": "someone"}}, "missing_subject"),
    ({"subject": {"reference": "Group/7"}}, "invalid_subject"),
    ({"onsetDateTime": None, "recordedDate": None}, "missing_date"),
    ({"onsetDateTime": "2019-02-30"}, "invalid_date"),
    ({"onsetDateTime": "2024-06-01"}, "future_date"),       # after the export's time
    ({"id": None}, "missing_id"),
    ({"resourceType": None}, "missing_resource_type"),
])
def test_condition_quarantine_reasons(ctx, res, reason):
    base = {"resourceType": "Condition", "id": "c9", "subject": SUBJ, "onsetDateTime": "2019-01-01",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I10"}]}}
    base.update(res)
    r = parse_fhir_line(json.dumps({k: v for k, v in base.items() if v is not None}), ctx)
    assert (r.status, r.reason) == ("quarantine", reason)
    assert PID not in (r.detail or "") and "I10" not in (r.detail or "")


def test_refuted_condition_is_negated_and_entered_in_error_ignored(ctx):
    base = {"resourceType": "Condition", "id": "c1", "subject": SUBJ, "onsetDateTime": "2019-01-01",
            "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10-cm", "code": "I50.9"}]}}
    refuted = dict(base, verificationStatus={"coding": [{"code": "refuted"}]})
    assert parse_fhir_line(json.dumps(refuted), ctx).events[0].assertion == "negated"
    err = dict(base, verificationStatus={"coding": [{"code": "entered-in-error"}]})
    assert (parse_fhir_line(json.dumps(err), ctx).status,
            parse_fhir_line(json.dumps(err), ctx).reason) == ("ignored", "entered_in_error")


@pytest.mark.parametrize("raw, reason", [
    ('{"resourceType": "Condition", "id": "c1", "code": {"coding": [', "malformed_json"),
    ("[1, 2, 3]", "malformed_json"),
    ("not json at all", "malformed_json"),
])
def test_malformed_lines_are_quarantined_with_a_line_hash(ctx, raw, reason):
    r = parse_fhir_line(raw, ctx, "Condition.000.ndjson")
    assert (r.status, r.reason, r.resource_type) == ("quarantine", reason, "Condition")
    assert r.source_ref == "line:" + pseudonymise(INGEST_KEY.encode(), raw)
    assert "Condition.000.ndjson" in r.detail


def test_blank_and_unsupported_lines_are_ignored_by_rule(ctx):
    assert parse_fhir_line("   ", ctx, "Claim.ndjson").reason == "blank_line"
    r = parse_fhir_line(line(resourceType="Claim", id="k1", patient=SUBJ), ctx)
    assert (r.status, r.reason, r.resource_type) == ("ignored", "unsupported_resource", "Claim")


def test_observation_quantity_and_blood_pressure_panel(ctx):
    r = parse_fhir_line(line(resourceType="Observation", id="o1", subject=SUBJ, status="final",
                             effectiveDateTime="2019-03-04T09:15:00-05:00",
                             code={"coding": [{"system": "http://loinc.org", "code": "4548-4"}]},
                             valueQuantity={"value": 7.2, "unit": "%"}), ctx)
    assert [(e.kind, e.code_system, e.code, e.value, e.unit) for e in r.events] == [("obs", "loinc", "4548-4", 7.2, "%")]
    bp = parse_fhir_line(line(
        resourceType="Observation", id="o2", subject=SUBJ, effectiveDateTime="2020-02-29",
        code={"coding": [{"system": "http://loinc.org", "code": "85354-9"}]},
        component=[{"code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                    "valueQuantity": {"value": 142, "unit": "mm[Hg]"}},
                   {"code": {"coding": [{"system": "http://loinc.org", "code": "8462-4"}]},
                    "valueQuantity": {"value": 88, "code": "mm[Hg]"}}]), ctx)
    assert [(e.code, e.value, e.unit) for e in bp.events] == [("8480-6", 142.0, "mm[Hg]"), ("8462-4", 88.0, "mm[Hg]")]


@pytest.mark.parametrize("extra, status, reason", [
    ({}, "quarantine", "missing_value"),
    ({"valueQuantity": {"value": "high"}}, "quarantine", "invalid_value"),
    ({"valueQuantity": {"value": True}}, "quarantine", "invalid_value"),
    ({"valueCodeableConcept": {"coding": [{"code": "266919005"}]}}, "ignored", "non_numeric_value"),
    ({"valueQuantity": {"value": 5}, "code": {"text": "glucose"}}, "quarantine", "missing_code"),
])
def test_observation_outcomes(ctx, extra, status, reason):
    res = {"resourceType": "Observation", "id": "o3", "subject": SUBJ, "effectiveDateTime": "2020-01-01",
           "code": {"coding": [{"system": "http://loinc.org", "code": "2339-0"}]}}
    res.update(extra)
    r = parse_fhir_line(json.dumps(res), ctx)
    assert (r.status, r.reason) == (status, reason)


def _doc(text: str | None, **extra) -> str:
    att = {"contentType": "text/plain; charset=utf-8"}
    if text is not None:
        att["data"] = base64.b64encode(text.encode()).decode()
    res = {"resourceType": "DocumentReference", "id": "d1", "status": "current", "subject": SUBJ,
           "date": "2021-06-10T14:00:00.000-00:00", "content": [{"attachment": att}]}
    res.update(extra)
    return json.dumps(res)


def test_document_reference_codes_with_assertions_and_no_text(ctx):
    note = "Marisela17 has E11.9. Denies I50.9. Family history of I10."
    r = parse_fhir_line(_doc(note), ctx)
    assert [(e.kind, e.code, e.assertion) for e in r.events] == [
        ("dx_text", "E11.9", "affirmed"), ("dx_text", "I50.9", "negated"), ("dx_text", "I10", "family")]
    assert all(e.event_time_us == us("2021-06-10T14:00:00Z") for e in r.events)
    assert "Marisela17" not in repr(r)
    empty = parse_fhir_line(_doc("Nothing coded."), ctx)
    assert (empty.status, empty.events) == ("ok", [])


@pytest.mark.parametrize("raw, status, reason", [
    (_doc(None), "quarantine", "missing_attachment"),
    (_doc("x", content=[]), "quarantine", "missing_attachment"),
    (_doc("x", content=[{"attachment": {"contentType": "text/plain", "data": "%%%"}}]), "quarantine",
     "undecodable_attachment"),
    (_doc("x", content=[{"attachment": {"contentType": "application/pdf", "data": "JVBERi0="}}]),
     "ignored", "unsupported_attachment"),
])
def test_document_reference_outcomes(ctx, raw, status, reason):
    r = parse_fhir_line(raw, ctx)
    assert (r.status, r.reason) == (status, reason)


def test_encounter_type_or_class(ctx):
    r = parse_fhir_line(line(resourceType="Encounter", id="e1", subject=SUBJ, status="finished",
                             period={"start": "2020-02-29T23:30:00-08:00"},
                             **{"class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                                          "code": "EMER"}}), ctx)
    (e,) = r.events
    assert (e.kind, e.code_system, e.code, e.event_time_us) == ("encounter", "actcode", "EMER",
                                                                us("2020-03-01T07:30:00Z"))


def test_records_to_arrow_schema(ctx):
    recs = [parse_fhir_line(_doc("E11.9"), ctx), parse_fhir_line("{", ctx, "Condition.ndjson"),
            parse_fhir_line(line(resourceType="Patient", id=PID, birthDate="1970-01-01"), ctx)]
    batch = records_to_arrow(recs, [0, 1, 2])
    assert batch.schema == RECORDS
    rows = batch.to_pylist()
    assert rows[0]["events"][0]["code"] == "E11.9" and rows[0]["events"][0]["event_time"].year == 2021
    assert rows[2]["birth_date"] == dt.date(1970, 1, 1)


# --- OMOP ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, table", [("person.csv", "person"), ("PERSON.csv", "person"),
                                         ("measurement.parquet", "measurement"), ("note/", "note"),
                                         ("condition_occurrence.csv.gz", "condition_occurrence")])
def test_table_name(name, table):
    assert table_name(name) == table


@pytest.mark.parametrize("value, expected", [("42", "42"), ("00042", "42"), ("42.0", "42"), (" 7 ", "7"),
                                             ("", None), (None, None)])
def test_decimal_id(value, expected):
    assert decimal_id(value) == expected


def test_person_key_is_the_decimal_person_id(ctx):
    r = parse_omop_row("person", {"person_id": "0042", "gender_concept_id": "8532", "year_of_birth": "1978",
                                  "month_of_birth": "11", "day_of_birth": "2"}, ctx)
    assert (r.status, r.sex, r.birth_date) == ("ok", "F", dt.date(1978, 11, 2))
    assert r.patient_key == pseudonymise(INGEST_KEY.encode(), "42")


@pytest.mark.parametrize("row, expected", [
    ({"condition_source_value": "E11.9", "condition_concept_id": "201826"}, ("icd10cm", "E11.9")),
    ({"condition_source_value": "e119", "condition_concept_id": "201826"}, ("icd10cm", "E11.9")),
    ({"condition_source_value": "250.00", "condition_concept_id": "201826"}, ("icd9cm", "250.00")),
    ({"condition_source_value": "40055000", "condition_concept_id": "4229440"}, ("omop", "4229440")),
    ({"condition_source_value": "", "condition_concept_id": "0",
      "condition_source_concept_id": "45576876"}, ("omop", "45576876")),
])
def test_condition_occurrence_codes(ctx, row, expected):
    base = {"condition_occurrence_id": "1", "person_id": "1", "condition_start_date": "2015-05-05"}
    r = parse_omop_row("condition_occurrence", {**base, **row}, ctx)
    assert r.status == "ok"
    assert (r.events[0].code_system, r.events[0].code) == expected


@pytest.mark.parametrize("table, row, status, reason", [
    ("condition_occurrence", {"condition_source_value": "E11.99X"}, "quarantine", "invalid_icd10cm"),
    ("condition_occurrence", {"condition_concept_id": "0", "condition_source_value": ""}, "quarantine",
     "missing_code"),
    ("condition_occurrence", {"person_id": ""}, "quarantine", "missing_subject"),
    ("condition_occurrence", {"condition_occurrence_id": ""}, "quarantine", "missing_id"),
    ("condition_occurrence", {"condition_start_date": "2030-01-01"}, "quarantine", "future_date"),
    ("condition_occurrence", {"condition_start_date": "n/a"}, "quarantine", "invalid_date"),
    ("measurement", {"value_as_number": ""}, "quarantine", "missing_value"),
    ("measurement", {"value_as_number": "abc"}, "quarantine", "invalid_value"),
    ("measurement", {"value_as_number": "", "value_as_concept_id": "4181412"}, "ignored", "non_numeric_value"),
    ("observation", {"value_as_number": ""}, "ignored", "non_numeric_value"),
    ("drug_exposure", {}, "ignored", "unsupported_table"),
])
def test_omop_outcomes(ctx, table, row, status, reason):
    base = {f"{table}_id": "5", "person_id": "1", "condition_concept_id": "201826",
            "condition_start_date": "2015-05-05", "condition_source_value": "E11.9",
            f"{table}_concept_id": "3004410", f"{table}_date": "2019-03-04", "value_as_number": "7.2",
            f"{table}_source_value": "4548-4"}
    r = parse_omop_row(table, {**base, **row}, ctx)
    assert (r.status, r.reason) == (status, reason)


def test_omop_measurement_and_note(ctx):
    m = parse_omop_row("measurement", {"measurement_id": "301", "person_id": "1", "measurement_concept_id": "3004410",
                                       "measurement_datetime": "2019-03-04 09:15:00", "value_as_number": "7.2",
                                       "measurement_source_value": "4548-4", "unit_source_value": "%"}, ctx)
    assert [(e.kind, e.code_system, e.code, e.value, e.unit, e.event_time_us) for e in m.events] == [
        ("obs", "loinc", "4548-4", 7.2, "%", us("2019-03-04T09:15:00Z"))]
    n = parse_omop_row("note", {"note_id": "9", "person_id": "1", "note_date": "2021-06-10",
                                "note_text": "Rosalyn584: h/o I63.9; E66.9 today"}, ctx)
    assert [(e.kind, e.code, e.assertion) for e in n.events] == [("dx_text", "I63.9", "history"),
                                                                 ("dx_text", "E66.9", "affirmed")]
    assert "Rosalyn584" not in repr(n)


def test_omop_cut_off_rows_and_unreadable_source_values(ctx):
    cut = parse_omop_row("measurement", {"measurement_id": "7", "person_id": "1"}, ctx, malformed=True)
    assert (cut.status, cut.reason) == ("quarantine", "malformed_line")
    assert cut.source_ref == pseudonymise(INGEST_KEY.encode(), "measurement/7")
    junk = parse_omop_row("condition_occurrence", {"condition_occurrence_id": "8", "person_id": "1",
                                                   "condition_start_date": "2019-01-01",
                                                   "condition_source_value": "N18-3",
                                                   "condition_concept_id": "0"}, ctx)
    assert (junk.status, junk.reason) == ("quarantine", "malformed_code")
