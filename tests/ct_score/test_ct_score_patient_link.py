"""One patient across EMR and imaging: DICOM PatientID = an MRN of the FHIR fixture.

Real ingest of tests/fixtures/emr/fhir_population (Spark), real DICOM files
indexed by the DICOM index (Spark), the link job (Spark), CT scoring (Ray +
ONNX Runtime). Then the cohort restricted to patients with CT findings and the
worklist. Which series belong to whom is known from how the files were written.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.settings import load_settings
from lake.commit import atomic_partition, read_manifest
from lake.keys import pseudonymise
from lake.paths import LakePaths
from lake.schemas import SCORES

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "emr" / "fhir_population"
KEY = "patient-link-tests-key-0001-not-secret"
AS_OF = "2024-03-31"
P1 = "5f0c8a2e-1b1d-4d6e-9a3f-0a1b2c3d4e01"   # MRN-1001, alive, hypertension since 2016
P5 = "5f0c8a2e-1b1d-4d6e-9a3f-0a1b2c3d4e05"   # MRN-1005, alive on the day, hypertension since 2019


def _read(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, partitioning=None) for f in sorted(Path(path).glob("*.parquet"))])


@pytest.fixture(scope="module")
def linked(spark, ray_local, tiny_series_writer, tmp_path_factory) -> dict[str, Any]:
    from inference import ct
    from jobs import dicom_index, emr_features, emr_ingest, imaging_link

    lake = tmp_path_factory.mktemp("linked_lake")
    dicom = tmp_path_factory.mktemp("linked_dicom")
    series = {
        "p1": tiny_series_writer(dicom / "a", 21, "20240105", patient_id="MRN-1001"),
        "stranger": tiny_series_writer(dicom / "b", 22, "20240110", patient_id="MRN-9999"),
        "anonymous": tiny_series_writer(dicom / "c", 23, "20240115", nodule=False, patient_id=""),
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY)
        settings = load_settings({"lake.root": str(lake), "spark.master": "local[2]",
                                  "spark.shuffle_partitions": 2})
        emr_ingest.run(settings, FIXTURES, "fhir")
        emr_features.run(settings, AS_OF)
        dicom_index.run(settings, dicom)
        link = imaging_link.run(settings)
        ct_run = ct.score(settings, AS_OF)
    key = KEY.encode()
    return {"lake": lake, "settings": settings, "link": link, "ct_run": ct_run,
            "series": {name: pseudonymise(key, rec["series_instance_uid"]) for name, rec in series.items()},
            "p1": pseudonymise(key, P1), "p5": pseudonymise(key, P5)}


def test_link_table_joins_by_mrn_and_counts_the_unlinked(linked) -> None:
    lp = LakePaths(linked["lake"])
    rows = {r["series_key"]: r for r in _read(lp.imaging_link).to_pylist()}
    s = linked["series"]
    assert set(rows) == set(s.values())  # every series keeps its row, linked or not
    assert (rows[s["p1"]]["patient_key"], rows[s["p1"]]["link_status"]) == (linked["p1"], "linked")
    assert (rows[s["stranger"]]["patient_key"], rows[s["stranger"]]["link_status"]) == (None, "mrn_not_in_emr")
    assert (rows[s["anonymous"]]["patient_key"], rows[s["anonymous"]]["link_status"]) == (None, "no_patient_id")
    stage = json.loads((Path(linked["link"]["run_dir"]) / "ledger.json").read_text())["stages"]["imaging_link"]
    assert stage["balanced"] and stage["records_in"] == 3 and stage["records_out"] == 1
    assert stage["ignored"] == {"mrn_not_in_emr": 1, "no_patient_id": 1}


def test_findings_carry_the_emr_patient_key(linked) -> None:
    lp = LakePaths(linked["lake"])
    findings = _read(lp.findings("ct_nodule", AS_OF)).to_pylist()
    s = linked["series"]
    mine = [f for f in findings if f["series_key"] == s["p1"]]
    stranger = [f for f in findings if f["series_key"] == s["stranger"]]
    assert mine and {f["patient_key"] for f in mine} == {linked["p1"]}
    # The planted nodule of the unknown MRN is still found, kept, and belongs to no EMR patient.
    assert stranger and {f["patient_key"] for f in stranger} == {None}
    manifest = read_manifest(lp.findings("ct_nodule", AS_OF))
    assert manifest["patient_link"] == {"linked": 1, "mrn_not_in_emr": 1, "no_patient_id": 1}


def test_cohort_restricted_to_patients_with_ct_findings_returns_them(linked, monkeypatch) -> None:
    from inference import cohort

    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY)  # the key the lake was written with

    params = {"cohort_name": "htn-with-ct", "include_groups": ["hypertension"], "exclude_groups": [],
              "age_min_years": 18, "age_max_years": 90, "index_start": AS_OF, "index_end": AS_OF,
              "step_days": 30, "models": ["ct_nodule"], "require_ct_findings": True}
    groups = cohort.code_group_names(linked["settings"].extraction.code_groups_file)
    with_ct = cohort.define_cohort(params, groups)
    everyone = cohort.define_cohort({**params, "cohort_name": "htn-all", "require_ct_findings": False}, groups)
    lake = linked["lake"]
    assert cohort.select_members(lake, everyone, AS_OF).column("patient_key").to_pylist() == \
        sorted([linked["p1"], linked["p5"]])
    counts = cohort.write_index_date(lake, with_ct, AS_OF)
    part = LakePaths(lake).cohort("htn-with-ct") / f"index_date={AS_OF}"
    assert pq.read_table(part / "members.parquet").column("patient_key").to_pylist() == [linked["p1"]]
    kept = pq.read_table(part / "findings.parquet").to_pylist()
    assert kept and {f["patient_key"] for f in kept} == {linked["p1"]}
    assert counts["members"] == 1 and counts["findings"] == len(kept)
    with pytest.raises(cohort.CohortDefinitionError, match="require_ct_findings"):
        cohort.define_cohort({**params, "models": ["emr_risk"]}, groups)


def test_worklist_puts_risk_heads_beside_ct_findings(linked, monkeypatch) -> None:
    from inference import worklist
    from lake.schemas import SCREENING

    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY)  # the key the lake was written with

    lp = LakePaths(linked["lake"])
    day = dt.date.fromisoformat(AS_OF)
    prov = {"model": "emr_risk", "model_version": "1", "engine_fingerprint": "ort-fp32-test",
            "precision": "fp32", "run_id": "scores-run"}
    scores = pa.Table.from_pylist([{"patient_key": k, "as_of": day, **prov, "score_t2d": t, "score_ckd": c,
                                    "score_hf": 0.1} for k, t, c in ((linked["p1"], 0.8, 0.2),
                                                                     (linked["p5"], 0.3, 0.7))], schema=SCORES)
    listed = pa.Table.from_pylist([
        {"patient_key": linked["p1"], "as_of": day, "head": "t2d", "score": 0.8, "rank": 1,
         "criterion": "threshold>=0.5", **prov},
        {"patient_key": linked["p5"], "as_of": day, "head": "ckd", "score": 0.7, "rank": 1,
         "criterion": "threshold>=0.5", **prov}], schema=SCREENING)
    with atomic_partition(lp.scores("emr_risk", AS_OF), {"run_id": "scores-run"}) as staging:
        pq.write_table(scores, staging / "part-00000.parquet")
    with atomic_partition(lp.screening(AS_OF), {"run_id": "scores-run"}) as staging:
        pq.write_table(listed, staging / "part-00000.parquet")
    final, counts = worklist.build(lp.root, AS_OF)
    rows = {r["patient_key"]: r for r in _read(final).to_pylist()}
    assert set(rows) == {linked["p1"], linked["p5"]}
    p1, p5 = rows[linked["p1"]], rows[linked["p5"]]
    assert p1["risk_heads"] == ["t2d"] and p1["ct_findings"] >= 1 and p1["ct_series"] == 1
    assert {f["series_key"] for f in p1["ct_findings_list"]} == {linked["series"]["p1"]}
    assert p5["risk_heads"] == ["ckd"] and p5["ct_findings"] == 0 and p5["ct_max_diameter_mm"] is None
    assert p5["score_ckd"] == pytest.approx(0.7)
    stranger = sum(1 for f in _read(lp.findings("ct_nodule", AS_OF)).to_pylist() if f["patient_key"] is None)
    assert counts["unlinked_findings"] == stranger > 0
    assert counts["with_both"] == 1 and counts["not_in_population"] == 0


def test_worklist_leaves_out_findings_of_patients_outside_the_population() -> None:
    from inference.worklist import worklist_rows

    day = dt.date(2024, 3, 31)
    screening = pa.table({"patient_key": ["a"], "head": ["t2d"]})
    scores = pa.table({"patient_key": ["a"], "score_t2d": pa.array([0.9], pa.float32()),
                       "score_ckd": pa.array([0.1], pa.float32()), "score_hf": pa.array([0.1], pa.float32())})
    findings = pa.table({"patient_key": ["dead", "a", None], "series_key": ["s9", "s1", "s2"],
                         "finding_id": pa.array([1, 1, 1], pa.int32()), "diameter_mm": [6.0, 8.0, 5.0],
                         "max_prob": pa.array([0.9, 0.8, 0.7], pa.float32())})
    table, counts = worklist_rows(screening, scores, findings, population={"a", "b"}, as_of=day)
    assert table.column("patient_key").to_pylist() == ["a"]
    assert counts["not_in_population"] == 1 and counts["unlinked_findings"] == 1
    assert table.to_pylist()[0]["ct_max_diameter_mm"] == 8.0
