"""What the Airflow DAGs do, kept out of the DAG files so it can be imported and tested.

The DAGs (dags/) only declare tasks; every decision lives here: which file
spark-submit runs and with which interpreter, when a shared table (EMR events,
the DICOM series index) must be rebuilt, how the pipeline's CLI is called and
how its failures are surfaced, the QC gate, publishing the screening list and
the run report.

Shared tables. ``emr ingest`` and ``dicom index`` each write ONE table that
every as-of date reads, so two DAG runs (a backfill with several active runs,
or the nightly run beside a cohort run) must never rebuild it at the same
time. :class:`SharedTableSparkSubmitOperator` holds an exclusive file lock on
the lake while it decides and submits, and skips the job when the inputs'
fingerprint matches the one recorded by the last successful build and the
table is still committed. The DAGs also put these tasks in a one-slot pool
(:data:`SHARED_TABLE_POOL`) so the scheduler serialises them across runs too.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.sdk.exceptions import AirflowSkipException

from conf.settings import PseudonymSettings, Settings, load_settings
from lake.commit import atomic_partition, is_committed, read_manifest, reading
from lake.keys import check_lake_key, key_fingerprint, load_key
from lake.locks import store_dir
from lake.paths import LakePaths, as_of_str
from lake.runs import orchestrated_run_id, write_json

log = logging.getLogger(__name__)

# The nightly cron (UTC). The run that fires at 02:00 on day X has the logical
# date X-1 (a data-interval timetable), so its as-of day is complete.
NIGHTLY_CRON = os.environ.get("MEDSCREEN_NIGHTLY_CRON", "0 2 * * *")
# One slot: the scheduler never runs two shared-table builds at once, across all DAG runs.
SHARED_TABLE_POOL = "medscreen_shared_tables"
SPARK_CONN_ID = "spark_default"
# Where a Ray cluster address may be configured in Airflow; unset → local Ray.
RAY_ADDRESS_VARIABLE = "medscreen_ray_address"
RAY_CONN_ID = "medscreen_ray"
MODELS = ("emr_risk", "ct_nodule")
# Orchestration state inside the lake (fingerprints of the inputs behind shared tables, locks).
STATE_DIR = "_orchestration"


class OrchestrationError(RuntimeError):
    """A pipeline step failed; the message says which, why, and what to do."""


class QCGateFailed(OrchestrationError):
    """Scoring outputs failed the QC gate; the message lists every reason."""


class PublishRefused(OrchestrationError):
    """A screening list failed a publish check; the message lists each one."""


# ---------------------------------------------------------------- Spark submit

def job_file(name: str) -> Path:
    """The spark-submit-able file of ``jobs/<name>.py``, resolved from the installed package."""
    spec = importlib.util.find_spec("jobs")
    if spec is None or not spec.submodule_search_locations:
        raise OrchestrationError("the medscreen package 'jobs' is not importable; "
                                 "install medscreen into the Airflow environment (pip install -e .)")
    path = Path(next(iter(spec.submodule_search_locations))) / f"{name}.py"
    return path


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


def spark_conf(settings: Settings | None = None) -> dict[str, str]:
    """``--conf`` pairs for spark-submit, matching jobs.spark_session.get_spark."""
    s = (settings or load_settings()).spark
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


# ------------------------------------------------------- shared-table rebuilds

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
        return write_json(self.state_file(lake_root), {
            "fingerprint": self.fingerprint(), "input_dir": str(self.input_dir),
            "built_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(), "airflow_run_id": run_id})


@contextlib.contextmanager
def lake_lock(lake_root: Path, name: str) -> Iterator[None]:
    """An exclusive advisory lock on ``LAKE/_orchestration/<name>.lock`` (blocks until free)."""
    path = Path(lake_root) / STATE_DIR / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def refuse_key_in_environment(settings: Settings) -> None:
    """Raise when the key is in this worker's environment: spark-submit (and all it starts) would inherit it."""
    if os.environ.get(settings.pseudonym.key_env):
        raise OrchestrationError(
            f"{settings.pseudonym.key_env} is set in the Airflow worker's environment; every process a task "
            "starts inherits it, and Spark on YARN/Kubernetes copies such variables into its confs. Unset it "
            "and point MEDSCREEN_PSEUDONYM__KEY_FILE at the key's 0600 file (or the mounted secret)")


class LakeSparkSubmitOperator(SparkSubmitOperator):
    """SparkSubmitOperator for a medscreen job; arguments come from settings at run time.

    Settings are read when the task runs (not when the DAG is parsed), so the
    lake and inputs configured in the worker's environment are the ones used.
    """

    template_fields: Sequence[str] = (*SparkSubmitOperator.template_fields, "as_of")

    def __init__(self, *, job: str, as_of: str | None = None, with_labels: bool = False,
                 **kwargs: Any) -> None:
        kwargs.setdefault("application", str(job_file(job)))
        kwargs.setdefault("conn_id", SPARK_CONN_ID)
        kwargs.setdefault("name", f"medscreen-{job}")
        super().__init__(**kwargs)
        self.job, self.as_of, self.with_labels = job, as_of, with_labels

    def _prepare(self) -> Settings:
        settings = load_settings()
        refuse_key_in_environment(settings)
        self.application_args = job_arguments(self.job, settings, self.as_of, self.with_labels)
        self.conf = {**spark_conf(settings), **(self.conf or {})}
        # Taken when the task runs, so the worker's MEDSCREEN_* settings are the ones passed on.
        self.env_vars = {**spark_env(settings), **(self.env_vars or {})}
        self._driver_memory = self._driver_memory or settings.spark.driver_memory
        return settings

    def execute(self, context: Any) -> None:
        self._prepare()
        super().execute(context)


class SharedTableSparkSubmitOperator(LakeSparkSubmitOperator):
    """Rebuild a shared table only when its inputs changed; never two rebuilds at once."""

    def execute(self, context: Any) -> None:
        settings = load_settings()
        if self.job == "dicom_index" and settings.inputs.dicom_dir is None:
            raise AirflowSkipException("no DICOM input configured (MEDSCREEN_INPUTS__DICOM_DIR); "
                                       "DICOM index and CT scoring skipped")
        settings = self._prepare()
        table = SharedTable.for_job(self.job, settings)
        run_id = getattr(context.get("dag_run"), "run_id", None) if context else None
        # The lock spans decide + build + record, so a concurrent run either waits and
        # then sees the table current, or builds it itself — never both at once.
        with lake_lock(settings.lake.root, self.job):
            # A lake keyed otherwise is refused before "unchanged" could skip past it.
            check_lake_key(settings.lake.root, table.key_fingerprint)
            if table.is_current(settings.lake.root):
                raise AirflowSkipException(
                    f"{self.job}: inputs unchanged since the last build of {table.output}; skipped")
            super(LakeSparkSubmitOperator, self).execute(context)
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
            raise AirflowSkipException("no DICOM input configured (MEDSCREEN_INPUTS__DICOM_DIR); "
                                       "no imaging ↔ EMR link to build")
        with lake_lock(settings.lake.root, self.job):
            super().execute(context)


# ------------------------------------------------------------------- the CLI

def resolve_as_of(param: str | None, ds: str) -> str:
    """The as-of date of a run: the ``as_of`` param when given, else the logical date."""
    return as_of_str(param or ds)


def ray_address() -> str | None:
    """The Ray address from the Airflow Variable, else the connection, else settings (None = local Ray)."""
    from airflow.sdk import Connection, Variable

    address = Variable.get(RAY_ADDRESS_VARIABLE, default=None)
    if not address:
        try:
            conn = Connection.get(RAY_CONN_ID)
        except Exception:  # not configured: the documented fallback, not an error
            conn = None
        if conn is not None and conn.host:
            address = conn.host if "://" in conn.host or conn.port is None else f"{conn.host}:{conn.port}"
            if conn.conn_type and "://" not in address and conn.conn_type not in ("generic", "ray"):
                address = f"{conn.conn_type}://{address}"
    return address or load_settings().ray.address


def cli_env() -> dict[str, str]:
    """The environment the CLI runs with: Airflow's, with this interpreter's bin/ first on PATH."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def run_cli(args: Sequence[str], timeout_s: float | None = None) -> str:
    """Run ``medscreen ARGS`` in a child process, stream its output to the task log, return its last stdout line.

    On failure the error names the command, its exit status and the last lines
    of its stderr (where the CLI and scoring QC write their reasons).
    """
    cmd = [sys.executable, "-m", "medscreen", *args]
    log.info("running: medscreen %s", " ".join(args))
    proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=timeout_s)
    for line in proc.stdout.splitlines():
        log.info("%s", line)
    for line in proc.stderr.splitlines():
        log.info("%s", line)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.strip().splitlines() if ln.strip()]
        # The CLI's own error lines and QC verdicts say why; a traceback's tail is the fallback.
        reasons = [ln for ln in lines if ln.startswith("medscreen:") or "QC gate failed" in ln
                   or "LedgerImbalance" in ln] or lines[-8:]
        raise OrchestrationError(
            f"`medscreen {' '.join(args)}` failed with exit status {proc.returncode}:\n"
            + "\n".join(reasons))
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def score_args(kind: str, lake_root: Path, as_of: str, address: str | None) -> list[str]:
    """argv for ``medscreen score emr|ct``."""
    args = ["score", kind, "--lake", str(lake_root), "--as-of", as_of_str(as_of)]
    if address:
        args += ["--ray-address", address]
    return args


def engines_args(model: str, lake_root: Path, as_of: str) -> list[str]:
    """argv for ``medscreen engines ensure`` of one model (calibration samples from as-of D)."""
    return ["engines", "ensure", "--model", model, "--lake", str(lake_root), "--as-of", as_of_str(as_of)]


# ------------------------------------------------------- QC, publish, report

def qc_gate(run_dirs: dict[str, str | None]) -> dict[str, Any]:
    """Check each scoring run: ledger balanced, QC passed. Raise QCGateFailed listing every reason.

    ``run_dirs`` maps the model to its run directory (None when that model was
    not run in this DAG run). Returns a summary per model for the report.
    """
    reasons: list[str] = []
    summary: dict[str, Any] = {}
    for model, run_dir in run_dirs.items():
        if not run_dir:
            summary[model] = {"status": "not run"}
            continue
        rd = Path(run_dir)
        ledger_path = rd / "ledger.json"
        if not ledger_path.is_file():
            reasons.append(f"{model}: run {rd.name} wrote no ledger.json")
            continue
        ledger = json.loads(ledger_path.read_text())
        for stage, s in sorted(ledger.get("stages", {}).items()):
            if not s.get("balanced", False):
                reasons.append(f"{model}: stage {stage} does not balance: {s.get('records_in')} in, "
                               f"{s.get('records_out')} out, {s.get('quarantined_total')} quarantined")
        metrics_path = rd / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        qc = metrics.get("qc") if isinstance(metrics.get("qc"), dict) else {}
        passed = qc.get("passed")
        if passed is None:
            # No verdict is not a pass: a run that never judged its scores must not be published.
            reasons.append(f"{model}: run {rd.name} recorded no QC verdict "
                           f"({'no metrics.json' if not metrics_path.is_file() else 'metrics.json has no qc.passed'})")
        elif passed is not True:
            for r in qc.get("reasons") or qc.get("failures") or ["QC failed (no reason recorded)"]:
                reasons.append(f"{model}: QC: {r}")
        summary[model] = {"run_dir": str(rd), "run_id": rd.name,
                          "ledger_balanced": bool(ledger.get("balanced", False)), "qc": qc}
    if reasons:
        raise QCGateFailed("QC gate failed:\n" + "\n".join(f"- {r}" for r in reasons))
    return summary


def publish_checks(lake_root: Path, as_of: str, expected_run_id: str | None = None) -> dict[str, Any]:
    """What publishing the screening list of as-of D depends on, each check with its verdict.

    The list must be committed in the real (not trial) namespace, come from a
    run that was neither limited nor forced ungated, from scores that passed QC
    with a gated engine, and every ledger on the way must balance; with
    ``expected_run_id`` it must also be that scoring run's list. Returns
    ``{"passed": bool, "checks": {name: {"passed": bool, "detail": str}}, ...}``.
    """
    lake = LakePaths(lake_root)
    as_of = as_of_str(as_of)
    partition = lake.screening(as_of)
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"passed": bool(ok), "detail": detail}

    if not is_committed(partition):
        check("committed", False, f"screening list {partition.name} is not committed; "
              "`medscreen score emr` writes it — check that task's log")
        return {"passed": False, "checks": checks, "as_of": as_of}
    with reading(partition) as version:
        manifest = read_manifest(version)
    check("committed", True, f"version {manifest.get('version')}")
    scores_dir = lake.scores("emr_risk", as_of)
    scores_version = store_dir(scores_dir) / str(manifest.get("scores_version"))
    scores = read_manifest(scores_version) if manifest.get("scores_version") and \
        is_committed(scores_version) else {}
    check("scores_version", bool(scores), f"scores version {manifest.get('scores_version')}"
          + ("" if scores else " is not kept any more (or was never recorded); score again"))
    limit = manifest.get("limit") if manifest.get("limit") is not None else scores.get("limit")
    check("limit", not limit, "full run" if not limit else f"a smoke run limited to {limit} timelines")
    forced = bool(manifest.get("force_ungated") or scores.get("force_ungated") or manifest.get("trial"))
    gate_passed = (scores.get("engine") or {}).get("gate_passed")
    check("gate", gate_passed is True and not forced,
          "engine passed its accuracy gate" if gate_passed is True and not forced
          else f"engine gate verdict {gate_passed!r}{', scored with --force-ungated' if forced else ''}")
    qc_passed = scores.get("qc_passed", manifest.get("qc_passed"))
    check("qc", qc_passed is True, "scores passed QC" if qc_passed is True else f"QC verdict {qc_passed!r}")
    ledger = manifest.get("ledger") or {}
    scores_run = scores.get("run_id") or manifest.get("scores_run_id")
    run_ledger_path = lake.run(str(scores_run)) / "ledger.json" if scores_run else None
    run_ledger = json.loads(run_ledger_path.read_text()) if run_ledger_path and run_ledger_path.is_file() else {}
    balanced = bool(ledger.get("balanced")) and bool(run_ledger.get("balanced"))
    check("ledger", balanced, "screening and scoring ledgers balance" if balanced else
          f"screening ledger balanced={ledger.get('balanced')!r}, scoring run ledger "
          f"balanced={run_ledger.get('balanced')!r}")
    if expected_run_id is not None:
        check("run", scores_run == expected_run_id,
              f"list from scoring run {scores_run}" + ("" if scores_run == expected_run_id
                                                        else f", not this DAG run's {expected_run_id}"))
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks, "as_of": as_of,
            "version": manifest.get("version"), "scores_version": manifest.get("scores_version"),
            "scores_run_id": scores_run}


def publish_screening(lake_root: Path, as_of: str, expected_run_id: str | None = None) -> dict[str, Any]:
    """Point ``LAKE/screening/LATEST.json`` at as-of D's list unless a newer date is published.

    The list ``LAKE/screening/as_of=D/`` itself is written (atomically) by
    scoring; publishing makes it the list consumers read, naming the exact
    version, and records every check of :func:`publish_checks`. A list that
    fails a check is refused (:class:`PublishRefused`, LATEST.json unchanged);
    a backfill of an old date never moves the pointer backwards.
    """
    lake = LakePaths(lake_root)
    as_of = as_of_str(as_of)
    partition = lake.screening(as_of)
    pointer = partition.parent / "LATEST.json"
    with lake_lock(lake_root, "screening_publish"):
        verdict = publish_checks(lake_root, as_of, expected_run_id)
        if not verdict["passed"]:
            failed = [f"{name}: {c['detail']}" for name, c in verdict["checks"].items() if not c["passed"]]
            raise PublishRefused(f"screening list of {as_of} not published (LATEST.json unchanged):\n"
                                 + "\n".join(f"- {f}" for f in failed))
        current = json.loads(pointer.read_text()) if pointer.is_file() else {}
        moved = current.get("as_of", "") <= as_of
        if moved:
            write_json(pointer, {"as_of": as_of, "path": str(partition), "version": verdict["version"],
                                 "version_path": str(store_dir(partition) / verdict["version"]),
                                 "scores_version": verdict["scores_version"],
                                 "checks": verdict["checks"],
                                 "published_at_utc": dt.datetime.now(dt.timezone.utc).isoformat()})
    return {"as_of": as_of, "partition": str(partition), "version": verdict["version"],
            "latest": as_of if moved else current["as_of"], "checks": verdict["checks"]}


def write_report(lake_root: Path, dag_id: str, as_of: str, airflow_run_id: str,
                 sections: dict[str, Any]) -> Path:
    """Commit ``LAKE/reports/<dag_id>/as_of=D/report.json`` (a rerun replaces it)."""
    final = Path(lake_root) / "reports" / dag_id / f"as_of={as_of_str(as_of)}"
    report = {"dag_id": dag_id, "as_of": as_of_str(as_of), "airflow_run_id": airflow_run_id,
              "written_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(), **sections}
    with atomic_partition(final, {"dag_id": dag_id, "as_of": as_of_str(as_of)}) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return final / "report.json"


# ------------------------------------------- task bodies (context → the above)

def context_as_of(context: Any) -> str:
    """The as-of date of the running task: ``params.as_of`` when given, else the logical date (ds)."""
    return resolve_as_of(context["params"].get("as_of"), context["ds"])


def ensure_engines(context: Any, as_of: str | None = None) -> list[str]:
    """Build or reuse a gated engine for every model the run asked for (calibrated on as-of data)."""
    lake_root = load_settings().lake.root
    models = list(context["params"]["models"])
    for model in models:
        run_cli(engines_args(model, lake_root, as_of or context_as_of(context)))
    return models


def score(context: Any, model: str, as_of: str | None = None, drift_check: bool = True) -> str:
    """Score one model for ``as_of`` (default: the run's as-of date); return the scoring run directory.

    Skips (not fails) when the run's ``models`` param leaves the model out, or
    when no DICOM input is configured for CT. ``drift_check=False`` drops the
    EMR PSI check against the previous as-of (cohort index dates are
    ``step_days`` apart and scored in any order, so "previous" means nothing).
    """
    params = context["params"]
    if model not in params["models"]:
        raise AirflowSkipException(f"{model} not in this run's models {params['models']}")
    settings = load_settings()
    kind = "emr" if model == "emr_risk" else "ct"
    if kind == "ct" and settings.inputs.dicom_dir is None:
        raise AirflowSkipException("no DICOM input configured (MEDSCREEN_INPUTS__DICOM_DIR); CT not scored")
    args = score_args(kind, settings.lake.root, as_of or context_as_of(context), ray_address())
    # Every try of this task in this DAG run uses one run id: a retry resumes what the failed try
    # left staged (EMR fragments, CT series) instead of starting over.
    args += ["--run-id", task_run_id(context, f"score-{kind}")]
    if kind == "emr" and not drift_check:
        args.append("--no-drift-check")
    if params.get("force_ungated"):
        # Smoke runs on untrained/placeholder exports only; the scoring run records it.
        log.warning("force_ungated: scoring %s with an engine that has not passed its accuracy gate", model)
        args.append("--force-ungated")
    limit = params.get("patient_limit")
    if limit:
        # A smoke run: its partitions record the limit and its screening list is not published.
        log.warning("patient_limit: scoring %s with --limit %s (smoke run)", model, limit)
        args += patient_limit_args(int(limit))
    run_dir = run_cli(args)
    if not Path(run_dir).is_dir():
        raise OrchestrationError(f"`medscreen {' '.join(args)}` printed {run_dir!r} as its last line, "
                                 "not a run directory")
    return run_dir


def task_run_id(context: Any, stage: str) -> str:
    """The stage run id of the running task: derived from the DAG run id, task id and map index,
    so it is the same on every retry (see lake.runs.orchestrated_run_id)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag_run_id = getattr(dag_run, "run_id", None) or context.get("run_id")
    if not dag_run_id or ti is None:
        raise OrchestrationError("cannot derive a run id: the task context has no DAG run or task instance")
    return orchestrated_run_id(stage, str(dag_run_id), ti.task_id, getattr(ti, "map_index", None))


def patient_limit_args(limit: int) -> list[str]:
    """``--limit N`` for ``medscreen score KIND``: the first N timelines (emr) or N series (ct)."""
    if limit < 1:
        raise OrchestrationError(f"patient_limit must be at least 1, got {limit}")
    return ["--limit", str(limit)]


def publish(context: Any, qc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Publish the run's screening list (skipped when EMR scoring was not part of the run, or
    when the run was a smoke or forced-ungated run: its list lives under trial/).

    ``qc`` is the QC gate's summary; the list published must be the one of the
    scoring run the gate judged.
    """
    params = context["params"]
    if "emr_risk" not in params["models"]:
        raise AirflowSkipException("emr_risk not scored in this run: no screening list to publish")
    if params.get("patient_limit") or params.get("force_ungated"):
        raise AirflowSkipException("a smoke run (patient_limit or force_ungated): its list was written under "
                                   "trial/ and is never published; LATEST.json unchanged")
    emr = (qc or {}).get("emr_risk") or {}
    if qc is not None and not emr.get("run_id"):
        raise PublishRefused("the QC gate recorded no emr_risk scoring run; nothing to publish")
    return publish_screening(load_settings().lake.root, context_as_of(context), emr.get("run_id"))


def report(context: Any, dag_id: str, sections: dict[str, Any]) -> Path:
    """Write the run report for the running DAG run."""
    return write_report(load_settings().lake.root, dag_id, context_as_of(context), context["run_id"],
                        {"params": dict(context["params"]), **sections})


def define_cohort(context: Any) -> list[str]:
    """Validate the cohort form, store its definition beside the results; return the index dates."""
    from inference import cohort

    settings = load_settings()
    params = dict(context["params"])
    definition = cohort.define_cohort(params, cohort.code_group_names(settings.extraction.code_groups_file),
                                      MODELS)
    cohort.store_definition(settings.lake.root, definition, replace=bool(params.get("replace")))
    return definition.index_dates()


def _stored_definition(context: Any):
    from inference import cohort

    settings = load_settings()
    path = LakePaths(settings.lake.root).cohort(str(context["params"]["cohort_name"])) / "definition.json"
    return settings.lake.root, cohort.CohortDefinition(**json.loads(path.read_text()))


def cohort_index_date(context: Any, as_of: str) -> dict[str, Any]:
    """Select the cohort's members at one index date and commit them with their scores."""
    from inference import cohort

    lake_root, definition = _stored_definition(context)
    return cohort.write_index_date(lake_root, definition, as_of,
                                   trial=bool(context["params"].get("force_ungated")),
                                   run_id=task_run_id(context, "cohort-select"),
                                   pseudonym=load_settings().pseudonym)


def cohort_summary(context: Any, per_date: list[dict[str, Any]]) -> Path:
    """Write the cohort's summary.json from the per-date counts."""
    from inference import cohort

    lake_root, definition = _stored_definition(context)
    return cohort.write_summary(lake_root, definition, per_date, context["run_id"])
