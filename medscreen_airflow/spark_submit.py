"""Spark steps under Airflow: which file spark-submit runs, with which arguments, interpreter,
environment and ``--conf`` pairs, and the operator that submits a medscreen job."""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

from conf.settings import PseudonymSettings, Settings, load_settings
from lake.paths import as_of_str
from medscreen_airflow.errors import OrchestrationError

SPARK_CONN_ID = "spark_default"


def job_file(name: str) -> Path:
    """The spark-submit-able file of ``jobs/<name>.py``, resolved from the installed package."""
    spec = importlib.util.find_spec("jobs")
    if spec is None or not spec.submodule_search_locations:
        raise OrchestrationError("the medscreen package 'jobs' is not importable; "
                                 "install medscreen into the Airflow environment (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"


def forwarded(name: str, key_env: str = PseudonymSettings().key_env) -> bool:
    """True for the MEDSCREEN_* settings spark-submit may carry: never the key, nor anything named as a secret.

    On YARN and Kubernetes the Spark provider turns these variables into
    ``spark.*Env.*`` confs on the command line (task logs, the Spark UI);
    the key's file path travels, the key does not.
    """
    if not name.startswith("MEDSCREEN_") or name == key_env:
        return False
    upper = name.upper()
    # Whole words: MEDSCREEN_FEATURES__MAX_TOKENS is a setting, MEDSCREEN_X__TOKEN a secret.
    secretish = set(upper.split("_")) & {"KEY", "SECRET", "PASSWORD", "TOKEN", "CREDENTIALS"}
    return not secretish or upper.endswith(("_FILE", "_KEY_ENV"))


def spark_env(settings: Settings | None = None) -> dict[str, str]:
    """Environment for spark-submit: this interpreter on both sides, its bin/ first on PATH.

    Airflow runs in the project's virtualenv, which also holds the pinned
    PySpark and its ``spark-submit``; the driver and the Python workers must
    run the same interpreter so they import the same medscreen and pyarrow.
    The MEDSCREEN_* settings go along except the key (:func:`forwarded`).
    """
    bin_dir = str(Path(sys.executable).parent)
    key_env = (settings.pseudonym if settings else PseudonymSettings()).key_env
    env = {k: v for k, v in os.environ.items() if forwarded(k, key_env)}
    env.update({
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "TZ": "UTC",
    })
    return env


def spark_conf(settings: Settings) -> dict[str, str]:
    """``--conf`` pairs for spark-submit, matching jobs.spark_session.get_spark."""
    s = settings.spark
    return {
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.shuffle.partitions": str(s.shuffle_partitions),
        "spark.ui.enabled": str(s.ui_enabled).lower(),
        "spark.driver.extraJavaOptions": "-Duser.timezone=UTC",
        "spark.executor.extraJavaOptions": "-Duser.timezone=UTC",
    }


def job_arguments(job: str, settings: Settings, as_of: str | None = None,
                  with_labels: bool = False) -> list[str]:
    """The argv a job module's ``main(argv)`` takes (the same flags as the CLI)."""
    lake = ["--lake", str(settings.lake.root)]
    if job == "emr_ingest":
        if settings.inputs.emr_dir is None:
            raise OrchestrationError("no EMR input configured: set MEDSCREEN_INPUTS__EMR_DIR "
                                     "in the Airflow environment")
        return ["--input", str(settings.inputs.emr_dir), "--format", settings.inputs.emr_format, *lake]
    if job == "dicom_index":
        if settings.inputs.dicom_dir is None:
            raise OrchestrationError("no DICOM input configured: set MEDSCREEN_INPUTS__DICOM_DIR "
                                     "in the Airflow environment")
        return ["--input", str(settings.inputs.dicom_dir), *lake]
    if job == "imaging_link":
        return lake
    if job == "emr_features":
        if not as_of:
            raise OrchestrationError("emr_features needs an as-of date")
        return [*lake, "--as-of", as_of_str(as_of), *(["--with-labels"] if with_labels else [])]
    raise OrchestrationError(f"unknown Spark job {job!r}; known: emr_ingest, emr_features, dicom_index, imaging_link")


def refuse_key_in_environment(settings: Settings) -> None:
    """Raise when the key is in this worker's environment: spark-submit (and all it starts) would inherit it."""
    if os.environ.get(settings.pseudonym.key_env):
        raise OrchestrationError(
            f"{settings.pseudonym.key_env} is set in the Airflow worker's environment; every process a task "
            "starts inherits it, and Spark on YARN/Kubernetes copies such variables into its confs. Unset it "
            "and point MEDSCREEN_PSEUDONYM__KEY_FILE at the key's 0600 file (or the mounted secret)")


class LakeSparkSubmitOperator(SparkSubmitOperator):
    """SparkSubmitOperator for a medscreen job; arguments come from settings at run time.

    Settings are read once when the task runs (not when the DAG is parsed), so
    the lake and inputs configured in the worker's environment are the ones used.
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "as_of")

    def __init__(self, *, job: str, as_of: str | None = None, with_labels: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("application", str(job_file(job)))
        kwargs.setdefault("conn_id", SPARK_CONN_ID)
        kwargs.setdefault("name", f"medscreen-{job}")
        super().__init__(**kwargs)
        self.job, self.as_of, self.with_labels = job, as_of, with_labels

    def execute(self, context: Any) -> None:
        self.submit(context, load_settings())

    def prepare(self, settings: Settings) -> None:
        """Fill in the job's argv, ``--conf`` pairs and environment from ``settings``."""
        refuse_key_in_environment(settings)
        self.application_args = job_arguments(self.job, settings, self.as_of, self.with_labels)
        self.conf = {**spark_conf(settings), **(self.conf or {})}
        # Taken when the task runs, so the worker's MEDSCREEN_* settings are the ones passed on.
        self.env_vars = {**spark_env(settings), **(self.env_vars or {})}
        self._driver_memory = self._driver_memory or settings.spark.driver_memory

    def submit(self, context: Any, settings: Settings) -> None:
        """Prepare from ``settings`` and run spark-submit."""
        self.prepare(settings)
        SparkSubmitOperator.execute(self, context)
