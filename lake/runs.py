"""Run directories: ``LAKE/runs/<run_id>/`` with manifest.json, ledger.json, metrics.json."""
from __future__ import annotations

import datetime as dt
import json
import secrets
from pathlib import Path
from typing import Any


def new_run_id(stage: str) -> str:
    """A sortable, unique run id: ``<UTC timestamp>-<stage>-<random>``."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{stage}-{secrets.token_hex(3)}"


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    tmp.replace(path)
    return path
