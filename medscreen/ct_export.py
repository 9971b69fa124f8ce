"""Export one indexed CT series as NIfTI: the raw scanner grid or the resampled model input."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conf.settings import Settings
from lake.archive import imaging_archive
from preprocessing.ct_chain import Compose, LoadSeries, ResampleToSpacing
from preprocessing.imaging_index import series_record
from preprocessing.nifti import ras_affine, write_nifti

STAGES = ("raw", "resampled")


def export_series(settings: Settings, series_key: str, out: Path, stage: str = "raw") -> dict[str, Any]:
    """Write series ``series_key`` of the lake's DICOM index to ``out`` (.nii/.nii.gz).

    ``raw``: HU (int16) on the scanner grid (after the same tilt / spacing
    corrections the scorer applies: a tilted stack on an orthogonal grid
    widened to hold every acquired pixel, uneven spacing and short gaps
    interpolated at the smallest step). ``resampled``: the float32 HU volume at
    ``imaging.target_spacing_mm`` the model is given (before windowing). Either
    file's affine places each voxel at its patient position, the geometry CT
    findings' ``centre_*_mm`` are computed with.
    """
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} is not one of {STAGES}")
    rec = series_record(settings.lake.root, series_key)
    if not rec["eligible"]:
        raise ValueError(f"series {series_key} was rejected by the index ({rec['verdict']}: "
                         f"{rec['detail']}); only eligible series can be exported")
    archive = imaging_archive(settings)  # keyed relative paths → files under the archive root
    files = archive.resolve_all(rec["paths"]) if archive else [Path(p) for p in rec["paths"]]
    steps = [LoadSeries(settings.imaging.gantry_tilt, settings.imaging.min_slices)]
    if stage == "resampled":
        steps.append(ResampleToSpacing(settings.imaging.target_spacing_mm))
    volume = Compose(*steps)(files)
    if stage == "resampled":
        path = write_nifti(volume, out, dtype=np.float32)
    else:
        path = write_nifti(volume, out, dtype=np.int16)
    return {"series_key": series_key, "stage": stage, "out": str(path), "shape_xyz": list(volume.shape[::-1]),
            "spacing_xyz_mm": list(volume.spacing_mm[::-1]), "affine_ras": ras_affine(volume).tolist(),
            "notes": list(volume.notes)}
