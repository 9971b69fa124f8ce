"""The DAGs' decisions (medscreen_airflow) on tiny real files: no Spark, no Airflow scheduler."""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from lake.commit import atomic_partition, read_manifest
from lake.ledger import StageLedger, write_ledger
from lake.locks import lake_lock
from lake.paths import LakePaths
from medscreen_airflow import cli_calls, errors, publishing, shared_tables, spark_submit, tasks


def _settings(make_settings, emr_dir: Path, dicom_dir: Path | None = None):
    over = {"inputs.emr_dir": str(emr_dir)}
    if dicom_dir is not None:
        over["inputs.dicom_dir"] = str(dicom_dir)
    return make_settings(**over)


def test_spark_jobs_resolve_to_installed_files_and_arguments(make_settings, tmp_path: Path) -> None:
    for job in ("emr_ingest", "emr_features", "dicom_index"):
        path = spark_submit.job_file(job)
        assert path.is_file() and "def main" in path.read_text()
    s = _settings(make_settings, tmp_path / "emr")
    assert spark_submit.job_arguments("emr_ingest", s) == [
        "--input", str(tmp_path / "emr"), "--format", "fhir", "--lake", str(s.lake.root)]
    assert spark_submit.job_arguments("emr_features", s, "2024-06-30") == [
        "--lake", str(s.lake.root), "--as-of", "2024-06-30"]
    with pytest.raises(errors.OrchestrationError, match="MEDSCREEN_INPUTS__DICOM_DIR"):
        spark_submit.job_arguments("dicom_index", s)
    with pytest.raises(ValueError, match="not a date"):
        spark_submit.job_arguments("emr_features", s, "30/06/2024")
    env = spark_submit.spark_env()
    assert env["PYSPARK_PYTHON"] == env["PYSPARK_DRIVER_PYTHON"]
    assert (Path(env["PATH"].split(os.pathsep)[0]) / "spark-submit").is_file()


def test_shared_table_is_rebuilt_only_when_inputs_change(make_settings, tmp_path: Path) -> None:
    emr = tmp_path / "emr"
    emr.mkdir()
    (emr / "Patient.ndjson").write_text('{"resourceType": "Patient"}\n')
    s = _settings(make_settings, emr)
    table = shared_tables.SharedTable.for_job("emr_ingest", s)
    assert table.output == LakePaths(s.lake.root).events
    assert not table.is_current(s.lake.root)          # never built
    with atomic_partition(table.output) as staging:
        (staging / "part-0.parquet").write_bytes(b"")
    assert not table.is_current(s.lake.root)          # built, but by nobody we recorded
    table.record(s.lake.root, "run-1")
    assert table.is_current(s.lake.root)
    (emr / "Condition.ndjson").write_text("{}\n")      # a new export file
    assert not table.is_current(s.lake.root)
    table.record(s.lake.root, "run-2")
    assert table.is_current(s.lake.root)
    st = (emr / "Condition.ndjson").stat()
    os.utime(emr / "Condition.ndjson", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rewritten
    assert not table.is_current(s.lake.root)


def test_lake_lock_serialises_two_holders(tmp_path: Path) -> None:
    order: list[str] = []

    def second() -> None:
        with lake_lock(tmp_path, "emr_ingest", "test"):
            order.append("second")

    with lake_lock(tmp_path, "emr_ingest", "test"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.5)
        order.append("first done")
    t.join(timeout=10)
    assert order == ["first done", "second"]


def _run_dir(tmp_path: Path, name: str, balanced: bool = True, qc: dict | None = None) -> str:
    rd = tmp_path / "runs" / name
    write_ledger(rd, StageLedger("score_emr", records_in=10, records_out=9 if balanced else 7,
                                 quarantined={"empty_timeline": 1}))
    (rd / "metrics.json").write_text(json.dumps({"qc": qc or {"passed": True, "reasons": []}}))
    return str(rd)


def test_qc_gate_lists_every_reason(tmp_path: Path) -> None:
    ok = publishing.qc_gate({"emr_risk": _run_dir(tmp_path, "a"), "ct_nodule": None})
    assert ok["ct_nodule"] == {"status": "not run"} and ok["emr_risk"]["ledger_balanced"]
    with pytest.raises(errors.QCGateFailed) as err:
        publishing.qc_gate({"emr_risk": _run_dir(tmp_path, "b", qc={"passed": False,
                                                              "reasons": ["psi 0.4 > 0.25 for t2d"]}),
                      "ct_nodule": _run_dir(tmp_path, "c", balanced=False)})
    msg = str(err.value)
    assert "emr_risk: QC: psi 0.4 > 0.25 for t2d" in msg
    assert "ct_nodule: stage score_emr does not balance: 10 in, 7 out, 1 quarantined" in msg
    with pytest.raises(errors.QCGateFailed, match="no ledger.json"):
        publishing.qc_gate({"emr_risk": str(tmp_path / "missing")})


def _scored_list(root: Path, as_of: str, run_id: str, *, limit: int | None = None, gate: bool | None = True,
                 qc: bool | None = True, balanced: bool = True, forced: bool = False) -> None:
    """Scores, their run ledger and a screening list as `medscreen score emr` commits them."""
    lake = LakePaths(root)
    scores = {"run_id": run_id, "limit": limit, "qc_passed": qc, "force_ungated": forced,
              "engine": {"gate_passed": gate}}
    with atomic_partition(lake.scores("emr_risk", as_of), scores) as staging:
        (staging / "part-00000.parquet").write_bytes(b"")
    write_ledger(lake.run(run_id), StageLedger("score_emr", records_in=3, records_out=3 if balanced else 2))
    with atomic_partition(lake.screening(as_of), {"run_id": run_id, "scores_run_id": run_id,
                                                  "scores_version": scores["version"], "limit": limit,
                                                  "ledger": {"balanced": True}}) as staging:
        (staging / "part-00000.parquet").write_bytes(b"")


def test_publish_only_moves_forward(tmp_path: Path) -> None:
    with pytest.raises(errors.PublishRefused, match="not committed"):
        publishing.publish_screening(tmp_path, "2024-06-30")
    for d in ("2024-06-29", "2024-06-30"):
        _scored_list(tmp_path, d, f"run-{d}")
    published = publishing.publish_screening(tmp_path, "2024-06-30", "run-2024-06-30")
    assert published["latest"] == "2024-06-30"
    # A backfill of an older date commits its own partition but leaves LATEST alone.
    assert publishing.publish_screening(tmp_path, "2024-06-29")["latest"] == "2024-06-30"
    pointer = json.loads((tmp_path / "screening" / "LATEST.json").read_text())
    assert pointer["as_of"] == "2024-06-30"
    # The pointer names the exact version and what was checked before it moved.
    assert pointer["version"] == read_manifest(LakePaths(tmp_path).screening("2024-06-30"))["version"]
    assert set(pointer["checks"]) == {"committed", "scores_version", "limit", "gate", "qc", "ledger", "run"}
    assert all(c["passed"] for c in pointer["checks"].values())


@pytest.mark.parametrize("defect, refusal", [
    ({"limit": 5}, "limit: a smoke run limited to 5"),
    ({"gate": None}, "gate: engine gate verdict None"),
    ({"forced": True}, "scored with --force-ungated"),
    ({"qc": None}, "qc: QC verdict None"),          # a missing QC verdict is not a pass
    ({"qc": False}, "qc: QC verdict False"),
    ({"balanced": False}, "scoring run ledger balanced=False"),
])
def test_publish_refuses_a_list_that_fails_a_check_and_leaves_latest_byte_identical(
        tmp_path: Path, defect: dict, refusal: str) -> None:
    _scored_list(tmp_path, "2024-06-29", "good-run")
    publishing.publish_screening(tmp_path, "2024-06-29", "good-run")
    before = (tmp_path / "screening" / "LATEST.json").read_bytes()
    _scored_list(tmp_path, "2024-06-30", "bad-run", **defect)
    with pytest.raises(errors.PublishRefused, match=refusal):
        publishing.publish_screening(tmp_path, "2024-06-30", "bad-run")
    assert (tmp_path / "screening" / "LATEST.json").read_bytes() == before


def test_publish_refuses_another_runs_list(tmp_path: Path) -> None:
    _scored_list(tmp_path, "2024-06-30", "cli-run")
    with pytest.raises(errors.PublishRefused, match="not this DAG run's dag-run"):
        publishing.publish_screening(tmp_path, "2024-06-30", "dag-run")


def test_report_is_committed_per_as_of(tmp_path: Path) -> None:
    path = publishing.write_report(tmp_path, "nightly_screening", "2024-06-30", "manual__x", {"qc": {}})
    assert path == tmp_path / "reports" / "nightly_screening" / "as_of=2024-06-30" / "report.json"
    assert (path.parent / "_SUCCESS").is_file()
    assert json.loads(path.read_text())["airflow_run_id"] == "manual__x"


def test_cli_failures_name_the_command_and_the_reason(tmp_path: Path) -> None:
    with pytest.raises(errors.OrchestrationError) as err:
        cli_calls.run_cli(["emr", "ingest", "--input", str(tmp_path / "nowhere"), "--lake", str(tmp_path)])
    msg = str(err.value)
    assert "medscreen emr ingest" in msg and "exit status 2" in msg
    assert "nowhere" in msg
    assert tasks.resolve_as_of(None, "2024-06-30") == "2024-06-30"
    assert tasks.resolve_as_of("2024-01-31", "2024-06-30") == "2024-01-31"


def test_patient_limit_becomes_a_limit_the_score_cli_takes(tmp_path: Path) -> None:
    from medscreen.cli import build_parser

    for kind in ("emr", "ct"):
        args = build_parser().parse_args(cli_calls.score_args(kind, tmp_path, "2024-06-30", None)
                                         + cli_calls.patient_limit_args(5))
        assert args.limit == 5 and args.score_command == kind
    with pytest.raises(errors.OrchestrationError, match="at least 1"):
        cli_calls.patient_limit_args(0)
    # A smoke run's screening list is committed under trial/ with its limit and never published.
    _scored_list(tmp_path, "2024-06-30", "smoke", limit=5)
    with pytest.raises(errors.PublishRefused, match="limited to 5"):
        publishing.publish_screening(tmp_path, "2024-06-30")
    assert not (tmp_path / "screening" / "LATEST.json").exists()

def test_the_dags_ray_address_comes_from_the_variable_then_the_connection_then_settings(
        make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the scoring tasks hand the CLI (whose --ray-address runs on a real cluster in tests/cluster):
    Airflow's own Variable and Connection lookups (environment secrets backend), in that order."""
    from medscreen.cli import build_parser

    def address_on_the_cli(settings) -> str | None:
        argv = cli_calls.score_args("emr", tmp_path, "2024-06-30", cli_calls.ray_address(settings))
        return build_parser().parse_args(argv).ray_address

    monkeypatch.delenv("AIRFLOW_VAR_MEDSCREEN_RAY_ADDRESS", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MEDSCREEN_RAY", raising=False)
    assert address_on_the_cli(make_settings()) is None  # nothing configured: a local Ray
    assert address_on_the_cli(make_settings(**{"ray.address": "10.0.0.9:6379"})) == "10.0.0.9:6379"
    monkeypatch.setenv("AIRFLOW_CONN_MEDSCREEN_RAY", "ray://head.example:6379")
    assert address_on_the_cli(make_settings(**{"ray.address": "10.0.0.9:6379"})) == "head.example:6379"
    monkeypatch.setenv("AIRFLOW_VAR_MEDSCREEN_RAY_ADDRESS", "ray://client.example:10001")
    assert address_on_the_cli(make_settings(**{"ray.address": "10.0.0.9:6379"})) == "ray://client.example:10001"
