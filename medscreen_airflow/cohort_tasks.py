"""Task bodies of the cohort DAG: validate and store the definition, select members per index
date, write the summary. Selection itself is inference.cohort."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conf.settings import Settings, load_settings
from inference import cohort
from lake.paths import LakePaths
from medscreen_airflow.declarations import MODELS
from medscreen_airflow.tasks import task_run_id


def define_cohort(context: Any) -> list[str]:
    """Validate the cohort form against the configured code groups, store its definition beside the
    results; return the index dates."""
    settings = load_settings()
    params = dict(context["params"])
    definition = cohort.define_cohort(params, cohort.code_group_names(settings.extraction.code_groups_file),
                                      MODELS)
    cohort.store_definition(settings.lake.root, definition, replace=bool(params.get("replace")))
    return definition.index_dates()


def _stored_definition(context: Any, settings: Settings) -> cohort.CohortDefinition:
    path = LakePaths(settings.lake.root).cohort(str(context["params"]["cohort_name"])) / "definition.json"
    return cohort.CohortDefinition(**json.loads(path.read_text()))


def cohort_index_date(context: Any, as_of: str) -> dict[str, Any]:
    """Select the cohort's members at one index date and commit them with their scores."""
    settings = load_settings()
    return cohort.write_index_date(settings.lake.root, _stored_definition(context, settings), as_of,
                                   trial=bool(context["params"].get("force_ungated")),
                                   run_id=task_run_id(context, "cohort_select"), pseudonym=settings.pseudonym)


def cohort_summary(context: Any, per_date: list[dict[str, Any]]) -> Path:
    """Write the cohort's summary.json from the per-date counts."""
    settings = load_settings()
    return cohort.write_summary(settings.lake.root, _stored_definition(context, settings), per_date,
                                context["run_id"])
