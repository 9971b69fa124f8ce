"""Volume → NIfTI-1 with a correct affine.

DICOM patient space is LPS; NIfTI world space is RAS, so the affine is the
LPS affine with x and y negated. Data are stored (x, y, z) = (column, row,
slice), the order NIfTI readers (and dcm2niix) expect, so voxel (i, j, k) of
the file is array element [k, j, i] of :class:`~preprocessing.volume.Volume`.
"""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from preprocessing.volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(volume: Volume) -> np.ndarray:
    """4×4 affine from NIfTI voxel indices (i=column, j=row, k=slice) to RAS mm."""
    sz, sy, sx = volume.spacing_mm
    a = np.eye(4)
    a[:3, :3] = volume.direction @ np.diag([sx, sy, sz])
    a[:3, 3] = volume.origin_lps_mm
    return LPS_TO_RAS @ a


def to_nifti(volume: Volume, dtype: np.dtype | type | None = None) -> nib.Nifti1Image:
    """A NIfTI-1 image of ``volume`` (sform and qform both set to the scanner affine)."""
    data = np.transpose(volume.hu, (2, 1, 0))
    if dtype is not None:
        data = np.rint(data).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else data.astype(dtype)
    affine = ras_affine(volume)
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.set_sform(affine, code=1)  # 1 = scanner anatomical coordinates
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img


def write_nifti(volume: Volume, path: Path, dtype: np.dtype | type | None = None) -> Path:
    """Write ``volume`` to ``path`` (.nii or .nii.gz) and return the path."""
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"NIfTI output {path} must end in .nii or .nii.gz")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(to_nifti(volume, dtype), str(path))
    return path
