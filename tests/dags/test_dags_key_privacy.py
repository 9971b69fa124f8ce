"""The pseudonymisation key never travels in the clear from a DAG's Spark task.

The nightly DAG's ``emr_ingest`` task runs through ``airflow tasks test``
(real SparkSubmitOperator, real spark-submit, real local Spark). While it
runs, every process of its session is read from /proc: the argv and the
environment of spark-submit, the JVM and the Python workers. The key must be
in none of them, nor in the task's output, Airflow's log files or the lake;
the key file's path (what does travel) must be there, or the check saw nothing.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dag_runs import pipeline_settings
from lake.commit import is_committed, read_manifest
from lake.keys import key_fingerprint
from lake.paths import LakePaths
from medscreen_airflow import errors, shared_tables, spark_submit

AIRFLOW = str(Path(sys.executable).parent / "airflow")
DAY = "2024-06-30"


def _private_key_file(directory: Path, key: str) -> Path:
    path = directory / "pseudonym.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    return path


class SessionWatch:
    """Snapshots (argv, environment) of every process in one process session, taken every few ms."""

    def __init__(self, sid: int):
        self.sid, self.seen, self._stop = sid, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SessionWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    if os.getsid(int(entry)) != self.sid:
                        continue
                    cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                    environ = Path(f"/proc/{entry}/environ").read_bytes()
                except OSError:
                    continue  # gone between listing and reading
                if cmdline:
                    self.seen[(entry, cmdline)] = environ
            time.sleep(0.02)


def _run_watched(argv: list[str], env: dict[str, str],
                 timeout_s: float = 900) -> tuple[subprocess.CompletedProcess, SessionWatch]:
    """Run ``argv`` in a session of its own, every process of which the returned watch saw."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    with SessionWatch(proc.pid) as watch:
        out, err = proc.communicate(timeout=timeout_s)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), watch


def _run_task(env: dict[str, str]) -> tuple[subprocess.CompletedProcess, SessionWatch]:
    return _run_watched([AIRFLOW, "tasks", "test", "nightly_screening", "emr_ingest", DAY], env)


def _env_with_key_file(key_file: Path) -> dict[str, str]:
    """This process's environment (inside pipeline_settings) with the key in a file, never in a variable."""
    env = {**os.environ, "MEDSCREEN_PSEUDONYM__KEY_FILE": str(key_file)}
    env.pop("MEDSCREEN_PSEUDONYM_KEY", None)
    return env


def _files_holding(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.slow
def test_emr_ingest_task_never_shows_the_key(airflow_db, tiny_inputs, tmp_path: Path) -> None:
    key = "dag-key-privacy-" + secrets.token_hex(16)
    key_file = _private_key_file(tmp_path, key)
    lake = tmp_path / "lake"
    with pipeline_settings(lake, tiny_inputs["emr"]):
        done, watch = _run_task(_env_with_key_file(key_file))
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    manifest = read_manifest(LakePaths(lake).events)
    assert manifest["key_fingerprint"] == key_fingerprint(key.encode())

    submits = {c: e for (_, c), e in watch.seen.items() if b"spark-submit" in c or b"SparkSubmit" in c}
    assert submits, "no spark-submit process was seen: the check would prove nothing"
    assert any(f"MEDSCREEN_PSEUDONYM__KEY_FILE={key_file}".encode() in e for e in submits.values())
    assert any(b"pyspark" in c or b"python" in c for (_, c) in watch.seen)
    needle = key.encode()
    in_argv = [c[:200] for (_, c) in watch.seen if needle in c]
    in_env = [c[:200] for (_, c), e in watch.seen.items() if needle in e]
    assert not in_argv and not in_env, (in_argv, in_env)
    assert key not in done.stdout and key not in done.stderr
    assert "spark-submit" in done.stdout + done.stderr  # the operator's own log of the command it ran
    assert not _files_holding(airflow_db, needle)  # Airflow's home: logs, config, database
    assert not _files_holding(lake, needle)


@pytest.mark.slow
def test_a_whole_nightly_dag_run_never_shows_the_key(airflow_db, tiny_inputs, tmp_path: Path) -> None:
    """Every task of one nightly run (`airflow dags test`): Spark jobs, engine build, Ray scoring
    through the CLI, QC, publish, report — every process's argv and environment, the run's output,
    Airflow's logs and the lake."""
    key = "dag-run-key-privacy-" + secrets.token_hex(16)
    key_file = _private_key_file(tmp_path, key)
    lake = tmp_path / "lake"
    with pipeline_settings(lake, tiny_inputs["emr"]):
        done, watch = _run_watched([AIRFLOW, "dags", "test", "nightly_screening", DAY, "--conf",
                                    '{"models": ["emr_risk"]}'], _env_with_key_file(key_file), 1500)
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, (out + err)[-4000:]
    lp = LakePaths(lake)
    assert is_committed(lp.scores("emr_risk", DAY)) and is_committed(lp.screening(DAY)), (out + err)[-4000:]
    # The check saw the run's processes: Spark, the scoring CLI and its Ray workers.
    commands = [c for (_, c) in watch.seen]
    assert any(b"SparkSubmit" in c for c in commands), "no spark-submit process was seen"
    assert any(b"medscreen" in c and b"score" in c for c in commands), "no scoring CLI process was seen"
    assert any(b"ray" in c.lower() for c in commands), "no Ray process was seen"
    needle = key.encode()
    in_argv = [c[:200] for c in commands if needle in c]
    in_env = [c[:200] for (_, c), e in watch.seen.items() if needle in e]
    assert not in_argv and not in_env, (in_argv, in_env)
    assert key not in out and key not in err
    assert not _files_holding(airflow_db, needle)  # Airflow's home: task logs, config, database
    assert not _files_holding(lake, needle)
    # What does travel is the fingerprint, in the manifests.
    assert read_manifest(lp.scores("emr_risk", DAY))["key_fingerprint"] == key_fingerprint(key.encode())


@pytest.mark.slow
def test_the_spark_task_refuses_a_key_in_the_workers_environment(airflow_db, tiny_inputs,
                                                                 tmp_path: Path) -> None:
    key = "dag-key-privacy-env-" + secrets.token_hex(16)
    lake = tmp_path / "lake"
    with pipeline_settings(lake, tiny_inputs["emr"]):
        env = {**os.environ, "MEDSCREEN_PSEUDONYM_KEY": key}
        done, watch = _run_task(env)
    # `airflow tasks test` exits 0 whatever the task did: its log and the lake say what happened.
    assert not is_committed(LakePaths(lake).events)
    assert "MEDSCREEN_PSEUDONYM_KEY is set in the Airflow worker's environment" in done.stdout + done.stderr
    assert not any(b"SparkSubmit" in c for (_, c) in watch.seen)
    assert key not in done.stdout + done.stderr


def test_spark_submit_env_never_carries_the_key(make_settings, monkeypatch) -> None:
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", "k" * 40)
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM__KEY_FILE", "/run/secrets/pseudonym.key")
    monkeypatch.setenv("MEDSCREEN_SOMETHING_SECRET", "s" * 40)
    monkeypatch.setenv("MEDSCREEN_FEATURES__MAX_TOKENS", "128")
    env = spark_submit.spark_env(make_settings())
    assert "MEDSCREEN_PSEUDONYM_KEY" not in env and "MEDSCREEN_SOMETHING_SECRET" not in env
    assert env["MEDSCREEN_FEATURES__MAX_TOKENS"] == "128"  # a setting whose name merely contains TOKEN
    assert env["MEDSCREEN_PSEUDONYM__KEY_FILE"] == "/run/secrets/pseudonym.key"
    assert "k" * 40 not in repr(env) and "s" * 40 not in repr(env)
    with pytest.raises(errors.OrchestrationError, match="MEDSCREEN_PSEUDONYM__KEY_FILE"):
        spark_submit.refuse_key_in_environment(make_settings())


def test_shared_table_is_stale_when_the_key_changes(make_settings, tmp_path: Path, monkeypatch) -> None:
    from lake.commit import atomic_partition

    emr = tmp_path / "emr"
    emr.mkdir()
    (emr / "Patient.ndjson").write_text('{"resourceType": "Patient"}\n')
    s = make_settings(**{"inputs.emr_dir": str(emr)})
    table = shared_tables.SharedTable.for_job("emr_ingest", s)
    with atomic_partition(table.output) as staging:
        (staging / "part-0.parquet").write_bytes(b"")
    table.record(s.lake.root, "run-1")
    assert shared_tables.SharedTable.for_job("emr_ingest", s).is_current(s.lake.root)
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", "another-key-" + "x" * 30)
    assert not shared_tables.SharedTable.for_job("emr_ingest", s).is_current(s.lake.root)
