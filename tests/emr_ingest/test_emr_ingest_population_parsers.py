"""Deaths, MRNs and observation periods as the parsers read them (one record at a time)."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from emr_ingest_support import FIXTURES, INGEST_KEY

from lake.keys import mrn_key
from preprocessing.fhir import parse_fhir_line, parse_fhir_resource
from preprocessing.omop import parse_omop_row

PATIENTS = [json.loads(line) for line in
            (Path(FIXTURES) / "fhir_population" / "Patient.000.ndjson").read_text().splitlines()]


def _patient(**changes):
    res = json.loads(json.dumps(PATIENTS[0]))
    res.update(changes)
    return res


def test_synthea_patient_gives_its_mr_identifier_and_death(ctx) -> None:
    p1 = parse_fhir_line(json.dumps(PATIENTS[0]), ctx, "Patient.000.ndjson")
    assert p1.status == "ok" and p1.death_date is None
    assert p1.mrn_key == mrn_key(INGEST_KEY.encode(), "MRN-1001")
    p2 = parse_fhir_line(json.dumps(PATIENTS[1]), ctx, "Patient.000.ndjson")
    assert p2.death_date == dt.date(2022, 11, 14)


def test_deceased_boolean_is_dated_by_the_last_update_else_the_export(ctx) -> None:
    with_update = parse_fhir_resource(_patient(deceasedBoolean=True,
                                               meta={"lastUpdated": "2021-07-08T23:30:00-02:00"}), ctx)
    assert with_update.death_date == dt.date(2021, 7, 9)  # 01:30 UTC the next day
    without = parse_fhir_resource(_patient(deceasedBoolean=True), ctx)
    assert without.death_date == ctx.today
    alive = parse_fhir_resource(_patient(deceasedBoolean=False), ctx)
    assert alive.status == "ok" and alive.death_date is None


def test_impossible_deaths_are_quarantined_with_a_reason(ctx) -> None:
    future = parse_fhir_resource(_patient(deceasedDateTime="2099-01-01"), ctx)
    assert (future.status, future.reason) == ("quarantine", "future_date")
    before_birth = parse_fhir_resource(_patient(deceasedDateTime="1950-01-01"), ctx)
    assert (before_birth.status, before_birth.reason) == ("quarantine", "invalid_date")
    garbled = parse_fhir_resource(_patient(deceasedDateTime="last tuesday"), ctx)
    assert (garbled.status, garbled.reason) == ("quarantine", "invalid_date")


def test_only_a_current_mr_identifier_is_an_mrn(ctx) -> None:
    ids = PATIENTS[0]["identifier"]
    mr = next(i for i in ids if i.get("type", {}).get("coding", [{}])[0].get("code") == "MR")
    old = {**mr, "use": "old", "value": "OLD-1"}
    assert parse_fhir_resource(_patient(identifier=[old, mr]), ctx).mrn_key == \
        mrn_key(INGEST_KEY.encode(), "MRN-1001")
    no_mr = [i for i in ids if i is not mr]
    assert parse_fhir_resource(_patient(identifier=no_mr), ctx).mrn_key is None


def test_omop_death_and_observation_period_rows(ctx) -> None:
    death = parse_omop_row("death", {"person_id": "2", "death_date": "2023-02-01", "death_datetime": None}, ctx)
    assert (death.status, death.death_date, death.is_patient) == ("ok", dt.date(2023, 2, 1), False)
    period = parse_omop_row("observation_period", {
        "observation_period_id": "9", "person_id": "3", "observation_period_start_date": "2005-01-01",
        "observation_period_end_date": "2019-12-31"}, ctx)
    assert (period.period_start, period.period_end) == (dt.date(2005, 1, 1), dt.date(2019, 12, 31))
    backwards = parse_omop_row("observation_period", {
        "observation_period_id": "10", "person_id": "3", "observation_period_start_date": "2020-01-01",
        "observation_period_end_date": "2019-12-31"}, ctx)
    assert (backwards.status, backwards.reason) == ("quarantine", "invalid_period")
    person = parse_omop_row("person", {"person_id": "7", "gender_concept_id": "8507", "year_of_birth": "1962",
                                       "person_source_value": " MRN-2007 "}, ctx)
    assert person.mrn_key == mrn_key(INGEST_KEY.encode(), "MRN-2007")
