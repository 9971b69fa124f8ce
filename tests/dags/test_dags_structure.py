"""The DAG files import cleanly and declare what the operators and the UI rely on."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

NIGHTLY_EDGES = {
    ("emr_ingest", "emr_features"), ("emr_features", "engines_ensure"),
    ("dicom_index", "engines_ensure"), ("engines_ensure", "score_emr"),
    ("engines_ensure", "score_ct"), ("score_emr", "qc_gate"), ("score_ct", "qc_gate"),
    ("qc_gate", "publish"), ("publish", "report"), ("qc_gate", "report"),
    ("emr_ingest", "imaging_link"), ("dicom_index", "imaging_link"), ("imaging_link", "score_ct"),
}


def _edges(dag) -> set[tuple[str, str]]:
    return {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}


def test_dags_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert {"nightly_screening", "cohort_retrospective"} <= set(dagbag.dag_ids)


def test_dag_files_parse_without_settings(tmp_path: Path) -> None:
    """Parsing reads no settings: with a configuration that cannot load, both DAG files still parse."""
    import os
    import subprocess
    import sys

    broken = tmp_path / "broken.yaml"
    broken.write_text("lake: {root: [not, a, path]}\nno_such_section: 1\n")
    env = {**os.environ, "MEDSCREEN_CONFIG": str(broken), "MEDSCREEN_SPARK__MASTER": "",
           "MEDSCREEN_RAY__ACTOR_NUM_CPUS": "not-a-number"}
    code = ("import runpy, sys\n"
            "from conf.settings import ConfigError, load_settings\n"
            "try:\n    load_settings()\nexcept (ConfigError, ValueError):\n    pass\n"
            "else:\n    sys.exit('this configuration was meant not to load')\n"
            "for f in sys.argv[1:]:\n    runpy.run_path(f)\n")
    dags = Path(__file__).resolve().parents[2] / "dags"
    proc = subprocess.run([sys.executable, "-c", code, str(dags / "nightly_screening.py"),
                           str(dags / "cohort_retrospective.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_nightly_schedule_and_run_limits(dagbag) -> None:
    from airflow.timetables.interval import CronDataIntervalTimetable

    dag = dagbag.dags["nightly_screening"]
    assert isinstance(dag.timetable, CronDataIntervalTimetable)
    assert dag.timetable._expression == "0 2 * * *"
    assert str(dag.timetable._timezone) in ("UTC", "Timezone('UTC')")
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    # The 02:00 run of 2024-07-01 is the run of logical date (= as-of) 2024-06-30.
    info = dag.timetable.next_dagrun_info(
        last_automated_data_interval=None,
        restriction=_restriction(dt.datetime(2024, 6, 30, 2, tzinfo=dt.timezone.utc)))
    assert info.logical_date.date() == dt.date(2024, 6, 30)
    assert info.run_after == dt.datetime(2024, 7, 1, 2, tzinfo=dt.timezone.utc)


def _restriction(earliest: dt.datetime):
    from airflow.timetables.base import TimeRestriction

    return TimeRestriction(earliest=earliest, latest=None, catchup=True)


def test_nightly_tasks_and_dependencies(dagbag) -> None:
    dag = dagbag.dags["nightly_screening"]
    assert {t.task_id for t in dag.tasks} == {
        "emr_ingest", "dicom_index", "imaging_link", "emr_features", "engines_ensure", "score_emr",
        "score_ct", "qc_gate", "publish", "report"}
    assert _edges(dag) == NIGHTLY_EDGES


def test_spark_steps_go_through_the_spark_provider(dagbag) -> None:
    from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator

    from medscreen_airflow import declarations, spark_submit

    dag = dagbag.dags["nightly_screening"]
    for task_id, job in (("emr_ingest", "emr_ingest"), ("emr_features", "emr_features"),
                         ("dicom_index", "dicom_index"), ("imaging_link", "imaging_link")):
        task = dag.get_task(task_id)
        assert isinstance(task, SparkSubmitOperator)
        assert task._conn_id == "spark_default"
        assert Path(task.application) == spark_submit.job_file(job)
        assert Path(task.application).is_file(), f"{task.application} (spark-submit application) missing"
    # Shared tables are rebuilt one at a time across all DAG runs (backfills included).
    for task_id in ("emr_ingest", "dicom_index", "imaging_link", "engines_ensure"):
        assert dag.get_task(task_id).pool == declarations.SHARED_TABLE_POOL


def test_retries_back_off_exponentially(dagbag) -> None:
    dag = dagbag.dags["nightly_screening"]
    for task_id in ("emr_ingest", "emr_features", "engines_ensure", "score_emr", "score_ct"):
        task = dag.get_task(task_id)
        assert task.retries >= 1 and task.retry_exponential_backoff > 1
        assert task.max_retry_delay == dt.timedelta(minutes=30)
    # A QC verdict does not change on retry: the gate fails at once.
    assert dag.get_task("qc_gate").retries == 0


def test_outputs_are_declared_as_assets(dagbag) -> None:
    dag = dagbag.dags["nightly_screening"]
    uris = {a.uri for t in dag.tasks for a in t.outlets}
    assert {"medscreen://lake/emr/events", "medscreen://lake/emr/timelines",
            "medscreen://lake/scores/model=emr_risk", "medscreen://lake/findings/model=ct_nodule",
            "medscreen://lake/screening"} <= uris


def test_nightly_params_are_typed(dagbag) -> None:
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    dag = dagbag.dags["nightly_screening"]
    assert dag.params["as_of"] is None
    assert dag.params["models"] == ["emr_risk", "ct_nodule"]
    schema = {k: dag.params.get_param(k).schema for k in dag.params}
    assert schema["as_of"]["format"] == "date"
    assert schema["patient_limit"]["type"] == ["null", "integer"]

    def validate(**values):
        params = ParamsDict(dag.params.deep_copy() if hasattr(dag.params, "deep_copy") else dag.params)
        for k, v in values.items():
            params[k] = v
        return params.validate()

    assert validate(as_of="2024-06-30", patient_limit=10)["patient_limit"] == 10
    with pytest.raises((ParamValidationError, ValueError)):
        validate(models=["not_a_model"])
    with pytest.raises((ParamValidationError, ValueError)):
        validate(patient_limit=0)


def test_cohort_dag_is_manual_with_mapped_steps(dagbag) -> None:
    from conf.settings import CONF_DIR
    from inference.cohort import code_group_names

    dag = dagbag.dags["cohort_retrospective"]
    assert dag.schedule is None and type(dag.timetable).__name__ == "NullTimetable"
    mapped = {t.task_id for t in dag.tasks if getattr(t, "is_mapped", False) or
              type(t).__name__ == "MappedOperator"}
    assert {"emr_features", "score_emr", "score_ct", "select_members"} <= mapped
    # The packaged concept sets: the form is built without loading settings.
    groups = code_group_names(CONF_DIR / "code_groups.yaml")
    assert groups, "conf/code_groups.yaml defines no groups"
    items = dag.params.get_param("include_groups").schema["items"]
    assert items["enum"] == groups
    assert set(dag.params) == {"cohort_name", "include_groups", "exclude_groups", "age_min_years",
                               "age_max_years", "index_start", "index_end", "step_days", "models",
                               "replace", "force_ungated", "require_ct_findings"}
