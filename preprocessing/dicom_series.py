"""DICOM CT series → :class:`~preprocessing.volume.Volume` in HU on a regular grid.

Geometry comes from the headers that define it, not from conveniences:
slices are ordered by the projection of ImagePositionPatient onto the slice
normal (never InstanceNumber or file name); slice spacing comes from those
positions (never SliceThickness, which is the reconstruction thickness);
HU = stored × RescaleSlope + RescaleIntercept per slice; direction cosines are
kept. Gantry tilt is measured from the positions against the normal (the
GantryDetectorTilt header is never used: its sign differs between vendors);
a tilted stack is sheared back onto an orthogonal grid (or rejected, when
configured). Variable slice spacing, and gaps of missing slices up to
:data:`~preprocessing.ct_geometry.MAX_GAP_MM`, are resampled onto a regular
grid at the smallest step, as dcm2niix's equalised output is; a longer gap
makes the series ``missing_slices``.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from preprocessing.ct_geometry import MAX_GAP_MM, TILT_TOL_DEG, SliceGeometry, analyse_positions
from preprocessing.volume import Volume

__all__ = ["Volume", "SeriesError", "load_volume", "volume_from_datasets", "REASONS"]

# Machine-readable reasons a series cannot become a volume (shared with the DICOM index).
REASON_NOT_CT = "not_ct"
REASON_LOCALIZER = "localizer"
REASON_TOO_FEW_SLICES = "too_few_slices"
REASON_INCONSISTENT_ORIENTATION = "inconsistent_orientation"
REASON_INCONSISTENT_SIZE = "inconsistent_size"
REASON_MISSING_SLICES = "missing_slices"
REASON_GANTRY_TILT = "gantry_tilt"
REASON_UNDECODABLE = "undecodable_pixels"
REASON_MISSING_GEOMETRY = "missing_geometry"
REASON_DUPLICATE_POSITIONS = "duplicate_positions"
# Enhanced CT (one multi-frame object, geometry per frame in functional groups): not read as slices.
REASON_MULTIFRAME = "multiframe"
REASONS = (REASON_NOT_CT, REASON_LOCALIZER, REASON_TOO_FEW_SLICES, REASON_INCONSISTENT_ORIENTATION,
           REASON_INCONSISTENT_SIZE, REASON_MISSING_SLICES, REASON_GANTRY_TILT, REASON_UNDECODABLE,
           REASON_MISSING_GEOMETRY, REASON_DUPLICATE_POSITIONS, REASON_MULTIFRAME)

ORIENTATION_TOL = 1e-4
HU_AIR_FILL = -1024.0


class SeriesError(ValueError):
    """A series cannot be turned into a volume; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def load_volume(paths: Sequence[Path | str], gantry_tilt: str = "correct", min_slices: int = 2) -> Volume:
    """Read one series' files and return its HU volume (float32, z/y/x) on a regular grid.

    ``gantry_tilt`` is ``"correct"`` (shear the stack onto an orthogonal grid) or
    ``"reject"`` (raise SeriesError with reason ``gantry_tilt``). Raises
    SeriesError with a reason code for any series that cannot be a volume, and
    names the offending file when one cannot be read or decoded.
    """
    if not paths:
        raise SeriesError(REASON_TOO_FEW_SLICES, "no files given for the series")
    datasets = []
    for p in paths:
        try:
            datasets.append(pydicom.dcmread(str(p)))
        except Exception as exc:  # pydicom raises many types for broken files
            raise SeriesError(REASON_UNDECODABLE, f"cannot read DICOM file {p}: {exc}; "
                              "re-export the series or exclude the file") from None
    return volume_from_datasets(datasets, gantry_tilt=gantry_tilt, min_slices=min_slices,
                                names=[str(p) for p in paths])


def _geometry(ds: Dataset, name: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float], tuple[int, int]]:
    try:
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ps = tuple(float(v) for v in ds.PixelSpacing)
        size = (int(ds.Rows), int(ds.Columns))
    except (AttributeError, TypeError, ValueError) as exc:
        raise SeriesError(REASON_MISSING_GEOMETRY,
                          f"{name} lacks ImagePositionPatient/ImageOrientationPatient/PixelSpacing/"
                          f"Rows/Columns ({exc})") from None
    if ipp.size != 3 or iop.size != 6 or len(ps) != 2:
        raise SeriesError(REASON_MISSING_GEOMETRY, f"{name} has malformed geometry attributes")
    return ipp, iop, ps, size  # type: ignore[return-value]


def volume_from_datasets(datasets: Sequence[Dataset], gantry_tilt: str = "correct",
                         min_slices: int = 2, names: Sequence[str] | None = None) -> Volume:
    """As :func:`load_volume`, from already-read pydicom datasets of one series."""
    if gantry_tilt not in ("correct", "reject"):
        raise ValueError(f"gantry_tilt must be 'correct' or 'reject', got {gantry_tilt!r}")
    names = list(names) if names is not None else [f"slice {i}" for i in range(len(datasets))]
    if len(datasets) < max(min_slices, 2):
        raise SeriesError(REASON_TOO_FEW_SLICES,
                          f"{len(datasets)} slices; at least {max(min_slices, 2)} are needed for a volume")
    geo = [_geometry(ds, n) for ds, n in zip(datasets, names)]
    iop0, ps0, size0 = geo[0][1], geo[0][2], geo[0][3]
    for (ipp, iop, ps, size), n in zip(geo, names):
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOL:
            raise SeriesError(REASON_INCONSISTENT_ORIENTATION,
                              f"{n} has ImageOrientationPatient {list(iop)}, the series' first slice {list(iop0)}")
        if size != size0 or max(abs(a - b) for a, b in zip(ps, ps0)) > 1e-4:
            raise SeriesError(REASON_INCONSISTENT_SIZE,
                              f"{n} is {size} at {ps} mm; the series' first slice is {size0} at {ps0} mm")
    sg = analyse_positions(np.stack([g[0] for g in geo]), iop0)
    if sg.duplicate_positions:
        raise SeriesError(REASON_DUPLICATE_POSITIONS,
                          f"{sg.duplicate_positions} slices share a position; the folder probably mixes "
                          "two reconstructions of one series")
    gap = sg.gap_problem(MAX_GAP_MM)
    if gap is not None:
        raise SeriesError(REASON_MISSING_SLICES, gap)
    tilted = sg.tilt_deg > TILT_TOL_DEG
    if tilted and gantry_tilt == "reject":
        raise SeriesError(REASON_GANTRY_TILT, f"slice stack is sheared by {sg.tilt_deg:.2f}° (gantry tilt); "
                          "set imaging.gantry_tilt=correct to resample it")
    slices = []
    for k in sg.order:
        ds = datasets[k]
        try:
            stored = ds.pixel_array
        except Exception as exc:
            raise SeriesError(REASON_UNDECODABLE, f"cannot decode pixels of {names[k]} "
                              f"(transfer syntax {getattr(ds.file_meta, 'TransferSyntaxUID', '?')}): {exc}") from None
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        slices.append(stored.astype(np.float32) * np.float32(slope) + np.float32(intercept))
    hu = np.stack(slices)
    ps_row_mm, ps_col_mm = ps0  # PixelSpacing = [between rows (y), between columns (x)]
    first = geo[sg.order[0]][0]
    origin = first
    direction = np.stack([sg.row_cosine, sg.col_cosine, sg.normal], axis=1)
    notes: list[str] = []
    if tilted:
        hu, origin = _shear_onto_normal(hu, np.stack([geo[k][0] for k in sg.order]), first, sg,
                                        ps_row_mm, ps_col_mm)
        notes.append(f"gantry_tilt_corrected:{sg.tilt_deg:.2f}deg")
    positions = sg.positions_mm - sg.positions_mm[0]
    if sg.regular:
        spacing_z = sg.spacing_median_mm
    else:
        spacing_z = sg.spacing_min_mm
        hu = resample_slices_regular(hu, positions, spacing_z)
        notes.append(f"variable_spacing_resampled:{sg.spacing_min_mm:.3g}-{sg.spacing_max_mm:.3g}mm")
        if sg.gaps:
            notes.append(f"missing_slices_interpolated:{sg.gaps}gap(s)<={float(sg.gap_steps_mm.max()):.3g}mm")
    return Volume(hu=hu, spacing_mm=(spacing_z, ps_row_mm, ps_col_mm), origin_lps_mm=tuple(origin),
                  direction=direction, notes=tuple(notes))


def _shear_onto_normal(hu: np.ndarray, positions: np.ndarray, first: np.ndarray, sg: SliceGeometry,
                       ps_row_mm: float, ps_col_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Shift each slice in-plane so every slice's origin lies on the normal through one grid origin.

    Tilted acquisitions step the table along z while the image plane is
    tilted, so successive slice origins drift across the image; undoing that
    drift yields an orthogonal (row, column, normal) grid. The grid is widened
    by the drift, as dcm2niix's ``_Tilt_`` output is, so no acquired pixel
    falls off it (over a 300 mm chest at 16.5° the drift is ~90 mm: cropping
    would cut anatomy from the end slices). Returns the voxels and the LPS
    position of the grid's voxel (0, 0, 0).
    """
    # Imported here: the DICOM index imports this module in every Spark worker and never shears.
    from scipy import ndimage

    d = positions - first
    along_col = d @ sg.col_cosine / ps_row_mm    # drift down the rows (y of the image), in rows
    along_row = d @ sg.row_cosine / ps_col_mm    # drift along the columns (x of the image), in columns
    # Rows/columns added before (where the drift is negative) and after (where it is positive).
    before = (int(np.ceil(max(0.0, -along_col.min()) - 1e-6)), int(np.ceil(max(0.0, -along_row.min()) - 1e-6)))
    after = (int(np.ceil(max(0.0, along_col.max()) - 1e-6)), int(np.ceil(max(0.0, along_row.max()) - 1e-6)))
    rows, cols = hu.shape[1] + before[0] + after[0], hu.shape[2] + before[1] + after[1]
    out = np.empty((hu.shape[0], rows, cols), dtype=np.float32)
    canvas = np.full((rows, cols), HU_AIR_FILL, dtype=np.float32)
    for k in range(hu.shape[0]):
        canvas[before[0]:before[0] + hu.shape[1], before[1]:before[1] + hu.shape[2]] = hu[k]
        # ndimage.shift: out[j] = in[j - shift]; grid row j sits at canvas row j - drift.
        ndimage.shift(canvas, (along_col[k], along_row[k]), output=out[k], order=1, mode="constant",
                      cval=HU_AIR_FILL)
    origin = first - before[0] * ps_row_mm * sg.col_cosine - before[1] * ps_col_mm * sg.row_cosine
    return out, origin


def resample_slices_regular(hu: np.ndarray, positions_mm: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Linear interpolation of slices at ``positions_mm`` (ascending, first 0) onto a regular step."""
    n_out = int(np.floor(positions_mm[-1] / spacing_mm + 1e-6)) + 1
    targets = np.arange(n_out) * spacing_mm
    upper = np.clip(np.searchsorted(positions_mm, targets, side="right"), 1, positions_mm.size - 1)
    lower = upper - 1
    span = positions_mm[upper] - positions_mm[lower]
    w = np.clip((targets - positions_mm[lower]) / span, 0.0, 1.0).astype(np.float32)
    out = np.empty((n_out,) + hu.shape[1:], dtype=np.float32)
    for m in range(n_out):
        out[m] = hu[lower[m]] * (1 - w[m]) + hu[upper[m]] * w[m]
    return out
