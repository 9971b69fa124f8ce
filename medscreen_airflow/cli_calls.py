"""Ray and engine steps under Airflow: the ``medscreen`` CLI run in a child process, its argv,
its Ray address, and its failures surfaced in the task log."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from conf.settings import Settings
from lake.paths import as_of_str
from medscreen_airflow.errors import OrchestrationError

log = logging.getLogger(__name__)

# Where a Ray cluster address may be configured in Airflow; unset → settings' ray.address → local Ray.
RAY_ADDRESS_VARIABLE = "medscreen_ray_address"
RAY_CONN_ID = "medscreen_ray"


def ray_address(settings: Settings) -> str | None:
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
    return address or settings.ray.address


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


def patient_limit_args(limit: int) -> list[str]:
    """``--limit N`` for ``medscreen score KIND``: the first N timelines (emr) or N series (ct)."""
    if limit < 1:
        raise OrchestrationError(f"patient_limit must be at least 1, got {limit}")
    return ["--limit", str(limit)]
