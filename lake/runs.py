"""Run directories: ``LAKE/runs/<run_id>/`` with manifest.json, ledger.json, metrics.json."""
from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets


def new_run_id(stage: str) -> str:
    """A sortable, unique run id: ``<UTC timestamp>-<stage>-<random>``."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{stage}-{secrets.token_hex(3)}"


def orchestrated_run_id(stage: str, dag_run_id: str, task_id: str, map_index: int | None = None) -> str:
    """The run id of a stage run by an orchestrator task: the same for every retry of that task in
    that DAG run, so a retry resumes the run its failed try left (``<stage>-<dag run>-<task>[-i]``)."""
    raw = f"{stage}-{dag_run_id}-{task_id}" + (f"-{map_index}" if map_index not in (None, -1) else "")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._-")
    if len(safe) > 120:  # long DAG run ids: keep it readable, keep it unique
        safe = f"{safe[:100]}-{hashlib.sha256(raw.encode()).hexdigest()[:12]}"
    return safe


