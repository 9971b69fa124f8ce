"""A backfill of the nightly DAG through Airflow 3's backfill machinery, started the way the UI starts one.

`make airflow`'s script runs Airflow standalone (scheduler, DAG processor,
triggerer, API server) on tiny generated EMR data; the test logs in as the
script's admin user, asks the REST API for the backfill's dry run (the UI's
"N runs will be triggered") and creates it (the UI's "Run Backfill"), then
lets the scheduler run all three dates to completion. The same dates are then
run directly through the medscreen CLI on a second lake from the same inputs:
the backfill's timelines, scores and screening lists must equal those row for
row. Engines are gated (the default fp32 ONNX Runtime engine is the reference
and passes its gate), so the lists are real outreach lists that publish checks.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
from pathlib import Path

import pytest

from dag_runs import admin_token, api, free_port, pipeline_env, run_script, script_env
from lake.commit import is_committed, partition_files, read_manifest
from lake.paths import LakePaths

pytestmark = pytest.mark.slow

AS_OF = ["2024-06-01", "2024-06-02", "2024-06-03"]
# Logical dates fall at the cron's 02:00 UTC, and the range is inclusive of logical
# dates: the end must reach 02:00 of the last as-of day (or the next midnight).
BACKFILL = {"dag_id": "nightly_screening", "from_date": "2024-06-01T00:00:00Z",
            "to_date": "2024-06-04T00:00:00Z", "max_active_runs": 1, "reprocess_behavior": "none",
            # EMR only (CT scoring skips), gated engines only: no force_ungated.
            "dag_run_conf": {"models": ["emr_risk"]}}
RUNS_TIMEOUT_S = 900
REPO = Path(__file__).resolve().parents[2]
# Differs between any two runs by design; every other column must match.
PROVENANCE = {"run_id"}


@pytest.fixture(scope="module")
def standalone(tmp_path_factory, tiny_inputs):
    home = tmp_path_factory.mktemp("airflow-standalone-home")
    lake = tmp_path_factory.mktemp("backfill") / "lake"
    # Inputs of our own (else the script falls back to the demo workdir's inputs).
    env = script_env(home, free_port(), lake, **pipeline_env(lake, tiny_inputs["emr"], tiny_inputs["dicom"]))
    env.pop("MEDSCREEN_INPUTS__DICOM_DIR", None)  # EMR only: the direct runs below do the same
    # One retry per task: a task whose start times out on a loaded machine is retried, and a
    # retried scoring task resumes its own run (its run id is derived from the DAG run and task).
    env["MEDSCREEN_AIRFLOW_RETRIES"] = "1"
    with run_script([], env, home / "standalone.log", timeout_s=300) as base:
        token = admin_token(base, home)
        deadline = time.monotonic() + 240
        while True:  # the DAG processor has to parse the DAG before it can be backfilled
            try:
                api(base, "/api/v2/dags/nightly_screening", token)
                break
            except urllib.error.HTTPError as err:
                if err.code != 404 or time.monotonic() > deadline:
                    raise
                time.sleep(2)
        # Unpaused on creation with catchup off, the nightly DAG first runs its latest complete
        # interval (yesterday), as it does for a new `make airflow` user; let that run finish.
        scheduled = _wait_for_runs(base, token, "scheduled", timeout_s=RUNS_TIMEOUT_S)
        yield {"base": base, "token": token, "lake": lake, "home": home, "scheduled": scheduled}


def _wait_for_runs(base: str, token: str, run_type: str, timeout_s: float) -> list[dict]:
    """The DAG's runs of ``run_type`` once at least one exists and all have finished (or at the timeout)."""
    path = f"/api/v2/dags/nightly_screening/dagRuns?run_type={run_type}&order_by=logical_date"
    deadline = time.monotonic() + timeout_s
    while True:
        runs = api(base, path, token)["dag_runs"]
        if (runs and all(r["state"] in ("success", "failed") for r in runs)) or time.monotonic() > deadline:
            return runs
        time.sleep(5)


def _post_retrying(base: str, path: str, token: str, body: dict) -> dict:
    """POST, retrying while the API answers 503 (SQLite busy under a running scheduler)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return api(base, path, token, body=body)
        except urllib.error.HTTPError as err:
            if err.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(3)


@pytest.fixture(scope="module")
def backfill(standalone):
    base, token = standalone["base"], standalone["token"]
    dry = _post_retrying(base, "/api/v2/backfills/dry_run", token, BACKFILL)
    created = _post_retrying(base, "/api/v2/backfills", token, BACKFILL)
    first = api(base, "/api/v2/dags/nightly_screening/dagRuns?run_type=backfill&order_by=logical_date",
                token)["dag_runs"]
    runs = _wait_for_runs(base, token, "backfill", timeout_s=RUNS_TIMEOUT_S)
    tis = {r["dag_run_id"]: api(base, f"/api/v2/dags/nightly_screening/dagRuns/{r['dag_run_id']}"
                                      "/taskInstances", token)["task_instances"] for r in runs}
    return {"dry": dry, "created": created, "first": first, "runs": runs, "tis": tis,
            "lake": standalone["lake"], "log": (standalone["home"] / "standalone.log"),
            "scheduled": [_day(r["logical_date"]) for r in standalone["scheduled"]]}


@pytest.fixture(scope="module")
def direct(tmp_path_factory, tiny_inputs, backfill):
    """The backfill's dates run directly through the CLI, in date order, on a lake of their own."""
    lake = tmp_path_factory.mktemp("direct") / "lake"
    script = textwrap.dedent(f"""
        from medscreen.cli import main
        lake = {str(lake)!r}
        steps = [["emr", "ingest", "--input", {str(tiny_inputs["emr"])!r}, "--format", "fhir", "--lake", lake]]
        for d in {AS_OF!r}:
            steps.append(["emr", "features", "--lake", lake, "--as-of", d])
        steps.append(["engines", "ensure", "--model", "emr_risk", "--lake", lake, "--as-of", {AS_OF[0]!r}])
        for d in {AS_OF!r}:
            steps.append(["score", "emr", "--lake", lake, "--as-of", d])
        for argv in steps:
            assert main(argv) == 0, argv
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDSCREEN_")}
    env.update(pipeline_env(lake, tiny_inputs["emr"]))
    env["RAY_AUTH_MODE"] = "disabled"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return LakePaths(lake)


def _rows(partition: Path) -> list[dict]:
    import pyarrow.parquet as pq

    rows = []
    for f in partition_files(partition):
        rows += pq.read_table(f, partitioning=None).drop_columns(
            [c for c in PROVENANCE if c in pq.read_schema(f).names]).to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _day(ts: str) -> str:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).date().isoformat()


def test_dry_run_and_backfill_create_one_run_per_as_of_date(backfill) -> None:
    assert sorted(_day(b["logical_date"]) for b in backfill["dry"]["backfills"]) == AS_OF
    assert backfill["created"]["max_active_runs"] == 1
    runs = backfill["first"]
    assert [_day(r["logical_date"]) for r in runs] == AS_OF
    for r in runs:
        assert r["run_type"] == "backfill" and r["conf"] == BACKFILL["dag_run_conf"], r
        # The logical date is the as-of date: the run's data interval is that day's.
        assert _day(r["data_interval_start"]) == _day(r["logical_date"])


def test_every_backfill_run_succeeds_one_at_a_time(backfill) -> None:
    runs = backfill["runs"]
    failed = {r["dag_run_id"]: {t["task_id"]: t["state"] for t in backfill["tis"][r["dag_run_id"]]}
              for r in runs if r["state"] != "success"}
    assert not failed, f"{failed}\n{backfill['log'].read_text()[-3000:]}"
    # max_active_runs=1: each run started after the previous one ended.
    spans = sorted((r["start_date"], r["end_date"]) for r in runs)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end, spans
    for r in runs:
        states = {t["task_id"]: t["state"] for t in backfill["tis"][r["dag_run_id"]]}
        assert states["emr_features"] == states["score_emr"] == states["publish"] == "success", states
        assert states["score_ct"] == "skipped", states


def test_backfill_writes_exactly_the_nightly_partitions(backfill, direct) -> None:
    lake = LakePaths(backfill["lake"])
    for d in AS_OF:
        for path in (lake.timelines(d), lake.scores("emr_risk", d), lake.screening(d),
                     lake.root / "reports" / "nightly_screening" / f"as_of={d}"):
            assert is_committed(path), path
        # Row for row what the CLI writes for the same date from the same inputs, gated engine.
        for ours, theirs in ((lake.timelines(d), direct.timelines(d)),
                             (lake.scores("emr_risk", d), direct.scores("emr_risk", d)),
                             (lake.screening(d), direct.screening(d))):
            mine = _rows(ours)
            assert mine == _rows(theirs), f"{ours.relative_to(lake.root)} differs from the direct CLI run"
            assert mine, f"{ours.relative_to(lake.root)} is empty: the comparison would prove nothing"
        scores = read_manifest(lake.scores("emr_risk", d))
        assert scores["engine"]["gate_passed"] is True and not scores["force_ungated"] and not scores["limit"]
        screening = read_manifest(lake.screening(d))
        assert screening["ledger"]["balanced"] and screening["scores_version"] == scores["version"]
    # Nothing but those dates, and no staging directory left behind by any run.
    for table in (lake.timelines(AS_OF[0]).parent, lake.scores("emr_risk", AS_OF[0]).parent,
                  lake.screening(AS_OF[0]).parent):
        written = {p.name for p in table.iterdir() if p.is_dir() and not p.name.startswith(".")}
        assert {f"as_of={d}" for d in AS_OF} <= written <= {f"as_of={d}" for d in AS_OF + backfill["scheduled"]}
    assert not [p for p in lake.root.rglob(".staging-*")]
    assert not (lake.root / "trial").exists()  # gated, unlimited runs: nothing under trial/
    # The shared events table was built by the first run only; the others found it current.
    assert len([p for p in lake.runs.iterdir() if "ingest" in p.name]) == 1
    # The published list stays the newest date's: a backfill never moves LATEST.json back.
    published = max(d for d in AS_OF + backfill["scheduled"] if is_committed(lake.screening(d)))
    latest = json.loads((lake.root / "screening" / "LATEST.json").read_text())
    assert latest["as_of"] == published and all(c["passed"] for c in latest["checks"].values())
