"""End to end: DICOM files → Ray Data → ONNX Runtime (committed model) → findings in the lake."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.settings import load_settings
from lake.commit import is_committed, read_manifest
from lake.keys import pseudonymise
from lake.paths import LakePaths
from lake.schemas import FINDINGS
from preprocessing.dicom_series import REASONS

AS_OF = "2024-06-30"


def _findings(lake_root: Path, trial: bool = False):
    part = LakePaths(lake_root).findings("ct_nodule", AS_OF, trial=trial)
    # partitioning=None: the path's model=/as_of= segments are not columns to infer.
    return pq.read_table([str(p) for p in sorted(part.glob("*.parquet"))], partitioning=None)
KEY = b"ct-score-test-key-0001"


@pytest.fixture(scope="module")
def scored(tiny_ct, series_index_writer, ray_local, tmp_path_factory):
    """Score once through the Python API, then again through the CLI (a full re-score of the same as-of)."""
    from inference import ct
    from medscreen.cli import main

    lake_root = tmp_path_factory.mktemp("ct_lake")
    series_index_writer(lake_root, KEY, tiny_ct["rows"])
    settings = load_settings({"lake.root": str(lake_root)})
    first = ct.score(settings, AS_OF)
    first_rows = _findings(lake_root).to_pylist()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["score", "ct", "--lake", str(lake_root), "--as-of", AS_OF, "--full"])
    assert rc == 0
    second = Path(out.getvalue().strip().splitlines()[-1])
    return {"lake": lake_root, "first": first, "second": second, "first_rows": first_rows}


def test_planted_nodule_is_found(scored, tiny_ct):
    rows = scored["first_rows"]
    key = pseudonymise(KEY, tiny_ct["with_nodule"]["series_instance_uid"])
    mine = [r for r in rows if r["series_key"] == key]
    truth = tiny_ct["with_nodule"]["nodules"][0]
    dist = [np.linalg.norm(np.subtract([r["centre_x_mm"], r["centre_y_mm"], r["centre_z_mm"]],
                                       truth["centre_lps_mm"])) for r in mine]
    assert mine and min(dist) <= 5.0, f"nearest finding {min(dist, default=None)} mm from the planted nodule"
    best = mine[int(np.argmin(dist))]
    assert abs(best["diameter_mm"] - truth["diameter_mm"]) <= 3.0
    assert best["max_prob"] >= 0.5 and 0.5 <= best["mean_prob"] <= best["max_prob"]
    # The nodule-free series yields no nodule-sized false positive.
    clean = pseudonymise(KEY, tiny_ct["no_nodule"]["series_instance_uid"])
    assert not [r for r in rows if r["series_key"] == clean and r["diameter_mm"] >= 6.0]


def test_findings_carry_provenance_and_schema(scored):
    part = LakePaths(scored["lake"]).findings("ct_nodule", AS_OF)
    assert is_committed(part)
    table = _findings(scored["lake"])
    assert table.schema.equals(FINDINGS, check_metadata=False)
    run_id = scored["second"].name
    for r in table.to_pylist():
        assert r["model"] == "ct_nodule" and r["model_version"] and r["run_id"] == run_id
        assert r["precision"] == "fp32" and r["engine_fingerprint"].startswith("onnxruntime-")
        assert str(r["as_of"]) == AS_OF
    manifest = read_manifest(part)
    assert manifest["run_id"] == run_id and manifest["series_scored"] == 2


def test_rerun_gives_identical_rows(scored):
    part = LakePaths(scored["lake"]).findings("ct_nodule", AS_OF)
    second = _findings(scored["lake"]).to_pylist()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "run_id"} for r in rows]  # noqa: E731
    assert strip(second) == strip(scored["first_rows"])
    # Replaced, not appended: one data file, and no staging leftovers.
    assert [p.name for p in part.glob("*.parquet")] == ["part-00000.parquet"]
    assert not [p for p in part.parent.iterdir() if p.name.startswith((".staging-", ".link-"))]


def test_ledger_balances_with_reasons(scored):
    for run_dir in (scored["first"], scored["second"]):
        ledger = json.loads((run_dir / "ledger.json").read_text())
        stage = ledger["stages"]["score_ct"]
        assert ledger["balanced"] and stage["balanced"]
        assert stage["records_in"] == 5 and stage["records_out"] == 2
        # The series of header-truncated files fails with one machine-readable reason.
        assert sum(stage["quarantined"].values()) == 1 and set(stage["quarantined"]) <= set(REASONS)
        assert stage["ignored"] == {"not_eligible": 1, "study_after_as_of": 1}
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["series_scored"] == 2 and metrics["volumes_per_min"] > 0
        assert metrics["patches"] > 0 and metrics["stage_s"]["engine_s"] > 0
        assert (run_dir / "manifest.json").is_file()


def test_no_raw_identifiers_in_outputs(scored, tiny_ct):
    lake = LakePaths(scored["lake"])
    blobs = [p.read_bytes() for p in lake.findings("ct_nodule", AS_OF).iterdir() if p.is_file()]
    blobs += [p.read_bytes() for p in scored["second"].iterdir()]
    for raw in (tiny_ct["with_nodule"]["patient_id"], tiny_ct["with_nodule"]["series_instance_uid"],
                "SYNTH^CTSCORE"):
        assert not any(raw.encode() in b for b in blobs)


def test_limit_scores_the_first_series_by_key_and_says_so(tiny_ct, series_index_writer, ray_local,
                                                          tmp_path, capsys):
    from medscreen.cli import main

    series_index_writer(tmp_path, KEY, tiny_ct["rows"])
    eligible = sorted(pseudonymise(KEY, r["series_uid"]) for r in tiny_ct["rows"]
                      if r["verdict"] == "eligible" and r["date"] <= AS_OF)
    assert main(["score", "ct", "--lake", str(tmp_path), "--as-of", AS_OF, "--limit", "2"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    stage = json.loads((run_dir / "ledger.json").read_text())["stages"]["score_ct"]
    assert stage["balanced"] and stage["records_in"] == 5
    assert stage["records_out"] + sum(stage["quarantined"].values()) == 2
    assert stage["ignored"] == {"not_eligible": 1, "study_after_as_of": 1, "beyond_limit": 1}
    failed = {r["series_key"] for r in metrics["failed"]}
    # A smoke run's findings live under trial/, never over a real run's.
    found = set(_findings(tmp_path, trial=True).column("series_key").to_pylist())
    assert not LakePaths(tmp_path).findings("ct_nodule", AS_OF).exists()
    assert metrics["series"] == 2 and not ({eligible[2]} & (failed | found))
    # Of the first two by key, the broken series fails and the nodule series has findings.
    broken = pseudonymise(KEY, tiny_ct["rows"][2]["series_uid"])
    nodule = pseudonymise(KEY, tiny_ct["with_nodule"]["series_instance_uid"])
    assert failed == {broken} & set(eligible[:2])
    assert (nodule in found) == (nodule in eligible[:2])
    manifest = read_manifest(LakePaths(tmp_path).findings("ct_nodule", AS_OF, trial=True))
    assert manifest["limit"] == 2 and manifest["series_available"] == 3


def test_qc_failure_commits_nothing_and_names_the_reason(tiny_ct, series_index_writer, ray_local, tmp_path):
    """A run whose findings look broken fails the QC gate before anything reaches the lake."""
    from inference import ct
    from inference.qc import QCFailed

    series_index_writer(tmp_path, KEY, tiny_ct["rows"])
    settings = load_settings({"lake.root": str(tmp_path), "imaging.qc.max_findings_per_series": 0.01,
                              "imaging.qc.max_failed_share": 0.2})
    with pytest.raises(QCFailed) as err:
        ct.score(settings, AS_OF)
    assert "findings per scored series" in str(err.value) and "could not be scored" in str(err.value)
    assert not LakePaths(tmp_path).findings("ct_nodule", AS_OF).exists()
    run_dir = next(LakePaths(tmp_path).runs.glob("*score*ct*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["qc"]["passed"] is False and len(metrics["qc"]["reasons"]) == 2
    assert json.loads((run_dir / "manifest.json").read_text())["status"] == "failed_qc"


def test_qc_verdict_is_recorded_for_a_passing_run(scored):
    metrics = json.loads((scored["first"] / "metrics.json").read_text())
    assert metrics["qc"]["passed"] is True and metrics["qc"]["reasons"] == []
    assert 0 < metrics["qc"]["checks"]["failed_share"] <= 0.5  # the fixture's broken series
