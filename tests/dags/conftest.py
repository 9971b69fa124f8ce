"""Airflow fixtures: a scratch AIRFLOW_HOME (SQLite), the DAG bag, and tiny pipeline inputs.

Airflow reads its configuration when first imported, so the environment is set
here, at collection time, before any test imports airflow.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "dags"
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="medscreen-airflow-test-"))

os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_DIR),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME}/airflow.db",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
    # The connection the Spark tasks submit through: local[2], as `make airflow` sets it.
    "AIRFLOW_CONN_SPARK_DEFAULT": '{"conn_type": "spark", "host": "local[2]"}',
    "RAY_AUTH_MODE": "disabled",
    "NO_PROXY": "*",
})

AIRFLOW_BIN = str(Path(sys.executable).parent / "airflow")


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated SQLite metadata DB in the scratch AIRFLOW_HOME (one per test session)."""
    subprocess.run([AIRFLOW_BIN, "db", "migrate"], check=True, capture_output=True, timeout=180)
    return AIRFLOW_HOME


@pytest.fixture(scope="session")
def dagbag():
    """Both DAG files parsed the way the DAG processor parses them."""
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


# ------------------------------------------------- tiny inputs for end-to-end DAG runs

@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tiny synthetic EMR export (40 patients, FHIR, 5% bad records) and one small CT study.

    Read-only for the tests that share it: every run writes to a lake of its own.
    """
    from synth.ct import generate as synth_ct
    from synth.emr import generate as synth_emr

    root = tmp_path_factory.mktemp("dag-inputs")
    emr, dicom = root / "emr", root / "dicom"
    synth_emr(emr, patients=40, seed=11, bad_share=0.05, fmt="fhir")
    synth_ct(dicom, studies=1, seed=11, rows=64, slices=24)
    return {"emr": emr, "dicom": dicom}
