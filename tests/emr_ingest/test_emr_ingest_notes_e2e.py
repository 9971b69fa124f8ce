"""Diagnoses from notes alone, through the real Spark ingest and features jobs.

tests/fixtures/notes/synthea_fhir is a FHIR Bulk export in Synthea's layout
with no Condition file: everything known about the four patients' diseases
is in their DocumentReference notes.

- 4e01: notes say "presenting with diabetes mellitus type 2", later "history
  of ... diabetes mellitus type 2" and "presenting with chronic kidney disease
  stage 3" → prevalent for t2d and ckd.
- 4e02: "No diabetes", CKD "ruled out", both in the Family History section → neither.
- 4e03: "Possible type 2 diabetes", "Rule out chronic kidney disease",
  "screening for chronic kidney disease", prediabetes → neither.
- 4e04: literal codes "E11.9 ruled out", "Possible N18.3", "At risk for type 2
  diabetes" → neither.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from emr_ingest_support import INGEST_KEY, ingest

from lake.commit import read_manifest
from lake.keys import pseudonymise

EXPORT = Path(__file__).resolve().parents[1] / "fixtures" / "notes" / "synthea_fhir"
AS_OF = "2023-12-31"
PID = "7a1c0e52-1d3b-4f0e-9f51-3b7f1c2d4e0{}"


def _key(i: int) -> str:
    return pseudonymise(INGEST_KEY.encode(), PID.format(i))


@pytest.fixture(scope="module")
def notes_lake(spark, tmp_path_factory):
    from jobs import emr_features

    assert not list(EXPORT.glob("Condition*")), "the export must carry no Condition file"
    out = ingest(spark, tmp_path_factory, "fhir", EXPORT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", INGEST_KEY)  # the key the lake was ingested with
        summary = emr_features.run(out["settings"], AS_OF)
    files = sorted(Path(summary["output"]).glob("*.parquet"))
    rows = pa.concat_tables([pq.read_table(f) for f in files]).to_pylist()
    return out, {r["patient_key"]: r for r in rows}


def test_notes_alone_make_the_patient_prevalent_for_t2d_and_ckd(notes_lake):
    _, timelines = notes_lake
    row = timelines[_key(1)]
    assert (row["prevalent_t2d"], row["prevalent_ckd"], row["prevalent_hf"]) == (True, True, False)


@pytest.mark.parametrize("patient", [2, 3, 4], ids=["negated-family-ruled-out", "uncertain-hypothetical",
                                                    "codes-ruled-out-possible"])
def test_negated_uncertain_family_and_ruled_out_mentions_never_do(notes_lake, patient):
    _, timelines = notes_lake
    row = timelines[_key(patient)]
    assert (row["prevalent_t2d"], row["prevalent_ckd"]) == (False, False)


def test_events_from_note_words(notes_lake):
    out, _ = notes_lake
    events = out["tables"][-1]["events"].to_pylist()
    text = {(e["patient_key"], e["code"], e["assertion"], tuple(e["code_groups"]))
            for e in events if e["kind"] == "dx_text" and e["code_system"] == "text"}
    assert (_key(1), "t2d", "affirmed", ("t2d",)) in text
    assert (_key(1), "ckd", "affirmed", ("ckd",)) in text
    assert (_key(2), "t2d", "family", ("t2d",)) in text
    assert (_key(2), "ckd", "negated", ("ckd",)) in text
    assert (_key(3), "t2d", "possible", ("t2d",)) in text
    coded = {(e["patient_key"], e["code"], e["assertion"]) for e in events
             if e["kind"] == "dx_text" and e["code_system"] == "icd10cm"}
    assert coded == {(_key(4), "E11.9", "negated"), (_key(4), "N18.3", "possible")}
    assert not any(e["kind"] == "dx" for e in events)
    manifest = read_manifest(Path(out["lake"]) / "emr" / "events")
    for name in ("note_targets", "note_context"):
        rules = Path(__file__).resolve().parents[2] / "conf" / f"{name}.yaml"
        assert manifest[f"{name}_sha256"] == hashlib.sha256(rules.read_bytes()).hexdigest()


def test_no_note_text_in_the_lake(notes_lake):
    out, _ = notes_lake
    sentences = set()
    for line in (EXPORT / "DocumentReference.000.ndjson").read_text().splitlines():
        text = base64.b64decode(json.loads(line)["content"][0]["attachment"]["data"]).decode()
        sentences.update(s.strip() for s in text.replace("\n", ".").split(".") if len(s.strip()) > 15)
    assert sentences
    lake = Path(out["lake"])
    for f in lake.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            leaked = [s for s in sentences if s.encode() in data]
            assert not leaked, f"note text in {f.relative_to(lake)}"


def test_demo_counts_the_diagnoses_that_came_from_notes(notes_lake):
    from medscreen.demo_checks import notes_diagnoses

    out, _ = notes_lake
    counts = notes_diagnoses(out["settings"])
    events = [e for e in out["tables"][-1]["events"].to_pylist() if e["kind"] == "dx_text"]
    counted = [e for e in events if e["assertion"] in ("affirmed", "history")]
    assert counts["counted"] == len(counted) > 0
    assert counts["codes"] == 0                    # the only codes (patient 4) are ruled out / possible
    assert counts["words"] == len(counted)
    assert counts["negated"] == sum(e["assertion"] == "negated" for e in events) > 0
    assert sum(counts[a] for a in ("affirmed", "history", "negated", "possible", "family",
                                   "hypothetical")) == len(events)


def test_spark_prevalence_of_text_diagnoses_equals_the_pure_rule(notes_lake):
    import datetime as dt

    from preprocessing.timelines import prevalence

    out, timelines = notes_lake
    events = out["tables"][-1]["events"].to_pylist()
    for key, row in timelines.items():
        mine = [e for e in events if e["patient_key"] == key]
        t_us = [int(e["event_time"].timestamp() * 1_000_000) for e in mine]
        known_us = [int(e["known_time"].timestamp() * 1_000_000) if e["known_time"] else t for e, t in zip(mine, t_us)]
        pure = prevalence(t_us, [e["kind"] for e in mine], [e["code_groups"] for e in mine],
                          [e["assertion"] for e in mine], dt.date.fromisoformat(AS_OF), known_time_us=known_us)
        assert {h: row[f"prevalent_{h}"] for h in pure} == pure
