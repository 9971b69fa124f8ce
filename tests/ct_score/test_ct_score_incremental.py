"""CT scoring is incremental and resumable at series granularity: a nightly run after one new study
scores only that study's series; a driver killed mid-run is resumed by its retry; both give the rows
of a full re-score (real Ray, real ONNX Runtime, real DICOM files, a real SIGKILL)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conf.settings import load_settings
from lake.commit import partition_files, read_manifest
from lake.paths import LakePaths

AS_OF = "2024-06-30"
KEY = b"ct-incremental-test-key-01"
REPO = Path(__file__).resolve().parents[2]


def rows(lake_root: Path) -> list[dict]:
    table = pq.read_table([str(p) for p in partition_files(LakePaths(lake_root).findings("ct_nodule", AS_OF))],
                          partitioning=None)
    return sorted(({k: v for k, v in r.items() if k != "run_id"} for r in table.to_pylist()),
                  key=lambda r: (r["series_key"], r["finding_id"]))


def run_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_nightly_run_after_one_new_study_scores_only_its_series(tiny_ct, series_index_writer, ray_local,
                                                                 tmp_path):
    from inference import ct

    settings = load_settings({"lake.root": str(tmp_path)})
    first_night = [tiny_ct["rows"][i] for i in (0, 2, 3)]   # nodule series, broken series, localizer
    series_index_writer(tmp_path, KEY, first_night)
    night1 = run_summary(ct.score(settings, AS_OF))
    assert (night1["series_reused"], night1["series_scored_this_run"]) == (0, 2)

    series_index_writer(tmp_path, KEY, first_night + [tiny_ct["rows"][1]])  # one new study arrives
    night2_dir = ct.score(settings, AS_OF)
    night2 = run_summary(night2_dir)
    assert (night2["series_reused"], night2["series_scored_this_run"]) == (2, 1)
    incremental = rows(tmp_path)
    stage = json.loads((night2_dir / "ledger.json").read_text())["stages"]["score_ct"]
    assert stage["balanced"] and stage["records_out"] == 2 and sum(stage["quarantined"].values()) == 1

    full_dir = ct.score(settings, AS_OF, full=True)
    full = run_summary(full_dir)
    assert (full["series_reused"], full["series_scored_this_run"]) == (0, 3)
    assert rows(tmp_path) == incremental and incremental
    assert read_manifest(LakePaths(tmp_path).findings("ct_nodule", AS_OF))["full_rescore"] is True


def test_a_run_keeps_the_results_it_reuses_and_collects_what_no_run_used_for_the_retention(
        tiny_ct, series_index_writer, ray_local, tmp_path):
    from inference import ct

    settings = load_settings({"lake.root": str(tmp_path), "imaging.scored_series_retention_days": 30})
    series_index_writer(tmp_path, KEY, [tiny_ct["rows"][0]])
    ct.score(settings, AS_OF)
    scope = tmp_path / ct.SERIES_RESULTS / "model=ct_nodule"
    (config,) = [p for p in scope.iterdir() if p.is_dir()]
    (result,) = [p for p in config.iterdir() if p.suffix == ".json"]
    long_ago = time.time() - 60 * 86400
    os.utime(result, (long_ago, long_ago))      # last used 60 days ago, but still this series' result
    changed = config / f"{result.name.split('.')[0]}.0000000000000000000000.json"
    changed.write_text(result.read_text())      # the series before its files changed
    retired = scope / "0123456789abcdef"        # results of an engine no run uses any more
    retired.mkdir()
    (retired / "x.y.json").write_text("{}")
    for p in (changed, retired / "x.y.json"):
        os.utime(p, (long_ago, long_ago))

    night2 = run_summary(ct.score(settings, AS_OF))
    assert (night2["series_reused"], night2["series_scored_this_run"]) == (1, 0)
    assert result.is_file() and result.stat().st_mtime > time.time() - 3600, "a reused result was not kept fresh"
    assert not changed.exists() and not retired.exists()


def test_a_driver_killed_mid_run_is_resumed_by_its_retry(tiny_ct, series_index_writer, ray_local, tmp_path):
    from inference import ct

    series_index_writer(tmp_path, KEY, tiny_ct["rows"])
    store = tmp_path / ct.SERIES_RESULTS
    cmd = [sys.executable, "-m", "medscreen", "score", "ct", "--lake", str(tmp_path), "--as-of", AS_OF,
           "--run-id", "nightly-retry-test"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(store.rglob("*.json")):
        assert proc.poll() is None, f"the run ended before storing a series: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no series result stored within 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    stored_before = len(list(store.rglob("*.json")))
    assert 1 <= stored_before < 3, "killed after every series was stored: nothing left to resume"
    assert not LakePaths(tmp_path).findings("ct_nodule", AS_OF).exists()

    settings = load_settings({"lake.root": str(tmp_path)})
    retry = run_summary(ct.score(settings, AS_OF, run_id="nightly-retry-test"))
    assert retry["series_reused"] == stored_before
    assert retry["series_reused"] + retry["series_scored_this_run"] == 3
    resumed = rows(tmp_path)
    ct.score(settings, AS_OF, full=True)
    assert rows(tmp_path) == resumed and resumed


def test_a_rewritten_file_changes_the_series_content_key_through_keyed_paths(tmp_path, monkeypatch):
    """The index stores keyed, archive-relative paths: the content key must stat the files they name,
    so a file rewritten in place (same name) makes the nightly run score its series again."""
    from conf.settings import PseudonymSettings
    from inference.ct import COL_FILES, COL_PATIENT, COL_SERIES, COL_STUDY, series_content_key
    from lake.archive import Archive
    from lake.keys import executor_key_file, key_relative_path

    key = "ct-content-key-test-key-0123456789abcdef"
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", key)
    archive_root = tmp_path / "archive"
    (archive_root / "DOE_JANE" / "study").mkdir(parents=True)
    files = [archive_root / "DOE_JANE" / "study" / f"IM{i}" for i in range(3)]
    for f in files:
        f.write_bytes(b"x" * 100)
    keyed = [key_relative_path(key.encode(), f.relative_to(archive_root).as_posix()) for f in files]
    archive = Archive(str(archive_root), executor_key_file(PseudonymSettings()))
    row = {COL_SERIES: "s", COL_STUDY: "t", COL_PATIENT: None, COL_FILES: keyed}
    before = series_content_key(row, archive)
    assert series_content_key(row, archive) == before
    os.utime(files[1], ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert series_content_key(row, archive) != before
    files[2].write_bytes(b"y" * 101)
    files[0].unlink()
    changed = series_content_key(row, archive)
    assert changed != before and "DOE_JANE" not in "".join(keyed)
