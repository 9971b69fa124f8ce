"""Task bodies of the nightly DAG (and the steps the cohort DAG shares): Airflow context in,
settings loaded once per task, the CLI, publishing or the report called with what they need."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from airflow.sdk.exceptions import AirflowSkipException

from conf.settings import load_settings
from lake.paths import as_of_str
from lake.runs import orchestrated_run_id
from medscreen_airflow.cli_calls import engines_args, patient_limit_args, ray_address, run_cli, score_args
from medscreen_airflow.errors import OrchestrationError, PublishRefused
from medscreen_airflow.publishing import publish_screening, write_report

log = logging.getLogger(__name__)


def resolve_as_of(param: str | None, ds: str) -> str:
    """The as-of date of a run: the ``as_of`` param when given, else the logical date."""
    return as_of_str(param or ds)


def context_as_of(context: Any) -> str:
    """The as-of date of the running task: ``params.as_of`` when given, else the logical date (ds)."""
    return resolve_as_of(context["params"].get("as_of"), context["ds"])


def task_run_id(context: Any, stage: str) -> str:
    """The stage run id of the running task: derived from the DAG run id, task id and map index,
    so it is the same on every retry (see lake.runs.orchestrated_run_id)."""
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    dag_run_id = getattr(dag_run, "run_id", None) or context.get("run_id")
    if not dag_run_id or ti is None:
        raise OrchestrationError("cannot derive a run id: the task context has no DAG run or task instance")
    return orchestrated_run_id(stage, str(dag_run_id), ti.task_id, getattr(ti, "map_index", None))


def ensure_engines(context: Any, as_of: str | None = None) -> list[str]:
    """Build or reuse a gated engine for every model the run asked for (calibrated on as-of data)."""
    lake_root = load_settings().lake.root
    as_of = as_of or context_as_of(context)
    models = list(context["params"]["models"])
    for model in models:
        run_cli(engines_args(model, lake_root, as_of))
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
    args = score_args(kind, settings.lake.root, as_of or context_as_of(context), ray_address(settings))
    # Every try of this task in this DAG run uses one run id: a retry resumes what the failed try
    # left staged (EMR fragments, CT series) instead of starting over.
    args += ["--run-id", task_run_id(context, f"score_{kind}")]
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
