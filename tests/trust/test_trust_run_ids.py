"""The run id of an orchestrated stage is the same on every retry of one task in one DAG run, so the
retry resumes that run; different tasks, map indexes and DAG runs never share one."""
from __future__ import annotations

import re

from lake.runs import new_run_id, orchestrated_run_id


def test_every_try_of_one_task_gets_one_run_id_and_others_differ():
    dag_run = "scheduled__2024-06-30T02:00:00+00:00"
    first = orchestrated_run_id("score_emr", dag_run, "score_emr")
    assert first == orchestrated_run_id("score_emr", dag_run, "score_emr")
    # Safe as a directory name and a CLI argument.
    assert re.fullmatch(r"[A-Za-z0-9._-]+", first) and "2024-06-30T02_00_00_00_00" in first
    others = {orchestrated_run_id("score_ct", dag_run, "score_ct"),
              orchestrated_run_id("score_emr", "backfill__2024-06-30T02:00:00+00:00", "score_emr"),
              orchestrated_run_id("score_emr", dag_run, "score_emr", 0),
              orchestrated_run_id("score_emr", dag_run, "score_emr", 1)}
    assert first not in others and len(others) == 4
    # Airflow's -1 means "not mapped".
    assert orchestrated_run_id("score_emr", dag_run, "score_emr", -1) == first


def test_long_dag_run_ids_stay_short_and_distinct():
    a = orchestrated_run_id("score_emr", "manual__" + "x" * 300, "score_emr")
    b = orchestrated_run_id("score_emr", "manual__" + "x" * 299 + "y", "score_emr")
    assert len(a) <= 120 and len(b) <= 120 and a != b
    assert new_run_id("score_emr") != new_run_id("score_emr")
