"""`medscreen demo` end to end on a small population: every stage runs for real and the summary adds up."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs_every_stage_and_prints_a_balanced_summary(tmp_path: Path) -> None:
    # A process of its own, as a user runs it: the demo stops its Spark session between stages,
    # which must not stop the test session's shared one.
    env = {k: v for k, v in os.environ.items() if k != "MEDSCREEN_PSEUDONYM_KEY"}  # it makes a 0600 key file
    workdir = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "medscreen", "demo", "--workdir", str(workdir),
                           "--patients", "400", "--ct-studies", "1", "--ct-rows", "256", "--ct-slices", "48"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
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
    for head in ("t2d", "ckd", "hf"):
        assert summary["emr_check"][f"card_auc_{head}"] is not None  # the card's held-out AUC was found
    assert summary["ct_check"]["nodules_ge_6mm"] > 0
    assert [c for c in summary["checks"] if c["passed"] is False] == []

    lake = workdir / "lake"
    for partition in ("emr/timelines/as_of=2024-06-30", "scores/model=emr_risk/as_of=2024-06-30",
                      "screening/as_of=2024-06-30", "findings/model=ct_nodule/as_of=2024-06-30"):
        assert (lake / partition / "_SUCCESS").is_file(), partition
    assert (Path(summary["score_emr_run"]) / "report.html").is_file()
    assert "=== medscreen demo summary ===" in out and "(balanced)" in out
    assert "CT findings" in out and "check" in out
    # Series are joined to EMR patients by keyed MRN; every series is linked or counted unlinked.
    link = summary["imaging_link"]
    assert link["linked"] + sum(link["unlinked"].values()) == link["series"] > 0
    assert link["linked"] > 0  # the synthetic CT carries the synthetic EMR's MRNs
    assert "imaging ↔ EMR" in out and "worklist" in out
