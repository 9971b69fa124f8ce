"""The audit's reading of identifiers and its matching, on small files in the published formats."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from medscreen.phi_audit import audit, format_table, read_identifiers

# OMOP CDM 5.4 LOCATION columns, in the CDM's order.
LOCATION_HEADER = ("location_id,address_1,address_2,city,state,zip,county,location_source_value,"
                   "country_concept_id,country_source_value,latitude,longitude")


def _inputs(tmp_path: Path) -> tuple[Path, Path]:
    fhir, omop = tmp_path / "fhir", tmp_path / "omop"
    fhir.mkdir()
    omop.mkdir()
    patient = {"resourceType": "Patient", "id": "b7c1e0e4-5a0f-4c59-9a55-2f1b1c0d9e11",
               "identifier": [{"system": "http://hl7.org/fhir/sid/us-ssn", "value": "999-44-1234"}],
               "name": [{"use": "official", "family": "Marrowby", "given": ["Ona", "Lise"], "prefix": ["Ms."]}],
               "telecom": [{"system": "phone", "value": "(555) 010-4477", "use": "home"}],
               "address": [{"line": ["77 Larkspur Court"], "city": "Ashbury", "state": "MA",
                            "postalCode": "01944"}],
               "birthDate": "1957-11-23"}
    (fhir / "Patient.000.ndjson").write_text(json.dumps(patient) + "\n")
    (omop / "person.csv").write_text("person_id,gender_concept_id,year_of_birth,person_source_value\n"
                                     "17,8532,1957,PSV-88812\n")
    (omop / "location.csv").write_text(LOCATION_HEADER + "\n1,9 Tern Wharf,,Dunmore,PA,18512,,LOC-4411,"
                                       "42046186,US,41.4,-75.6\n")
    return fhir, omop


def test_identifiers_are_read_from_fhir_and_omop(tmp_path: Path) -> None:
    fhir, omop = _inputs(tmp_path)
    ids = read_identifiers([fhir, omop])
    assert set(ids.sources) == {"fhir.id", "fhir.identifier", "fhir.name", "fhir.phone", "fhir.address",
                                "fhir.birthDate", "omop.person_source_value", "omop.location"}
    # person_id 17 is a row number, not specific enough to search for.
    assert "17" not in ids.by_first


def test_matching_is_whole_words_any_punctuation_and_masked(tmp_path: Path) -> None:
    fhir, omop = _inputs(tmp_path)
    lake = tmp_path / "lake"
    lake.mkdir()
    (lake / "ok.json").write_text(json.dumps({"note": "Ona met Lise", "count": 5550104,
                                              "word": "marrowbyish", "zip": "01944"}))
    (lake / "leak.log").write_text("line one\nrecord for marrowby, ona: phone 555.010.4477 dob 1957/11/23\n")
    pq.write_table(pa.table({"addr": [["x", "77 LARKSPUR CT."], ["9 tern wharf"]], "n": [1, 2]}),
                   lake / "part-0.parquet")
    result = audit(lake, [fhir, omop])
    where = {(f.file, f.where, f.kind) for f in result.findings}
    assert ("lake/leak.log", "line 2", "fhir.name") in where
    assert ("lake/leak.log", "line 2", "fhir.phone") in where
    assert ("lake/leak.log", "line 2", "fhir.birthDate") in where
    assert ("lake/part-0.parquet", "addr", "omop.location") in where
    # "77 LARKSPUR CT." is not "77 Larkspur Court"; given names alone, a postal code alone, part of
    # the phone number and a longer word that merely starts with the family name are no finding.
    assert not [f for f in result.findings if f.file == "lake/ok.json"]
    assert ("lake/part-0.parquet", "addr", "fhir.address") not in where
    table = format_table(result)
    for raw in ("marrowby", "larkspur", "4477", "tern", "1957"):
        assert raw not in table.lower()
