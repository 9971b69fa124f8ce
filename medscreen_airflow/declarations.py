"""What the DAG files declare from, read without settings: the cron, the models, the retry policy
and the cohort form's code-group choices.

DAG files are parsed over and over by the DAG processor, on machines that may
not hold the pipeline's configuration, so nothing here loads settings. The
code-group choices come from the packaged ``conf/code_groups.yaml``; the
cohort's ``define`` task validates the chosen groups again, at run time,
against the configured file (``extraction.code_groups_file``).
"""
from __future__ import annotations

import datetime as dt
import os
from typing import Any

# The nightly cron (UTC). The run that fires at 02:00 on day X has the logical
# date X-1 (a data-interval timetable), so its as-of day is complete.
NIGHTLY_CRON = os.environ.get("MEDSCREEN_NIGHTLY_CRON", "0 2 * * *")
# One slot: the scheduler never runs two shared-table builds at once, across all DAG runs.
SHARED_TABLE_POOL = "medscreen_shared_tables"
MODELS = ("emr_risk", "ct_nodule")


def default_args() -> dict[str, Any]:
    """Task defaults of both DAGs: retried twice (MEDSCREEN_AIRFLOW_RETRIES), backing off 2 → 30 minutes."""
    return {
        "owner": "medscreen",
        "retries": int(os.environ.get("MEDSCREEN_AIRFLOW_RETRIES", "2")),
        "retry_delay": dt.timedelta(minutes=2),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(minutes=30),
    }


def code_group_choices() -> list[str]:
    """The group names of the packaged ``conf/code_groups.yaml`` (sorted), for the cohort form.

    The default of ``extraction.code_groups_file``, read from the settings model's field, not from
    loaded settings: no environment or configuration file is consulted at parse time.
    """
    from conf.settings import ExtractionSettings
    from inference.cohort import code_group_names

    return code_group_names(ExtractionSettings.model_fields["code_groups_file"].default)


def cohort_name_pattern() -> str:
    """The pattern a cohort name must match (the form checks it; ``define`` checks it again)."""
    from inference.cohort import NAME_PATTERN

    return NAME_PATTERN.pattern
