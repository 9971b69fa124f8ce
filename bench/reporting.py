"""What every Ray benchmark here does around its measurements: report the error it hit, stop its Ray, remove
its scratch directory, print one JSON object last and exit non-zero when it failed."""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def reported(result: dict[str, Any], workdir: Path, keep_workdir: bool) -> Iterator[dict[str, Any]]:
    """Run a benchmark's body: ``result["status"]`` becomes ``ok``, or ``error`` with the exception named;
    Ray (when started) is shut down and ``workdir`` removed unless ``keep_workdir``."""
    try:
        yield result
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 — a bench reports what it got, then fails loudly
        result["status"] = "error"
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def emit(result: dict[str, Any]) -> int:
    """Print ``result`` as the last line of output; the exit code its status calls for."""
    print(json.dumps(result, default=str))
    return 0 if result.get("status") == "ok" else 1
