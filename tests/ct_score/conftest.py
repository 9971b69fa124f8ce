"""CT scoring fixtures: tiny synthetic DICOM series and a committed series index.

Each series images a 128 mm window (128×128 pixels, 32 slices at 2 mm) of a
full-size chest (340 mm field of view) centred on the right lung, so the
anatomy has its real scale while one resampled volume is a single patch; a
planted 10 mm solid nodule sits in that lung.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake.commit import atomic_partition
from lake.keys import mrn_key, pseudonymise
from lake.paths import LakePaths
from lake.schemas import DICOM_SERIES, IMAGING_LINK
from synth.ct_phantom import ChestAnatomy, ChestPhantom, Nodule
from synth.ct import SeriesSpec, write_series

ROWS, PIXEL_MM, SLICES, SLICE_MM = 128, 1.0, 32, 2.0
CHEST_FOV_MM = 340.0
NODULE_MM = 10.0


class _Window:
    """A phantom seen through a window: ``synth_ct.write_series`` centres its slices on
    ``anatomy.centre_lps_mm`` and samples HU with ``sample``; pointing the first at the
    lung and delegating the second to the whole chest images part of a real-size chest."""

    def __init__(self, phantom: ChestPhantom, centre_lps_mm: tuple[float, float, float]):
        self.phantom = phantom
        self.anatomy = ChestAnatomy(centre_lps_mm=centre_lps_mm, fov_mm=phantom.anatomy.fov_mm)

    def sample(self, *args: Any, **kwargs: Any):
        return self.phantom.sample(*args, **kwargs)


def _study(i: int, date: str) -> dict[str, Any]:
    return {"patient_name": f"SYNTH^CTSCORE{i}", "patient_id": f"SYNCT{i:05d}", "birth_date": "19600101",
            "sex": "F", "study_uid": f"1.2.826.0.1.3680043.8.498.77.{i}.1",
            "frame_uid": f"1.2.826.0.1.3680043.8.498.77.{i}.2", "study_date": date, "accession": f"ACC{i}"}


def write_tiny_series(folder: Path, index: int, date: str, nodule: bool = True,
                      patient_id: str | None = None) -> dict[str, Any]:
    """One axial series with (optionally) one solid nodule; returns its ground truth.

    ``patient_id``: the DICOM PatientID (default a synthetic one; an EMR fixture's MRN links it)."""
    study = _study(index, date)
    if patient_id is not None:
        study["patient_id"] = patient_id
    folder.mkdir(parents=True, exist_ok=True)
    extent = SLICE_MM * (SLICES - 1)
    anatomy = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0),
                           fov_mm=(CHEST_FOV_MM, CHEST_FOV_MM, extent + SLICE_MM))
    lx, ly = anatomy.lung_centres_mm()[0]
    nodules = [Nodule((lx + 9.0, ly - 14.0, 5.0), NODULE_MM)] if nodule else []
    spec = SeriesSpec("axial_chest", rows=ROWS, cols=ROWS, pixel_spacing_mm=PIXEL_MM,
                      z_positions_mm=[-extent / 2 + k * SLICE_MM for k in range(SLICES)])
    window = _Window(ChestPhantom(anatomy, nodules), (lx, ly, 0.0))
    rec = write_series(folder, window, spec, study, 1,  # type: ignore[arg-type]
                       np.random.default_rng(index), f"ct-score-test/{index}")
    rec["files"] = [str(folder / f) for f in rec["files"]]
    rec["nodules"] = [n.to_dict() for n in nodules]
    rec["study_uid"] = study["study_uid"]
    rec["patient_id"] = study["patient_id"]
    return rec


def write_series_index(lake_root: Path, key: bytes, rows: list[dict[str, Any]]) -> Path:
    """Commit LAKE/imaging/series the way the DICOM index does (pseudonymised keys, verdict, files)."""
    table = pa.table({
        "series_key": [pseudonymise(key, r["series_uid"]) for r in rows],
        "study_key": [pseudonymise(key, r["study_uid"]) for r in rows],
        "mrn_key": [mrn_key(key, r["patient_id"]) for r in rows],
        "study_date": pa.array([dt.date.fromisoformat(r["date"]) for r in rows], pa.date32()),
        "verdict": [r["verdict"] for r in rows],
        "paths": pa.array([r["files"] for r in rows], pa.list_(pa.string())),
    })
    # Same names and types as the DICOM index's table, so the two cannot drift apart unnoticed.
    for f in table.schema:
        assert DICOM_SERIES.field(f.name).type == f.type, f"{f.name}: {f.type} vs {DICOM_SERIES.field(f.name).type}"
    final = LakePaths(lake_root).dicom_series
    with atomic_partition(final, {"stage": "test_index"}) as staging:
        pq.write_table(table, staging / "part-00000.parquet")
    write_unlinked(lake_root, table)
    return final


def write_unlinked(lake_root: Path, series: pa.Table) -> None:
    """Commit LAKE/imaging/patient_link as jobs/imaging_link leaves it for a lake without EMR
    patients (no committed patients table): every series ``mrn_not_in_emr``."""
    n = series.num_rows
    link = pa.table({"series_key": series.column("series_key"), "study_key": series.column("study_key"),
                     "mrn_key": series.column("mrn_key"), "patient_key": pa.nulls(n, pa.string()),
                     "link_status": pa.array(["mrn_not_in_emr"] * n, pa.string())}, schema=IMAGING_LINK)
    inputs = {"series": {"run_id": None}, "patients": {"run_id": None}}
    with atomic_partition(LakePaths(lake_root).imaging_link, {"stage": "test_link", "inputs": inputs}) as staging:
        pq.write_table(link, staging / "part-00000.parquet")


@pytest.fixture(scope="session")
def tiny_series_writer():
    return write_tiny_series


@pytest.fixture(scope="session")
def series_index_writer():
    return write_series_index


@pytest.fixture(scope="session")
def tiny_ct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two scoreable series (one with a nodule), one broken, one ineligible, one after the as-of date."""
    root = tmp_path_factory.mktemp("ct_dicom")
    with_nodule = write_tiny_series(root / "s1", 1, "20240105")
    no_nodule = write_tiny_series(root / "s2", 2, "20240210", nodule=False)
    # A series whose every file is cut inside its header: undecodable.
    broken_dir = root / "s3"
    broken_dir.mkdir()
    broken_files = []
    for k, src in enumerate(no_nodule["files"][:4]):
        p = broken_dir / f"cut{k}"
        p.write_bytes(Path(src).read_bytes()[:300])
        broken_files.append(str(p))
    return {"root": root, "with_nodule": with_nodule, "no_nodule": no_nodule, "rows": [
        {"series_uid": with_nodule["series_instance_uid"], "study_uid": with_nodule["study_uid"],
         "patient_id": with_nodule["patient_id"], "date": "2024-01-05", "verdict": "eligible",
         "files": with_nodule["files"]},
        {"series_uid": no_nodule["series_instance_uid"], "study_uid": no_nodule["study_uid"],
         "patient_id": no_nodule["patient_id"], "date": "2024-02-10", "verdict": "eligible",
         "files": no_nodule["files"]},
        {"series_uid": "1.2.826.0.1.3680043.8.498.77.3.9", "study_uid": "1.2.826.0.1.3680043.8.498.77.3.1",
         "patient_id": "SYNCT00003", "date": "2024-03-01", "verdict": "eligible", "files": broken_files},
        {"series_uid": "1.2.826.0.1.3680043.8.498.77.4.9", "study_uid": "1.2.826.0.1.3680043.8.498.77.4.1",
         "patient_id": "SYNCT00004", "date": "2024-03-01", "verdict": "localizer", "files": []},
        {"series_uid": "1.2.826.0.1.3680043.8.498.77.5.9", "study_uid": "1.2.826.0.1.3680043.8.498.77.5.1",
         "patient_id": "SYNCT00005", "date": "2024-09-01", "verdict": "eligible", "files": with_nodule["files"]},
    ]}
