"""The cohort DAG end to end: ``dag.test()`` of cohort_retrospective with form params on tiny data.

Real spark-submit (ingest, features per index date), real Ray + ONNX Runtime
scoring per index date (mapped tasks), then member selection. Membership is
checked against the lake's events and patients tables, read with plain
pyarrow and the cohort rules written out again here in Python.
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from dag_runs import parse_dag, pipeline_settings
from lake.commit import is_committed, read_manifest
from lake.paths import LakePaths

pytestmark = pytest.mark.slow

INDEX_DATES = ["2019-06-30", "2024-06-30"]
PARAMS = {
    "cohort_name": "htn-e2e",
    "include_groups": ["hypertension"],
    "exclude_groups": ["ckd"],
    "age_min_years": 40,
    "age_max_years": 85,
    "index_start": INDEX_DATES[0],
    "index_end": INDEX_DATES[1],
    "step_days": (dt.date.fromisoformat(INDEX_DATES[1]) - dt.date.fromisoformat(INDEX_DATES[0])).days,
    "models": ["emr_risk"],
    # The throwaway lake's vocabulary is not the exported model's: its engine cannot pass the gate.
    "force_ungated": True,
}
MAPPED = ("emr_features", "score_emr", "score_ct", "select_members")


@pytest.fixture(scope="module")
def cohort_run(tmp_path_factory, airflow_db, tiny_inputs):
    lake = tmp_path_factory.mktemp("cohort-e2e") / "lake"
    # EMR only: with no DICOM input the DICOM index is skipped, and CT is not among the models.
    with pipeline_settings(lake, tiny_inputs["emr"]):
        dag = parse_dag("cohort_retrospective")
        dag_run = dag.test(run_conf=PARAMS)
        tis = [(ti.task_id, ti.map_index, ti.state) for ti in dag_run.get_task_instances()]
    return {"lake": lake, "state": dag_run.state, "tis": tis}


def test_every_task_succeeds_mapped_ones_per_index_date(cohort_run) -> None:
    states: dict[str, dict[int, str]] = {}
    for task_id, map_index, state in cohort_run["tis"]:
        states.setdefault(task_id, {})[map_index] = state
    assert cohort_run["state"] == "success", cohort_run["tis"]
    for task_id in ("define", "emr_ingest", "engines_ensure", "summarize"):
        assert states[task_id] == {-1: "success"}, (task_id, states[task_id])
    # Skipped by design: no DICOM input (dicom_index) and CT not asked for (score_ct).
    assert states["dicom_index"] == {-1: "skipped"}
    for task_id in ("emr_features", "score_emr", "select_members"):
        assert states[task_id] == {0: "success", 1: "success"}, (task_id, states[task_id])
    assert states["score_ct"] == {0: "skipped", 1: "skipped"}


def _expected_members(lake: Path, index_date: str) -> set[str]:
    """The cohort rules again, in plain Python over the committed events and patients."""
    lp = LakePaths(lake)
    eod = dt.datetime.combine(dt.date.fromisoformat(index_date), dt.time.max, tzinfo=dt.timezone.utc)
    has: dict[str, set[str]] = {}
    events = ds.dataset(lp.events, format="parquet", exclude_invalid_files=True).to_table(
        columns=["patient_key", "event_time", "known_time", "kind", "assertion", "code_groups"]).to_pylist()
    for e in events:
        # The patient's own diagnosis (affirmed, or history of it), clinically dated and known by the day.
        known = e["known_time"] or e["event_time"]
        if (e["kind"] in ("dx", "dx_text") and e["assertion"] in ("affirmed", "history")
                and e["event_time"] <= eod and known <= eod):
            has.setdefault(e["patient_key"], set()).update(e["code_groups"] or [])
    day = dt.date.fromisoformat(index_date)
    out = set()
    for p in ds.dataset(lp.patients, format="parquet", exclude_invalid_files=True).to_table().to_pylist():
        groups = has.get(p["patient_key"], set())
        age = None if p["birth_date"] is None else (day - p["birth_date"]).days / 365.25
        if ("hypertension" in groups and "ckd" not in groups and age is not None
                and PARAMS["age_min_years"] <= age <= PARAMS["age_max_years"]):
            out.add(p["patient_key"])
    return out


def test_results_hold_definition_and_one_partition_per_index_date(cohort_run) -> None:
    lake = cohort_run["lake"]
    lp = LakePaths(lake)
    cohort_dir = lp.cohort(PARAMS["cohort_name"])
    definition = json.loads((cohort_dir / "definition.json").read_text())
    assert definition["include_groups"] == ["hypertension"] and definition["exclude_groups"] == ["ckd"]
    assert definition["index_start"] == INDEX_DATES[0] and definition["index_end"] == INDEX_DATES[1]
    assert sorted(p.name for p in cohort_dir.glob("index_date=*")) == [f"index_date={d}" for d in INDEX_DATES]
    summary = json.loads((cohort_dir / "summary.json").read_text())
    assert [d["index_date"] for d in summary["index_dates"]] == INDEX_DATES

    member_sets = []
    for d, counts in zip(INDEX_DATES, summary["index_dates"]):
        part = cohort_dir / f"index_date={d}"
        assert is_committed(part), part
        members = pq.read_table(part / "members.parquet")
        keys = members.column("patient_key").to_pylist()
        expected = _expected_members(lake, d)
        assert expected, f"the tiny cohort is empty at {d}: the test would prove nothing"
        assert sorted(keys) == sorted(expected), d
        assert counts["members"] == len(keys)
        member_sets.append(set(keys))
        # Scores are the ones scoring committed for that index date, joined per patient (a forced-ungated
        # run writes them under the trial namespace, never over published scores).
        scores = {r["patient_key"]: r["score_t2d"] for r in ds.dataset(
            lp.scores("emr_risk", d, trial=True), format="parquet", exclude_invalid_files=True).to_table(
            columns=["patient_key", "score_t2d"]).to_pylist()}
        timelines = set(ds.dataset(lp.timelines(d), format="parquet", exclude_invalid_files=True)
                        .to_table(columns=["patient_key"]).column("patient_key").to_pylist())
        scored = [r for r in members.to_pylist() if r["score_t2d"] is not None]
        assert scored and counts["members_scored"] == len(scored)
        for r in scored:
            assert r["patient_key"] in timelines
            assert r["score_t2d"] == pytest.approx(scores[r["patient_key"]])
        assert read_manifest(part)["scores_run_id"] == read_manifest(lp.scores("emr_risk", d, trial=True))["run_id"]
        assert not lp.scores("emr_risk", d).exists()
    # Point in time: diagnoses, exclusions and ages change between the index dates, and so do the members.
    assert member_sets[0] != member_sets[1]


def test_every_stage_ledger_balances(cohort_run) -> None:
    ledgers = {p.parent.name: json.loads(p.read_text())
               for p in LakePaths(cohort_run["lake"]).runs.glob("*/ledger.json")}
    # ingest, features per index date, scoring per index date
    assert len(ledgers) >= 1 + 2 * len(INDEX_DATES), sorted(ledgers)
    for name, ledger in ledgers.items():
        assert ledger["balanced"], name
        for stage in ledger["stages"].values():
            assert stage["records_in"] == (stage["records_out"] + stage["quarantined_total"]
                                           + stage.get("ignored_total", 0)), (name, stage)


def test_scoring_skips_only_the_night_to_night_drift_check(cohort_run) -> None:
    # Index dates years apart (and scored in any order) would fail a PSI check against
    # "the previous as-of"; every other QC check still ran and passed.
    metrics = [json.loads(p.read_text()) for p in LakePaths(cohort_run["lake"]).runs.glob("*score_emr*/metrics.json")]
    assert len(metrics) == len(INDEX_DATES)
    for m in metrics:
        assert m["qc"]["passed"] and m["qc"]["psi_checked"] is False and m["qc"]["checks"], m["qc"]
