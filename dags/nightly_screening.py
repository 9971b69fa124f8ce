"""Nightly screening: ingest → point-in-time features → engines → Ray scoring → QC → publish.

The logical date is the as-of date: the run that fires at 02:00 UTC on day X
has the logical date X-1 (data-interval timetable), so it scores the first day
whose data is complete. A backfill over a past range therefore produces the
same partitions the nightly runs of those dates would have. The ``as_of``
param overrides the date for a manual run.

Thin by design: every decision is in medscreen_airflow; no settings are read at parse time.
"""
from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG, Asset, Param, TriggerRule, get_current_context, task
from airflow.timetables.interval import CronDataIntervalTimetable

from medscreen_airflow import declarations as decl
from medscreen_airflow import publishing, tasks
from medscreen_airflow.shared_tables import ImagingLinkSparkSubmitOperator, SharedTableSparkSubmitOperator
from medscreen_airflow.spark_submit import LakeSparkSubmitOperator

AS_OF = "{{ params.as_of or ds }}"

EVENTS = Asset(name="medscreen.emr.events", uri="medscreen://lake/emr/events")
SERIES = Asset(name="medscreen.imaging.series", uri="medscreen://lake/imaging/series")
TIMELINES = Asset(name="medscreen.emr.timelines", uri="medscreen://lake/emr/timelines")
SCORES = Asset(name="medscreen.scores.emr_risk", uri="medscreen://lake/scores/model=emr_risk")
FINDINGS = Asset(name="medscreen.findings.ct_nodule", uri="medscreen://lake/findings/model=ct_nodule")
SCREENING = Asset(name="medscreen.screening", uri="medscreen://lake/screening")

with DAG(
    dag_id="nightly_screening",
    description="Nightly EMR + CT screening for the as-of date (= logical date)",
    schedule=CronDataIntervalTimetable(decl.NIGHTLY_CRON, timezone="UTC"),
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    max_active_runs=1,
    default_args=decl.default_args(),
    tags=["medscreen", "screening"],
    params={
        "as_of": Param(None, type=["null", "string"], format="date",
                       title="As-of date (UTC)",
                       description="Score as of this day instead of the logical date."),
        "models": Param(list(decl.MODELS), type="array",
                        items={"type": "string", "enum": list(decl.MODELS)}, minItems=1,
                        uniqueItems=True, title="Models",
                        description="Which models to build engines for and score with."),
        "force_ungated": Param(False, type="boolean", title="Force ungated engines (smoke runs)",
                               description="Score even with an engine that has not passed its "
                                           "accuracy gate. Never for results anyone acts on."),
        "patient_limit": Param(None, type=["null", "integer"], minimum=1, title="Patient limit",
                               description="Smoke runs: score only the first N timelines and at "
                                           "most N CT series. Recorded in the manifests; the "
                                           "screening list is not published."),
    },
    doc_md=__doc__,
) as dag:
    emr_ingest = SharedTableSparkSubmitOperator(
        task_id="emr_ingest", job="emr_ingest", pool=decl.SHARED_TABLE_POOL, outlets=[EVENTS])
    dicom_index = SharedTableSparkSubmitOperator(
        task_id="dicom_index", job="dicom_index", pool=decl.SHARED_TABLE_POOL, outlets=[SERIES])
    # After both shared tables (either may have changed which patient a series belongs to).
    imaging_link = ImagingLinkSparkSubmitOperator(
        task_id="imaging_link", job="imaging_link", pool=decl.SHARED_TABLE_POOL,
        trigger_rule=TriggerRule.NONE_FAILED)
    # Ingest skips itself when its inputs are unchanged; features must still run.
    emr_features = LakeSparkSubmitOperator(
        task_id="emr_features", job="emr_features", as_of=AS_OF,
        trigger_rule=TriggerRule.NONE_FAILED, outlets=[TIMELINES])

    # Shares the one-slot pool: engine builds write the shared engine cache.
    @task(trigger_rule=TriggerRule.NONE_FAILED, pool=decl.SHARED_TABLE_POOL)
    def engines_ensure() -> list[str]:
        """Build or reuse a gated engine per model (the cache is keyed, so reruns are cheap)."""
        return tasks.ensure_engines(get_current_context())

    @task(outlets=[SCORES, SCREENING])
    def score_emr() -> str:
        return tasks.score(get_current_context(), "emr_risk")

    @task(outlets=[FINDINGS])
    def score_ct() -> str:
        return tasks.score(get_current_context(), "ct_nodule")

    # A model left out of the run is skipped upstream, not failed: the gate still runs.
    @task(retries=0, trigger_rule=TriggerRule.NONE_FAILED)
    def qc_gate(emr_run: str | None, ct_run: str | None) -> dict:
        return publishing.qc_gate({"emr_risk": emr_run, "ct_nodule": ct_run})

    @task(retries=0)
    def publish(qc: dict) -> dict:
        return tasks.publish(get_current_context(), qc)

    @task(retries=0, trigger_rule=TriggerRule.NONE_FAILED)
    def report(qc: dict | None, published: dict | None) -> str:
        return str(tasks.report(get_current_context(), "nightly_screening",
                               {"qc": qc, "published": published}))

    engines = engines_ensure()
    emr_ingest >> emr_features >> engines
    dicom_index >> engines
    emr_run = score_emr()
    ct_run = score_ct()
    engines >> [emr_run, ct_run]
    [emr_ingest, dicom_index] >> imaging_link >> ct_run
    qc = qc_gate(emr_run, ct_run)
    published = publish(qc)
    report(qc, published)
