"""Shared tables under Airflow: EMR events and the DICOM series index are rebuilt only when their
inputs changed, one build at a time; the imaging link after both.

``emr ingest`` and ``dicom index`` each write ONE table that every as-of date
reads, so two DAG runs (a backfill with several active runs, or the nightly
run beside a cohort run) must never rebuild it at the same time.
:class:`SharedTableSparkSubmitOperator` holds the lake lock of its job
(lake.locks.lake_lock) while it decides, submits and records, and skips the
job when the inputs' fingerprint matches the one recorded by the last
successful build and the table is still committed. The DAGs also put these
tasks in a one-slot pool (declarations.SHARED_TABLE_POOL) so the scheduler
serialises them across runs too.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowSkipException

from conf.settings import Settings, load_settings
from lake.commit import is_committed
from lake.files import write_json_atomic
from lake.keys import check_lake_key, key_fingerprint, load_key
from lake.locks import STATE_DIR, lake_lock
from lake.paths import LakePaths
from medscreen_airflow.errors import OrchestrationError
from medscreen_airflow.spark_submit import LakeSparkSubmitOperator, job_arguments

NO_DICOM = "no DICOM input configured (MEDSCREEN_INPUTS__DICOM_DIR)"


def input_fingerprint(directory: Path) -> str:
    """sha256 over every file's relative path, size and mtime under ``directory``.

    Cheap on large archives (no content reads); any added, removed, resized or
    rewritten file changes it.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise OrchestrationError(f"input directory {directory} does not exist; check the "
                                 "MEDSCREEN_INPUTS__* settings of the Airflow environment")
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class SharedTable:
    """A lake table rebuilt whole from one input directory."""

    job: str
    output: Path
    input_dir: Path
    input_format: str = ""
    # The pseudonym key's fingerprint: a table keyed with another key is not current.
    key_fingerprint: str = ""

    @classmethod
    def for_job(cls, job: str, settings: Settings) -> "SharedTable":
        lake = LakePaths(settings.lake.root)
        args = job_arguments(job, settings)  # raises when the input is not configured
        fp = key_fingerprint(load_key(settings.pseudonym))
        if job == "emr_ingest":
            return cls(job, lake.events, Path(args[1]), settings.inputs.emr_format, fp)
        if job == "dicom_index":
            return cls(job, lake.dicom_series, Path(args[1]), key_fingerprint=fp)
        raise OrchestrationError(f"{job} does not build a shared table")

    def state_file(self, lake_root: Path) -> Path:
        return Path(lake_root) / STATE_DIR / f"{self.job}.json"

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.input_format}\0{input_fingerprint(self.input_dir)}\0{self.key_fingerprint}"
                              .encode()).hexdigest()

    def is_current(self, lake_root: Path) -> bool:
        """True when the table is committed and was built from inputs with today's fingerprint."""
        state = self.state_file(lake_root)
        if not (is_committed(self.output) and state.is_file()):
            return False
        recorded = json.loads(state.read_text())
        return recorded.get("fingerprint") == self.fingerprint() and \
            recorded.get("input_dir") == str(self.input_dir)

    def record(self, lake_root: Path, run_id: str | None) -> Path:
        return write_json_atomic(self.state_file(lake_root), {
            "fingerprint": self.fingerprint(), "input_dir": str(self.input_dir),
            "built_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(), "airflow_run_id": run_id})


def _holder(context: Any, task_id: str) -> str:
    """Who holds a lake lock, for its record: the DAG run and task."""
    run_id = getattr(context.get("dag_run"), "run_id", None) if context else None
    return f"{run_id or 'airflow'}-{task_id}"


class SharedTableSparkSubmitOperator(LakeSparkSubmitOperator):
    """Rebuild a shared table only when its inputs changed; never two rebuilds at once."""

    def execute(self, context: Any) -> None:
        settings = load_settings()
        if self.job == "dicom_index" and settings.inputs.dicom_dir is None:
            raise AirflowSkipException(f"{NO_DICOM}; DICOM index and CT scoring skipped")
        self.prepare(settings)
        table = SharedTable.for_job(self.job, settings)
        run_id = getattr(context.get("dag_run"), "run_id", None) if context else None
        # The lock spans decide + build + record, so a concurrent run either waits and
        # then sees the table current, or builds it itself — never both at once.
        with lake_lock(settings.lake.root, self.job, _holder(context, self.task_id)):
            # A lake keyed otherwise is refused before "unchanged" could skip past it.
            check_lake_key(settings.lake.root, table.key_fingerprint)
            if table.is_current(settings.lake.root):
                raise AirflowSkipException(
                    f"{self.job}: inputs unchanged since the last build of {table.output}; skipped")
            SparkSubmitOperator.execute(self, context)  # prepared above
            if not is_committed(table.output):
                raise OrchestrationError(f"{self.job} finished but {table.output} has no _SUCCESS; "
                                         "see the Spark job log above")
            table.record(settings.lake.root, run_id)


class ImagingLinkSparkSubmitOperator(LakeSparkSubmitOperator):
    """Rebuild LAKE/imaging/patient_link after ingest and index (both may have changed it);
    skipped when no DICOM input is configured, one build at a time."""

    def execute(self, context: Any) -> None:
        settings = load_settings()
        if settings.inputs.dicom_dir is None:
            raise AirflowSkipException(f"{NO_DICOM}; no imaging ↔ EMR link to build")
        with lake_lock(settings.lake.root, self.job, _holder(context, self.task_id)):
            self.submit(context, settings)
