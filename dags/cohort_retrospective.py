"""Cohort retrospective: score a research cohort at a series of past index dates.

Manual only. The trigger form asks for the cohort's name, the code groups
(concept sets over ICD-10-CM, ICD-9-CM, SNOMED CT and OMOP concepts,
conf/code_groups.yaml) to include and exclude, the age range, the index-date
range and step, and the models. Features and scoring run once per index date
as mapped tasks; members and their scores land under LAKE/cohorts/<name>/
beside the stored definition. Selection logic: inference.cohort.

The code-group choices of the form come from the packaged conf/code_groups.yaml
(no settings are read at parse time); ``define`` checks the chosen groups
against the configured file when the run starts.
"""
from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG, Asset, Param, TriggerRule, get_current_context, task

from medscreen_airflow import cohort_tasks, tasks
from medscreen_airflow import declarations as decl
from medscreen_airflow.shared_tables import ImagingLinkSparkSubmitOperator, SharedTableSparkSubmitOperator
from medscreen_airflow.spark_submit import LakeSparkSubmitOperator

GROUPS = decl.code_group_choices()
_group_items = {"type": "string", **({"enum": GROUPS} if GROUPS else {})}

COHORTS = Asset(name="medscreen.cohorts", uri="medscreen://lake/cohorts")
EVENTS = Asset(name="medscreen.emr.events", uri="medscreen://lake/emr/events")

with DAG(
    dag_id="cohort_retrospective",
    description="Research cohort: features + scoring at each index date, members under LAKE/cohorts/<name>/",
    schedule=None,
    start_date=dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
    catchup=False,
    default_args=decl.default_args(),
    tags=["medscreen", "cohort"],
    params={
        "cohort_name": Param("my-cohort", type="string", pattern=decl.cohort_name_pattern(),
                             title="Cohort name", description="Results go to LAKE/cohorts/<name>/"),
        "include_groups": Param(GROUPS[:1], type="array", items=_group_items, minItems=1,
                                uniqueItems=True, title="Include code groups",
                                description="Patients with an affirmed or history diagnosis in any of these "
                                            "(any vocabulary), known by the index date."),
        "exclude_groups": Param([], type="array", items=_group_items, uniqueItems=True,
                                title="Exclude code groups",
                                description="Patients with any of these are left out."),
        "age_min_years": Param(18, type="number", minimum=0, maximum=120, title="Minimum age (years)"),
        "age_max_years": Param(90, type="number", minimum=0, maximum=120, title="Maximum age (years)"),
        "index_start": Param("2024-01-31", type="string", format="date", title="First index date"),
        "index_end": Param("2024-06-30", type="string", format="date", title="Last index date"),
        "step_days": Param(30, type="integer", minimum=1, title="Step (days)"),
        "models": Param(["emr_risk"], type="array", minItems=1, uniqueItems=True,
                        items={"type": "string", "enum": list(decl.MODELS)}, title="Models"),
        "require_ct_findings": Param(False, type="boolean", title="Only patients with CT findings",
                                     description="Keep only members with CT findings at the index "
                                                 "date (needs ct_nodule among the models)."),
        "force_ungated": Param(False, type="boolean", title="Force ungated engines (smoke runs)",
                               description="Score even with an engine that has not passed its "
                                           "accuracy gate. Never for results anyone acts on."),
        "replace": Param(False, type="boolean", title="Replace an existing cohort of this name"),
    },
    doc_md=__doc__,
) as dag:

    @task(retries=0)
    def define() -> list[str]:
        """Validate the form, store the definition, return the index dates."""
        return cohort_tasks.define_cohort(get_current_context())

    emr_ingest = SharedTableSparkSubmitOperator(
        task_id="emr_ingest", job="emr_ingest", pool=decl.SHARED_TABLE_POOL, outlets=[EVENTS])

    dicom_index = SharedTableSparkSubmitOperator(
        task_id="dicom_index", job="dicom_index", pool=decl.SHARED_TABLE_POOL)

    imaging_link = ImagingLinkSparkSubmitOperator(
        task_id="imaging_link", job="imaging_link", pool=decl.SHARED_TABLE_POOL,
        trigger_rule=TriggerRule.NONE_FAILED)

    index_dates = define()
    # One Spark job per index date; one at a time so the JVMs do not crowd small machines.
    emr_features = LakeSparkSubmitOperator.partial(
        task_id="emr_features", job="emr_features", trigger_rule=TriggerRule.NONE_FAILED,
        max_active_tis_per_dag=1,
    ).expand(as_of=index_dates)

    @task(trigger_rule=TriggerRule.NONE_FAILED, pool=decl.SHARED_TABLE_POOL)
    def engines_ensure(dates: list[str]) -> list[str]:
        return tasks.ensure_engines(get_current_context(), as_of=max(dates))

    @task(max_active_tis_per_dag=1)
    def score_emr(as_of: str) -> str | None:
        # Index dates are step_days apart and finish in any order: no night-to-night drift check.
        return tasks.score(get_current_context(), "emr_risk", as_of=as_of, drift_check=False)

    @task(max_active_tis_per_dag=1, trigger_rule=TriggerRule.NONE_FAILED)
    def score_ct(as_of: str) -> str | None:
        return tasks.score(get_current_context(), "ct_nodule", as_of=as_of)

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    def select_members(as_of: str) -> dict:
        return cohort_tasks.cohort_index_date(get_current_context(), as_of)

    @task(retries=0, outlets=[COHORTS])
    def summarize(per_date: list[dict]) -> str:
        return str(cohort_tasks.cohort_summary(get_current_context(), list(per_date)))

    engines = engines_ensure(index_dates)
    emr_ingest >> emr_features >> engines
    dicom_index >> engines
    emr_scores = score_emr.expand(as_of=index_dates)
    ct_findings = score_ct.expand(as_of=index_dates)
    engines >> [emr_scores, ct_findings]
    [emr_ingest, dicom_index] >> imaging_link >> ct_findings
    selected = select_members.expand(as_of=index_dates)
    [emr_scores, ct_findings] >> selected
    summarize(selected)
