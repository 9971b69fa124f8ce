"""The DICOM index on real local Spark: ledger, verdicts, pseudonymisation, idempotent reruns."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from lake.commit import is_committed
from conf.settings import PseudonymSettings
from lake.archive import Archive
from lake.keys import executor_key_file, pseudonymise
from lake.paths import LakePaths
from lake.schemas import DICOM_INSTANCES, DICOM_QUARANTINE, DICOM_SERIES

from ct_index_cases import SESSION_KEY, index_settings


def _table(path: Path):
    return pq.read_table(sorted(str(p) for p in Path(path).glob("*.parquet"))).to_pandas()


def _all_files(root: Path) -> list[Path]:
    return [Path(r) / f for r, _, fs in os.walk(root) for f in fs]


def test_index_ledger_balances_and_counts(indexed: dict[str, Any], synth_dir: Path,
                                          truth: dict[str, Any]) -> None:
    counts = indexed["summary"]["counts"]
    n_files = len(_all_files(synth_dir))
    n_slices = sum(s["slices"] for s in truth["series"])
    assert counts["files"] == n_files
    assert counts["instances"] == n_slices
    expected_q: dict[str, int] = {"not_dicom": 1}  # ground_truth.json
    for bad in truth["broken_files"]:
        expected_q[bad["expected"]] = expected_q.get(bad["expected"], 0) + 1
    assert counts["quarantined_files"] == expected_q
    ledger = json.loads(Path(indexed["summary"]["ledger"]).read_text())
    assert ledger["balanced"] is True
    files = ledger["stages"]["dicom_index.files"]
    assert files["records_in"] == files["records_out"] + files["quarantined_total"] == n_files
    series = ledger["stages"]["dicom_index.series"]
    assert series["records_in"] == len(truth["series"]) == series["records_out"] + series["quarantined_total"]
    lp = LakePaths(indexed["lake"])
    for table in (lp.dicom_series, lp.dicom_instances, lp.imaging_quarantine):
        assert is_committed(table)
    assert len(_table(lp.imaging_quarantine)) == sum(expected_q.values())


def test_series_table_verdicts_geometry_and_schema(indexed: dict[str, Any], synth_dir: Path,
                                                   truth: dict[str, Any]) -> None:
    lp = LakePaths(indexed["lake"])
    series = _table(lp.dicom_series).set_index("series_key")
    assert list(series.reset_index().columns) == DICOM_SERIES.names
    assert list(_table(lp.dicom_instances).columns) == DICOM_INSTANCES.names
    assert list(_table(lp.imaging_quarantine).columns) == DICOM_QUARANTINE.names
    key = SESSION_KEY.encode()
    archive = Archive(str(synth_dir.resolve()), executor_key_file(PseudonymSettings()))
    for s in truth["series"]:
        row = series.loc[pseudonymise(key, s["series_instance_uid"])]
        assert row["verdict"] == s["expected"], s["label"]
        assert row["slice_count"] == s["slices"]
        assert row["eligible"] == (s["expected"] == "eligible")
        if row["eligible"]:
            # Stored keyed and relative to the archive root; they resolve to the study's files.
            assert not any(f in p or s["study"] in p for p in row["paths"] for f in s["files"])
            resolved = archive.resolve_all(list(row["paths"]))
            assert sorted(p.name for p in resolved) == s["files"]
            assert {p.parent for p in resolved} == {(synth_dir / s["study"]).resolve()}
            assert row["pixel_spacing_row_mm"] == pytest.approx(s["pixel_spacing_mm"])
        if s["label"] == "axial_chest":
            assert row["spacing_min_mm"] == pytest.approx(row["spacing_max_mm"])
            assert row["regular_spacing"]
        if s["label"] == "thick_rle":
            assert row["transfer_syntax"] == "1.2.840.10008.1.2.5"
            assert row["spacing_median_mm"] == pytest.approx(5.0)


def test_no_raw_identifiers_in_the_lake(indexed: dict[str, Any], synth_dir: Path, truth: dict[str, Any]) -> None:
    import pydicom

    secrets = {s["series_instance_uid"] for s in truth["series"]}
    for s in truth["series"]:
        ds = pydicom.dcmread(synth_dir / s["study"] / s["files"][0], stop_before_pixels=True)
        secrets |= {str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.PatientID),
                    str(ds.PatientName), str(ds.AccessionNumber)}
    lp = LakePaths(indexed["lake"])
    cells = []
    for table in (lp.dicom_series, lp.dicom_instances, lp.imaging_quarantine):
        df = _table(table)
        cells += [str(v) for col in df.columns for v in df[col].tolist()]
    text = "\n".join(cells)
    text += "\n".join(p.read_text() for p in _all_files(indexed["lake"]) if p.suffix == ".json")
    leaked = [s for s in secrets if s in text]
    assert not leaked, f"raw identifiers in the lake: {leaked[:3]}"
    assert "SYNTH^" not in text


def test_rerun_replaces_tables_and_rejects_tilt_when_configured(indexed: dict[str, Any], spark,
                                                                synth_dir: Path, truth: dict[str, Any],
                                                                tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from jobs import dicom_index

    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", SESSION_KEY)
    # A copy of the shared lake, so the other tests keep the default verdicts.
    lake = tmp_path / "lake"
    shutil.copytree(indexed["lake"], lake)
    lp = LakePaths(lake)
    before = _table(lp.dicom_series).set_index("series_key")
    n_instances = len(_table(lp.dicom_instances))
    settings = index_settings(lake, **{"imaging.gantry_tilt": "reject"})
    summary = dicom_index.run(settings, synth_dir, spark=spark)
    after = _table(lp.dicom_series).set_index("series_key")
    # Replaced, not appended.
    assert len(_table(lp.dicom_instances)) == n_instances
    assert sorted(after.index) == sorted(before.index)
    key = SESSION_KEY.encode()
    for s in truth["series"]:
        k = pseudonymise(key, s["series_instance_uid"])
        want = "gantry_tilt" if s["label"] == "gantry_tilt" else s["expected"]
        assert after.loc[k, "verdict"] == want
        assert after.loc[k, "run_id"] == summary["run_id"] != before.loc[k, "run_id"]
    assert json.loads(Path(summary["ledger"]).read_text())["balanced"]
    assert not list((lake / "imaging").glob(".staging-*")), "staging directories left behind"
