"""QC gate, publishing and the run report under Airflow: a scoring run is judged by its ledger and
QC verdict, a screening list is published only when every check passes, and each DAG run commits
one report."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from lake.commit import atomic_partition, is_committed, read_manifest, reading
from lake.files import write_json_atomic
from lake.locks import lake_lock, store_dir
from lake.paths import LakePaths, as_of_str
from medscreen_airflow.errors import PublishRefused, QCGateFailed


def qc_gate(run_dirs: dict[str, str | None]) -> dict[str, Any]:
    """Check each scoring run: ledger balanced, QC passed. Raise QCGateFailed listing every reason.

    ``run_dirs`` maps the model to its run directory (None when that model was
    not run in this DAG run). Returns a summary per model for the report.
    """
    reasons: list[str] = []
    summary: dict[str, Any] = {}
    for model, run_dir in run_dirs.items():
        if not run_dir:
            summary[model] = {"status": "not run"}
            continue
        rd = Path(run_dir)
        ledger_path = rd / "ledger.json"
        if not ledger_path.is_file():
            reasons.append(f"{model}: run {rd.name} wrote no ledger.json")
            continue
        ledger = json.loads(ledger_path.read_text())
        for stage, s in sorted(ledger.get("stages", {}).items()):
            if not s.get("balanced", False):
                reasons.append(f"{model}: stage {stage} does not balance: {s.get('records_in')} in, "
                               f"{s.get('records_out')} out, {s.get('quarantined_total')} quarantined")
        metrics_path = rd / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        qc = metrics.get("qc") if isinstance(metrics.get("qc"), dict) else {}
        passed = qc.get("passed")
        if passed is None:
            # No verdict is not a pass: a run that never judged its scores must not be published.
            reasons.append(f"{model}: run {rd.name} recorded no QC verdict "
                           f"({'no metrics.json' if not metrics_path.is_file() else 'metrics.json has no qc.passed'})")
        elif passed is not True:
            for r in qc.get("reasons") or qc.get("failures") or ["QC failed (no reason recorded)"]:
                reasons.append(f"{model}: QC: {r}")
        summary[model] = {"run_dir": str(rd), "run_id": rd.name,
                          "ledger_balanced": bool(ledger.get("balanced", False)), "qc": qc}
    if reasons:
        raise QCGateFailed("QC gate failed:\n" + "\n".join(f"- {r}" for r in reasons))
    return summary


def publish_checks(lake_root: Path, as_of: str, expected_run_id: str | None = None) -> dict[str, Any]:
    """What publishing the screening list of as-of D depends on, each check with its verdict.

    The list must be committed in the real (not trial) namespace, come from a
    run that was neither limited nor forced ungated, from scores that passed QC
    with a gated engine, and every ledger on the way must balance; with
    ``expected_run_id`` it must also be that scoring run's list. Returns
    ``{"passed": bool, "checks": {name: {"passed": bool, "detail": str}}, ...}``.
    """
    lake = LakePaths(lake_root)
    as_of = as_of_str(as_of)
    partition = lake.screening(as_of)
    checks: dict[str, dict[str, Any]] = {}

    def check(name: str, ok: bool, detail: str) -> None:
        checks[name] = {"passed": bool(ok), "detail": detail}

    if not is_committed(partition):
        check("committed", False, f"screening list {partition.name} is not committed; "
              "`medscreen score emr` writes it — check that task's log")
        return {"passed": False, "checks": checks, "as_of": as_of}
    with reading(partition) as version:
        manifest = read_manifest(version)
    check("committed", True, f"version {manifest.get('version')}")
    scores_dir = lake.scores("emr_risk", as_of)
    scores_version = store_dir(scores_dir) / str(manifest.get("scores_version"))
    scores = read_manifest(scores_version) if manifest.get("scores_version") and \
        is_committed(scores_version) else {}
    check("scores_version", bool(scores), f"scores version {manifest.get('scores_version')}"
          + ("" if scores else " is not kept any more (or was never recorded); score again"))
    limit = manifest.get("limit") if manifest.get("limit") is not None else scores.get("limit")
    check("limit", not limit, "full run" if not limit else f"a smoke run limited to {limit} timelines")
    forced = bool(manifest.get("force_ungated") or scores.get("force_ungated") or manifest.get("trial"))
    gate_passed = (scores.get("engine") or {}).get("gate_passed")
    check("gate", gate_passed is True and not forced,
          "engine passed its accuracy gate" if gate_passed is True and not forced
          else f"engine gate verdict {gate_passed!r}{', scored with --force-ungated' if forced else ''}")
    qc_passed = scores.get("qc_passed", manifest.get("qc_passed"))
    check("qc", qc_passed is True, "scores passed QC" if qc_passed is True else f"QC verdict {qc_passed!r}")
    ledger = manifest.get("ledger") or {}
    scores_run = scores.get("run_id") or manifest.get("scores_run_id")
    run_ledger_path = lake.run(str(scores_run)) / "ledger.json" if scores_run else None
    run_ledger = json.loads(run_ledger_path.read_text()) if run_ledger_path and run_ledger_path.is_file() else {}
    balanced = bool(ledger.get("balanced")) and bool(run_ledger.get("balanced"))
    check("ledger", balanced, "screening and scoring ledgers balance" if balanced else
          f"screening ledger balanced={ledger.get('balanced')!r}, scoring run ledger "
          f"balanced={run_ledger.get('balanced')!r}")
    if expected_run_id is not None:
        check("run", scores_run == expected_run_id,
              f"list from scoring run {scores_run}" + ("" if scores_run == expected_run_id
                                                        else f", not this DAG run's {expected_run_id}"))
    return {"passed": all(c["passed"] for c in checks.values()), "checks": checks, "as_of": as_of,
            "version": manifest.get("version"), "scores_version": manifest.get("scores_version"),
            "scores_run_id": scores_run}


def publish_screening(lake_root: Path, as_of: str, expected_run_id: str | None = None) -> dict[str, Any]:
    """Point ``LAKE/screening/LATEST.json`` at as-of D's list unless a newer date is published.

    The list ``LAKE/screening/as_of=D/`` itself is written (atomically) by
    scoring; publishing makes it the list consumers read, naming the exact
    version, and records every check of :func:`publish_checks`. A list that
    fails a check is refused (:class:`PublishRefused`, LATEST.json unchanged);
    a backfill of an old date never moves the pointer backwards.
    """
    lake = LakePaths(lake_root)
    as_of = as_of_str(as_of)
    partition = lake.screening(as_of)
    pointer = partition.parent / "LATEST.json"
    with lake_lock(lake_root, "screening_publish", f"publish-{as_of}"):
        verdict = publish_checks(lake_root, as_of, expected_run_id)
        if not verdict["passed"]:
            failed = [f"{name}: {c['detail']}" for name, c in verdict["checks"].items() if not c["passed"]]
            raise PublishRefused(f"screening list of {as_of} not published (LATEST.json unchanged):\n"
                                 + "\n".join(f"- {f}" for f in failed))
        current = json.loads(pointer.read_text()) if pointer.is_file() else {}
        moved = current.get("as_of", "") <= as_of
        if moved:
            write_json_atomic(pointer, {"as_of": as_of, "path": str(partition), "version": verdict["version"],
                                 "version_path": str(store_dir(partition) / verdict["version"]),
                                 "scores_version": verdict["scores_version"],
                                 "checks": verdict["checks"],
                                 "published_at_utc": dt.datetime.now(dt.timezone.utc).isoformat()})
    return {"as_of": as_of, "partition": str(partition), "version": verdict["version"],
            "latest": as_of if moved else current["as_of"], "checks": verdict["checks"]}


def write_report(lake_root: Path, dag_id: str, as_of: str, airflow_run_id: str,
                 sections: dict[str, Any]) -> Path:
    """Commit ``LAKE/reports/<dag_id>/as_of=D/report.json`` (a rerun replaces it)."""
    as_of = as_of_str(as_of)
    final = LakePaths(lake_root).report(dag_id, as_of)
    report = {"dag_id": dag_id, "as_of": as_of, "airflow_run_id": airflow_run_id,
              "written_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(), **sections}
    with atomic_partition(final, {"dag_id": dag_id, "as_of": as_of}) as staging:
        (staging / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str))
    return final / "report.json"
