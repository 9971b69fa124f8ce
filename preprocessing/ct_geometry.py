"""Slice geometry of a CT series from its header values alone (no pixels).

Shared by the DICOM index (which judges a series from headers) and the volume
loader (which builds the grid), so both agree on order, spacing, tilt and gaps.
Slices are ordered by the projection of ImagePositionPatient onto the slice
normal — never by InstanceNumber or file name, which scanners and PACS
exports do not keep consistent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Relative spread of slice steps below which a series counts as regularly spaced.
SPACING_REL_TOL = 0.01
# Degrees of shear between successive slice positions and the normal that count as gantry tilt.
TILT_TOL_DEG = 0.2
# A step this much larger than both neighbours is a gap (missing slices), not a spacing change.
GAP_FACTOR = 1.5


@dataclass(frozen=True)
class SliceGeometry:
    """Slice order and spacing of one series, in patient millimetres."""

    order: np.ndarray             # indices that sort the input slices along the normal
    positions_mm: np.ndarray      # sorted projections onto the normal (mm)
    steps_mm: np.ndarray          # successive differences of positions_mm
    row_cosine: np.ndarray        # direction of increasing column index (x of the image)
    col_cosine: np.ndarray        # direction of increasing row index (y of the image)
    normal: np.ndarray            # row × col: direction of increasing slice index
    tilt_deg: float               # shear of the slice stack against the normal
    duplicate_positions: int      # slices sharing a position with another slice

    @property
    def n_slices(self) -> int:
        return int(self.positions_mm.size)

    @property
    def spacing_min_mm(self) -> float:
        return float(self.steps_mm.min()) if self.steps_mm.size else float("nan")

    @property
    def spacing_median_mm(self) -> float:
        return float(np.median(self.steps_mm)) if self.steps_mm.size else float("nan")

    @property
    def spacing_max_mm(self) -> float:
        return float(self.steps_mm.max()) if self.steps_mm.size else float("nan")

    @property
    def regular(self) -> bool:
        """True when every step is within SPACING_REL_TOL of the median."""
        if self.steps_mm.size == 0:
            return True
        med = self.spacing_median_mm
        return bool(np.all(np.abs(self.steps_mm - med) <= SPACING_REL_TOL * med))

    @property
    def gaps(self) -> int:
        """Isolated oversized steps: slices missing from an otherwise regular run."""
        s = self.steps_mm
        if s.size < 3:
            return 0
        n = 0
        for k in range(s.size):
            left = s[k - 1] if k > 0 else None
            right = s[k + 1] if k + 1 < s.size else None
            neighbours = [v for v in (left, right) if v is not None]
            # A spacing change (protocol with a fine middle section) repeats the new step;
            # a dropped slice is one step about twice its neighbours.
            if all(s[k] > GAP_FACTOR * v for v in neighbours):
                n += 1
        return n


def orientation_cosines(iop: np.ndarray | list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row cosine, column cosine and slice normal from ImageOrientationPatient (6 values)."""
    v = np.asarray(iop, dtype=np.float64).reshape(6)
    row, col = v[:3], v[3:]
    nr, nc = np.linalg.norm(row), np.linalg.norm(col)
    if not (abs(nr - 1) < 1e-3 and abs(nc - 1) < 1e-3 and abs(float(row @ col)) < 1e-3):
        raise ValueError(f"ImageOrientationPatient {list(v)} is not two orthogonal unit vectors")
    row, col = row / nr, col / nc
    normal = np.cross(row, col)
    return row, col, normal / np.linalg.norm(normal)


def analyse_positions(positions_lps_mm: np.ndarray, iop: np.ndarray | list[float]) -> SliceGeometry:
    """Order, steps and tilt of slices at ``positions_lps_mm`` (n, 3) sharing orientation ``iop``."""
    pos = np.asarray(positions_lps_mm, dtype=np.float64).reshape(-1, 3)
    row, col, normal = orientation_cosines(iop)
    proj = pos @ normal
    # Stable sort so duplicates keep a deterministic order.
    order = np.argsort(proj, kind="stable")
    sorted_proj = proj[order]
    steps = np.diff(sorted_proj)
    duplicates = int(np.sum(steps < 1e-3)) if steps.size else 0
    tilt = 0.0
    if pos.shape[0] >= 2:
        first, last = pos[order[0]], pos[order[-1]]
        delta = last - first
        along = float(delta @ normal)
        across = float(np.linalg.norm(delta - along * normal))
        if abs(along) > 1e-6:
            tilt = math.degrees(math.atan2(across, abs(along)))
    return SliceGeometry(order=order, positions_mm=sorted_proj, steps_mm=steps, row_cosine=row,
                         col_cosine=col, normal=normal, tilt_deg=tilt, duplicate_positions=duplicates)
