"""`medscreen demo` end to end: every stage runs for real and the summary adds up.

Two sizes: a small population with CT, where the demo's AUC checks cannot be judged (too few
labelled positives) and the test says so, and a population large enough that every AUC check
is judged, without CT (the CT checks are the small run's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conf.settings import load_settings

REPO = Path(__file__).resolve().parents[2]
AUC_CHECKS = {f"AUC {h} within 0.05 of the model card" for h in ("t2d", "ckd", "hf")}
ELIGIBILITY_CHECK = "nobody below a head's minimum age or without an encounter on its list"
CT_CHECK = "CT sensitivity >= 0.8 for nodules >= 6 mm within 5 mm"
PHI_CHECK = "PHI audit: no input identifier in the lake"


def _run_demo(workdir: Path, *args: str) -> tuple[dict[str, Any], str]:
    # A process of its own, as a user runs it: the demo stops its Spark session between stages,
    # which must not stop the test session's shared one.
    env = {k: v for k, v in os.environ.items() if k != "MEDSCREEN_PSEUDONYM_KEY"}  # it makes a 0600 key file
    proc = subprocess.run([sys.executable, "-m", "medscreen", "demo", "--workdir", str(workdir), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads((workdir / "summary.json").read_text()), proc.stdout


def _verdicts(summary: dict[str, Any]) -> dict[str, bool | None]:
    return {c["check"]: c["passed"] for c in summary["checks"]}


def _operating_points_printed(summary: dict[str, Any], out: str) -> None:
    """Each head's list size beside its threshold and the card's held-out sensitivity/PPV."""
    ops = summary["operating_points"]["heads"]
    assert set(ops) == {"t2d", "ckd", "hf"}
    for head, op in ops.items():
        assert op["source"].startswith("model card") and op["threshold"] is not None
        assert 0 < op["holdout_sensitivity"] < 1 and 0 < op["holdout_ppv"] < 1
        line = next(x for x in out.splitlines() if x.strip().startswith(f"list {head}"))
        assert f"{op['listed']:,} of {op['eligible']:,} eligible" in line
        assert f"sensitivity {op['holdout_sensitivity']}" in line and f"PPV {op['holdout_ppv']}" in line
    assert sum(op["listed"] for op in ops.values()) == summary["emr_check"]["screening_rows"]


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_a_balanced_summary(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    summary, out = _run_demo(workdir, "--patients", "400", "--ct-studies", "1", "--ct-rows", "256",
                             "--ct-slices", "48")
    assert (workdir / "pseudonym.key").stat().st_mode & 0o777 == 0o600

    # What the generator wrote is what ingest read, and ingest's ledger balances.
    ingest = summary["ingest"]["counts"]["emr_ingest"]
    assert sum(summary["synth_emr"]["files"].values()) == ingest["records_in"]
    assert ingest["balanced"] and ingest["records_in"] == (
        ingest["records_out"] + ingest["quarantined_total"] + ingest["ignored_total"])
    # Every patient has a timeline or is counted out of the as-of population with a reason.
    feats = summary["features"]
    assert feats["rows"] + sum(feats["patients_ignored"].values()) + sum(feats["patients_quarantined"].values()) == 400
    assert set(feats["patients_ignored"]) <= {"born_after_as_of", "deceased", "not_yet_registered",
                                              "not_under_observation"}
    assert summary["emr_check"]["scored"] == feats["rows"] > 0
    card = yaml.safe_load(Path(load_settings().models["emr_risk"]).read_text())
    for head in ("t2d", "ckd", "hf"):  # the card's held-out AUC, as the card states it
        assert summary["emr_check"][f"card_auc_{head}"] == card["metrics"]["heads"][head]["auc"] > 0.5
    assert summary["ct_check"]["nodules_ge_6mm"] > 0
    # Which checks were judged at this size, and that those passed: 400 patients give fewer labelled
    # positives than an AUC comparison needs (the large-population test below judges those).
    verdicts = _verdicts(summary)
    assert set(verdicts) == AUC_CHECKS | {ELIGIBILITY_CHECK, CT_CHECK, PHI_CHECK}
    for check in AUC_CHECKS:
        assert verdicts[check] is None
    for head in ("t2d", "ckd", "hf"):
        assert summary["emr_check"][f"positives_{head}"] < 200
    assert verdicts[ELIGIBILITY_CHECK] is True and verdicts[CT_CHECK] is True and verdicts[PHI_CHECK] is True
    _operating_points_printed(summary, out)

    lake = workdir / "lake"
    for partition in ("emr/timelines/as_of=2024-06-30", "scores/model=emr_risk/as_of=2024-06-30",
                      "screening/as_of=2024-06-30", "findings/model=ct_nodule/as_of=2024-06-30"):
        assert (lake / partition / "_SUCCESS").is_file(), partition
    report = (Path(summary["score_emr_run"]) / "report.html").read_text()
    assert "Reliability against this as-of" in report  # the demo's timelines carry labels
    assert "=== medscreen demo summary ===" in out and "(balanced)" in out
    assert "CT findings" in out and "check" in out
    # Series are joined to EMR patients by keyed MRN; every series is linked or counted unlinked.
    link = summary["imaging_link"]
    assert link["linked"] + sum(link["unlinked"].values()) == link["series"] > 0
    assert link["linked"] > 0  # the synthetic CT carries the synthetic EMR's MRNs
    assert "imaging ↔ EMR" in out and "worklist" in out
    # The PHI audit ran over the whole lake with both inputs' identifiers and found none.
    phi = summary["phi_audit"]
    assert phi["findings"] == [] and phi["files_scanned"] > 20
    assert {"fhir.name", "fhir.identifier", "fhir.birthDate", "dicom.PatientName", "dicom.PatientID",
            "dicom.AccessionNumber", "dicom.path"} <= set(phi["kinds"])
    assert "PHI audit" in out and "0 findings" in out
    _every_manifest_names_the_key(lake, workdir / "pseudonym.key")


def _every_manifest_names_the_key(lake: Path, key_file: Path) -> None:
    """Every manifest the pipeline wrote (each committed version of every table and partition, every
    run's manifest) records the fingerprint of the key the lake was written with."""
    from lake.keys import key_fingerprint, read_key_file

    fingerprint = key_fingerprint(read_key_file(key_file))
    manifests = sorted(p for p in lake.rglob("manifest.json") if not p.is_relative_to(lake / "engines"))
    stages = set()
    for path in manifests:
        manifest = json.loads(path.read_text())
        assert manifest.get("key_fingerprint") == fingerprint, path.relative_to(lake)
        stages.add(path.relative_to(lake).parts[0])
    # Tables and runs of every stage the demo runs: EMR and imaging tables, timelines, scores,
    # screening, findings, worklist, and the runs' own manifests.
    assert {"emr", "imaging", "scores", "screening", "findings", "worklist", "runs"} <= stages, stages


@pytest.mark.slow
def test_demo_judges_every_auc_check_on_a_large_enough_population(tmp_path: Path) -> None:
    # 10 000 patients (another seed than the model's training data) give each head over 200 labelled
    # positives at the demo's as-of date; no CT, which the small run covers.
    summary, out = _run_demo(tmp_path / "demo", "--patients", "10000", "--seed", "11", "--ct-studies", "0")
    verdicts = _verdicts(summary)
    assert set(verdicts) == AUC_CHECKS | {ELIGIBILITY_CHECK, PHI_CHECK}
    assert all(verdicts[c] is True for c in verdicts), summary["checks"]
    for head in ("t2d", "ckd", "hf"):
        assert summary["emr_check"][f"positives_{head}"] >= 200
    _operating_points_printed(summary, out)
