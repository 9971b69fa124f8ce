"""Helpers for the end-to-end DAG tests: the settings a run's tasks read, and a DAG parsed from dags/."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[2] / "dags"
PSEUDONYM_KEY = "dags-e2e-pseudonym-key-not-for-production"


def key_file(directory: Path) -> Path:
    """A 0600 file holding :data:`PSEUDONYM_KEY` in ``directory`` (DAG tasks refuse a key in the environment)."""
    path = Path(directory) / "pseudonym.key"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(PSEUDONYM_KEY)
    return path


def pipeline_env(lake: Path, emr: Path, dicom: Path | None = None) -> dict[str, str]:
    """The MEDSCREEN_* settings a DAG's tasks read: this lake, these inputs, no retries."""
    env = {"MEDSCREEN_LAKE__ROOT": str(lake), "MEDSCREEN_INPUTS__EMR_DIR": str(emr),
           "MEDSCREEN_PSEUDONYM__KEY_FILE": str(key_file(Path(lake).parent)),
           "MEDSCREEN_SPARK__SHUFFLE_PARTITIONS": "2",
           "MEDSCREEN_AIRFLOW_RETRIES": "0",
           # The fixture's CT is a 64x64x24 phantom, far below the model's training resolution: the
           # U-Net finds ~17 specks per series there, which CT QC (rightly) calls broken at 10.
           "MEDSCREEN_IMAGING__QC__MAX_FINDINGS_PER_SERIES": "100"}
    if dicom is not None:
        env["MEDSCREEN_INPUTS__DICOM_DIR"] = str(dicom)
    return env


@contextlib.contextmanager
def pipeline_settings(lake: Path, emr: Path, dicom: Path | None = None) -> Iterator[dict[str, str]]:
    """This process's environment set to :func:`pipeline_env` (no DICOM input unless given), then restored."""
    mp = pytest.MonkeyPatch()
    try:
        mp.delenv("MEDSCREEN_INPUTS__DICOM_DIR", raising=False)
        mp.delenv("MEDSCREEN_PSEUDONYM_KEY", raising=False)
        env = pipeline_env(lake, emr, dicom)
        for k, v in env.items():
            mp.setenv(k, v)
        yield env
    finally:
        mp.undo()


def parse_dag(dag_id: str):
    """One DAG, parsed from dags/ as the DAG processor does, with retries off (fail now, not after a back-off)."""
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(DAGS_DIR)).dags[dag_id]
    for t in dag.tasks:
        t.retries = 0
    return dag


# ------------------------------------------- `make airflow` (dags/standalone.sh) in the background

SCRIPT = DAGS_DIR / "standalone.sh"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_env(home: Path, port: int, lake: Path, **medscreen: str) -> dict[str, str]:
    """This process's environment without its Airflow/medscreen settings, plus the script's inputs."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("AIRFLOW") and not k.startswith("MEDSCREEN_")}
    if os.environ.get("MEDSCREEN_VENV_BIN"):  # the script's interpreter, where it is not ./.venv
        env["MEDSCREEN_VENV_BIN"] = os.environ["MEDSCREEN_VENV_BIN"]
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW_PORT": str(port), "MEDSCREEN_LAKE__ROOT": str(lake),
                "MEDSCREEN_PSEUDONYM__KEY_FILE": str(key_file(home)), **medscreen})
    return env


@contextlib.contextmanager
def run_script(args: list[str], env: dict[str, str], log_file: Path,
               timeout_s: float = 240) -> Iterator[str]:
    """``bash dags/standalone.sh ARGS`` in the background; yields the API base URL once healthy.

    Stops the script and everything it started (one process session) on exit.
    """
    log = open(log_file, "w")
    server = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, cwd=SCRIPT.parents[1],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{env['AIRFLOW_PORT']}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(base + "/api/v2/monitor/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"`standalone.sh {' '.join(args)}` did not come up: "
                                       + log_file.read_text()[-3000:]) from None
                time.sleep(1)
        yield base
    finally:
        # Airflow's components, their task processes and Ray share the session Popen started
        # (tasks in process groups of their own): stop them all, stragglers by force.
        _signal_session(server.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=60)
        time.sleep(2)
        _signal_session(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        log.close()


def _signal_session(sid: int, sig: int) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == sid:
                    os.kill(int(entry.name), sig)


def api(base: str, path: str, token: str | None = None, body: dict | None = None) -> dict:
    """One JSON request to the Airflow API (POST when a body is given)."""
    req = urllib.request.Request(base + path, method="POST" if body is not None else "GET",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read() or b"{}")


def admin_token(base: str, home: Path) -> str:
    """Log in as the script's admin user (its generated password) and return the API token."""
    password = json.loads((home / "admin-password.json").read_text())["admin"]
    return api(base, "/auth/token", body={"username": "admin", "password": password})["access_token"]
