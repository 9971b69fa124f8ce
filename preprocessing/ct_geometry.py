"""Slice geometry of a CT series from its header values alone (no pixels).

Shared by the DICOM index (which judges a series from headers) and the volume
loader (which builds the grid), so both agree on order, spacing, tilt and gaps.
Slices are ordered by the projection of ImagePositionPatient onto the slice
normal — never by InstanceNumber or file name, which scanners and PACS
exports do not keep consistent — and the gantry tilt is measured from the
positions and orientation, never read from GantryDetectorTilt: vendors do not
agree on its sign, and tools that reslice a series often leave it unchanged.
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
# Longest gap (mm along the normal, from the slice before to the slice after the missing ones)
# that is bridged by interpolation; a longer one makes the series incomplete. 5 mm is one missing
# slice of a 2.5 mm series: the coarse ends of a variable-spacing protocol are interpolated over as
# much, while a nodule of screening size (6 mm) could sit wholly inside a longer hole.
MAX_GAP_MM = 5.0


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
    def gap_steps_mm(self) -> np.ndarray:
        """Isolated oversized steps (mm): where slices are missing from an otherwise regular run."""
        s = self.steps_mm
        if s.size < 3:
            return np.zeros(0)
        found = []
        for k in range(s.size):
            left = s[k - 1] if k > 0 else None
            right = s[k + 1] if k + 1 < s.size else None
            neighbours = [v for v in (left, right) if v is not None]
            # A spacing change (protocol with a fine middle section) repeats the new step;
            # a dropped slice is one step about twice its neighbours.
            if all(s[k] > GAP_FACTOR * v for v in neighbours):
                found.append(float(s[k]))
        return np.asarray(found)

    @property
    def gaps(self) -> int:
        """Number of gaps (see :attr:`gap_steps_mm`)."""
        return int(self.gap_steps_mm.size)

    def gap_problem(self, max_gap_mm: float = MAX_GAP_MM) -> str | None:
        """Why the gaps make the series incomplete (one longer than ``max_gap_mm``), or None."""
        gaps = self.gap_steps_mm
        if gaps.size == 0 or float(gaps.max()) <= max_gap_mm + 1e-3:
            return None
        return (f"{gaps.size} gap(s) in slice positions, the longest {float(gaps.max()):.3g} mm "
                f"(tolerance {max_gap_mm:g} mm) where the neighbouring steps are "
                f"{self.spacing_min_mm:.3g}–{float(np.median(self.steps_mm)):.3g} mm; the export is incomplete")


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
