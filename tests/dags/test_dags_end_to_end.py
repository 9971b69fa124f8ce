"""The nightly DAG end to end on tiny generated data: real spark-submit, real Ray, real ONNX Runtime.

One as-of date runs through ``dag.test()`` in this process, a second (older)
date through the ``airflow dags test`` command — the contract `make airflow`
users rely on — on the same lake, as a backfill would. The same two dates are
then run directly through the medscreen CLI on a second lake from the same
inputs; both lakes must hold the same partitions with the same rows.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dag_runs import parse_dag, pipeline_settings
from lake.commit import is_committed
from lake.paths import LakePaths

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NIGHTLY = "2024-06-30"
BACKFILL = "2024-05-31"
# Provenance differs between any two runs by design; everything else must match.
PROVENANCE = {"run_id"}
# Gated engines, as in production: the default fp32 ONNX Runtime engine is the
# reference and passes its gate; a forced-ungated run would write under trial/
# and never be published.
CONF: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, airflow_db, tiny_inputs):
    """Run the DAG for two dates on lake_dag and the CLI for the same dates on lake_cli."""
    root = tmp_path_factory.mktemp("e2e")
    emr, dicom = tiny_inputs["emr"], tiny_inputs["dicom"]
    lake_dag, lake_cli = root / "lake_dag", root / "lake_cli"
    with pipeline_settings(lake_dag, emr, dicom):
        dag = parse_dag("nightly_screening")
        dag_run = dag.test(logical_date=dt.datetime.fromisoformat(NIGHTLY).replace(tzinfo=dt.timezone.utc),
                           run_conf=CONF)
        states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}

        cmd = [str(Path(sys.executable).parent / "airflow"), "dags", "test", "nightly_screening",
               BACKFILL, "--conf", json.dumps(CONF)]
        backfill = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=1500)

        script = textwrap.dedent(f"""
            from medscreen.cli import main
            lake = {str(lake_cli)!r}
            steps = [["emr", "ingest", "--input", {str(emr)!r}, "--format", "fhir", "--lake", lake],
                     ["dicom", "index", "--input", {str(dicom)!r}, "--lake", lake],
                     ["dicom", "link", "--lake", lake]]
            for d in ({NIGHTLY!r}, {BACKFILL!r}):
                steps.append(["emr", "features", "--lake", lake, "--as-of", d])
            for m in ("emr_risk", "ct_nodule"):
                steps.append(["engines", "ensure", "--model", m, "--lake", lake, "--as-of", {NIGHTLY!r}])
            for d in ({NIGHTLY!r}, {BACKFILL!r}):
                steps.append(["score", "emr", "--lake", lake, "--as-of", d])
                steps.append(["score", "ct", "--lake", lake, "--as-of", d])
            for argv in steps:
                assert main(argv) == 0, argv
        """)
        cli_env = {**os.environ, "MEDSCREEN_LAKE__ROOT": str(lake_cli), "RAY_AUTH_MODE": "disabled"}
        direct = subprocess.run([sys.executable, "-c", script], env=cli_env, cwd=REPO,
                                capture_output=True, text=True, timeout=1500)
    return {"states": states, "dag_run_state": dag_run.state, "backfill": backfill, "direct": direct,
            "lake_dag": lake_dag, "lake_cli": lake_cli}


def test_dag_test_runs_every_task(runs) -> None:
    assert runs["states"] == {t: "success" for t in (
        "emr_ingest", "dicom_index", "imaging_link", "emr_features", "engines_ensure", "score_emr", "score_ct",
        "qc_gate", "publish", "report")}, runs["states"]
    assert runs["dag_run_state"] == "success"


def test_outputs_committed_with_balanced_ledgers(runs) -> None:
    lake = LakePaths(runs["lake_dag"])
    for path in (lake.events, lake.dicom_series, lake.timelines(NIGHTLY), lake.scores("emr_risk", NIGHTLY),
                 lake.findings("ct_nodule", NIGHTLY), lake.screening(NIGHTLY)):
        assert is_committed(path), f"{path} not committed"
    assert len(_rows(lake.scores("emr_risk", NIGHTLY))) > 0
    ledgers = [json.loads(p.read_text()) for p in lake.runs.glob("*/ledger.json")]
    assert len(ledgers) >= 5  # ingest, index, features, score emr, score ct
    for ledger in ledgers:
        assert ledger["balanced"], ledger
        for stage in ledger["stages"].values():
            assert stage["records_in"] == (stage["records_out"] + stage["quarantined_total"]
                                           + stage.get("ignored_total", 0))
    report = json.loads((runs["lake_dag"] / "reports" / "nightly_screening" / f"as_of={NIGHTLY}"
                         / "report.json").read_text())
    assert report["published"]["as_of"] == NIGHTLY
    assert set(report["qc"]) == {"emr_risk", "ct_nodule"}


def test_airflow_dags_test_command_runs_a_second_date(runs) -> None:
    out = runs["backfill"]
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    lake = LakePaths(runs["lake_dag"])
    assert is_committed(lake.scores("emr_risk", BACKFILL))
    assert is_committed(lake.findings("ct_nodule", BACKFILL))
    # Shared tables were current, so the second run did not rebuild them.
    assert "inputs unchanged" in out.stdout + out.stderr
    assert len([p for p in lake.runs.iterdir() if "ingest" in p.name]) == 1
    # An older date does not take the published screening list back in time.
    latest = json.loads((lake.root / "screening" / "LATEST.json").read_text())
    assert latest["as_of"] == NIGHTLY


def _rows(path: Path) -> list[dict]:
    import pyarrow.dataset as ds

    # The partition also holds manifest.json; read only its Parquet files.
    table = ds.dataset(path, format="parquet", exclude_invalid_files=True).to_table()
    table = table.drop_columns([c for c in table.column_names if c in PROVENANCE])
    return sorted(table.to_pylist(), key=lambda r: json.dumps(r, sort_keys=True, default=str))


def _partitions(root: Path) -> set[str]:
    # Partitions are pointers to versions (lake.commit): list the pointers, not the version stores
    # (dot folders; a table set's versions there are named by random ids).
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_symlink() and (p / "_SUCCESS").is_file()
            and p.relative_to(root).parts[0] in ("emr", "imaging", "scores", "findings", "screening")
            and not any(part.startswith(".") for part in p.relative_to(root).parts)}


def test_dag_runs_equal_direct_cli_runs(runs) -> None:
    direct = runs["direct"]
    assert direct.returncode == 0, (direct.stdout + direct.stderr)[-4000:]
    dag_lake, cli_lake = runs["lake_dag"], runs["lake_cli"]
    assert _partitions(dag_lake) == _partitions(cli_lake)
    a, b = LakePaths(dag_lake), LakePaths(cli_lake)
    for d in (NIGHTLY, BACKFILL):
        for pa_, pb in ((a.timelines(d), b.timelines(d)), (a.scores("emr_risk", d), b.scores("emr_risk", d)),
                        (a.findings("ct_nodule", d), b.findings("ct_nodule", d)),
                        (a.screening(d), b.screening(d))):
            assert _rows(pa_) == _rows(pb), f"{pa_.relative_to(dag_lake)} differs from the CLI run"
