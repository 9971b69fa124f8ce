"""Ingest, features and the DICOM index on a real Spark standalone cluster (master, worker and
executors in JVMs of their own) give the rows the local[2] run gives; an executor killed with
SIGKILL mid-job loses and duplicates nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from cluster_support import cluster_env, local_cluster
from lake.commit import read_manifest, read_partition
from lake.paths import LakePaths

pytestmark = pytest.mark.cluster

AS_OF = "2024-06-30"
TABLES = {
    "events": lambda p: p.events, "patients": lambda p: p.patients,
    "observation_periods": lambda p: p.observation_periods, "emr_quarantine": lambda p: p.emr_quarantine,
    "timelines": lambda p: p.timelines(AS_OF), "dicom_instances": lambda p: p.dicom_instances,
    "dicom_series": lambda p: p.dicom_series, "imaging_quarantine": lambda p: p.imaging_quarantine,
}
# Columns that name the run which wrote a row, not the data: they differ between any two runs.
RUN_COLUMNS = {"run_id", "ingested_at", "indexed_at", "created_at"}


def medscreen(env: dict[str, str], *args: str, timeout_s: float = 900) -> dict:
    proc = subprocess.run([sys.executable, "-m", "medscreen", *args], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"medscreen {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout[proc.stdout.index("{"):])


def sorted_rows(table: pa.Table) -> list[tuple]:
    table = table.select(sorted(set(table.column_names) - RUN_COLUMNS))
    rows = [tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(r.items()))
            for r in table.to_pylist()]
    return sorted(rows, key=repr)


def lake_rows(lake: Path) -> dict[str, list[tuple]]:
    paths = LakePaths(lake)
    return {name: sorted_rows(read_partition(where(paths))) for name, where in TABLES.items()}


def run_stages(env: dict[str, str], lake: Path, inputs: dict[str, Path], master: str) -> dict[str, dict]:
    """`emr ingest`, `emr features` and `dicom index` through the CLI on MASTER."""
    flags = ["--lake", str(lake), "--spark-master", master]
    return {"ingest": medscreen(env, "emr", "ingest", "--input", str(inputs["emr"]), *flags),
            "features": medscreen(env, "emr", "features", "--as-of", AS_OF, *flags),
            "index": medscreen(env, "dicom", "index", "--input", str(inputs["ct"]), *flags)}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small FHIR export (with its realistic bad records) and two CT studies of its patients."""
    from synth import ct, emr

    root = tmp_path_factory.mktemp("cluster_inputs")
    emr.generate(root / "emr", patients=30, seed=5)
    ct.generate(root / "ct", studies=2, seed=5, rows=32, slices=8, emr_dir=root / "emr")
    return {"emr": root / "emr", "ct": root / "ct"}


@pytest.fixture(scope="module")
def local_run(inputs, key_file, tmp_path_factory) -> dict:
    lake = tmp_path_factory.mktemp("lake_local2")
    env = cluster_env(key_file, MEDSCREEN_SPARK__SHUFFLE_PARTITIONS="2")
    return {"lake": lake, "summaries": run_stages(env, lake, inputs, "local[2]"), "rows": lake_rows(lake)}


@pytest.fixture(scope="module")
def cluster_run(inputs, key_file, spark_cluster, tmp_path_factory) -> dict:
    lake = tmp_path_factory.mktemp("lake_standalone")
    env = cluster_env(key_file, MEDSCREEN_SPARK__SHUFFLE_PARTITIONS="2")
    summaries = run_stages(env, lake, inputs, spark_cluster.spark_master)
    return {"lake": lake, "summaries": summaries, "rows": lake_rows(lake), "env": env}


def _apps(spark_cluster) -> list[dict]:
    state = local_cluster.spark_master_state(spark_cluster.spark_master_ui)
    return state.get("activeapps", []) + state.get("completedapps", [])


def _executor_dirs(spark_cluster, app_id: str) -> list[Path]:
    """The worker's work directories of the executors it launched for APP_ID (one per executor JVM)."""
    return sorted((Path(spark_cluster.state_dir) / "spark-worker-1" / app_id).glob("[0-9]*"))


def test_standalone_cluster_rows_equal_the_local_run(local_run, cluster_run, spark_cluster):
    for name, rows in local_run["rows"].items():
        assert rows, f"{name}: the local run wrote no rows: the comparison would prove nothing"
        assert cluster_run["rows"][name] == rows, f"{name}: standalone cluster rows differ from local[2]"
    # The work ran in executors the standalone worker launched (JVMs of their own), one app per stage.
    apps = [a for a in _apps(spark_cluster) if a.get("state") == "FINISHED"]
    assert len(apps) >= 3, apps
    for app in apps:
        dirs = _executor_dirs(spark_cluster, app["id"])
        assert dirs and any("Running task" in (d / "stderr").read_text(errors="replace") for d in dirs), \
            f"no executor of {app['name']} ran a task"
    # Every count the stages report (records in/out, quarantine reasons, ledgers) is the same.
    for stage, summary in cluster_run["summaries"].items():
        assert counts(summary) == counts(local_run["summaries"][stage]) != {}, stage


def counts(summary: dict) -> dict:
    """The integer counts of a stage summary (timings and paths left out)."""
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            if sub := counts(v):
                out[k] = sub
        elif isinstance(v, int) and not isinstance(v, bool) and "second" not in k:
            out[k] = v
    return out


def _executor_pids(app_id: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"org.apache.spark.executor.CoarseGrainedExecutorBackend" in cmd and app_id.encode() in cmd:
                pids.append(int(entry.name))
    return pids


def test_executor_killed_mid_job_loses_and_duplicates_nothing(local_run, cluster_run, spark_cluster):
    """`emr features` again on the cluster's lake; its executor JVM is SIGKILLed while it runs tasks."""
    lake, env = cluster_run["lake"], cluster_run["env"]
    before = {a["id"] for a in _apps(spark_cluster)}
    proc = subprocess.Popen([sys.executable, "-m", "medscreen", "emr", "features", "--as-of", AS_OF,
                             "--lake", str(lake), "--spark-master", spark_cluster.spark_master],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed, deadline = None, time.monotonic() + 600
    while killed is None:
        assert proc.poll() is None, f"the job ended before a task ran: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no executor ran a task within 600 s"
        for app in _apps(spark_cluster):
            if app["id"] in before:
                continue
            for d in _executor_dirs(spark_cluster, app["id"]):
                log = (d / "stderr").read_text(errors="replace") if (d / "stderr").exists() else ""
                pids = _executor_pids(app["id"])
                if "Running task" in log and pids:
                    os.kill(pids[0], signal.SIGKILL)
                    killed = app["id"]
                    break
        time.sleep(0.2)
    out, err = proc.communicate(timeout=900)
    if proc.returncode == 0:
        summary = json.loads(out[out.index("{"):])
    else:  # a clear failure is allowed; its retry must then finish the job
        assert "medscreen:" in err or "Error" in err, err[-3000:]
        summary = medscreen(env, "emr", "features", "--as-of", AS_OF, "--lake", str(lake),
                            "--spark-master", spark_cluster.spark_master)
    # The master replaced the lost executor with a new JVM for the same application.
    assert len(_executor_dirs(spark_cluster, killed)) >= 2, "no replacement executor was launched"
    timelines = read_partition(LakePaths(lake).timelines(AS_OF))
    assert sorted_rows(timelines) == local_run["rows"]["timelines"]
    keys = timelines.column("patient_key").to_pylist()
    assert len(keys) == len(set(keys)), "a patient's timeline was written twice"
    assert read_manifest(LakePaths(lake).timelines(AS_OF))["run_id"] == summary["run_id"]
    ledger = json.loads((LakePaths(lake).run(summary["run_id"]) / "ledger.json").read_text())
    assert ledger["stages"] and ledger["balanced"], ledger
    assert counts(summary) == counts(local_run["summaries"]["features"])


def test_airflow_spark_connection_submits_the_dicom_index_to_the_cluster(inputs, key_file, local_run,
                                                                         spark_cluster, tmp_path_factory):
    """The DAGs' Spark operator, its `spark_default` connection naming the standalone master."""
    lake = tmp_path_factory.mktemp("lake_airflow_conn")
    host, port = spark_cluster.spark_master.rsplit(":", 1)
    env = cluster_env(key_file, AIRFLOW_HOME=str(tmp_path_factory.mktemp("airflow_home")),
                      AIRFLOW_CONN_SPARK_DEFAULT=json.dumps({"conn_type": "spark", "host": host, "port": int(port)}),
                      MEDSCREEN_LAKE__ROOT=str(lake), MEDSCREEN_INPUTS__DICOM_DIR=str(inputs["ct"]),
                      MEDSCREEN_SPARK__SHUFFLE_PARTITIONS="2")
    code = ("from medscreen_airflow.spark_submit import LakeSparkSubmitOperator\n"
            "LakeSparkSubmitOperator(task_id='dicom_index', job='dicom_index').execute({})\n")
    before = {a["id"] for a in _apps(spark_cluster)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    submitted = [a for a in _apps(spark_cluster) if a["id"] not in before]
    assert len(submitted) == 1 and submitted[-1]["state"] == "FINISHED", submitted
    assert _executor_dirs(spark_cluster, submitted[-1]["id"]), "no executor ran the submitted job"
    for name in ("dicom_instances", "dicom_series", "imaging_quarantine"):
        assert sorted_rows(read_partition(TABLES[name](LakePaths(lake)))) == local_run["rows"][name], name
