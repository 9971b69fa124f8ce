"""A CT volume on a regular grid with its patient-space geometry."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Volume:
    """HU voxels on a regular grid, plus where that grid sits in the patient.

    - ``hu``: array (z, y, x) = (slice, row, column), float32 or int16.
    - ``spacing_mm``: (z, y, x) voxel spacing in mm.
    - ``origin_lps_mm``: patient LPS position (x, y, z) of voxel (0, 0, 0)'s centre.
    - ``direction``: 3×3 matrix whose columns are the LPS unit vectors of the
      x (column), y (row) and z (slice) index axes — the ITK/SimpleITK convention.

    LPS point of array index (k, j, i) = origin + direction @ (i·sx, j·sy, k·sz).
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    # Provenance of geometric corrections applied while building the grid (why, not what).
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must be 3-D (z, y, x); got shape {self.hu.shape}")
        object.__setattr__(self, "spacing_mm", tuple(float(v) for v in self.spacing_mm))
        object.__setattr__(self, "origin_lps_mm", tuple(float(v) for v in self.origin_lps_mm))
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", d)
        if min(self.spacing_mm) <= 0:
            raise ValueError(f"Volume.spacing_mm must be positive; got {self.spacing_mm}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.hu.shape)  # type: ignore[return-value]

    @property
    def affine_zyx_to_lps(self) -> np.ndarray:
        """4×4 affine taking homogeneous array indices (z, y, x, 1) to LPS mm (x, y, z, 1)."""
        sz, sy, sx = self.spacing_mm
        a = np.eye(4)
        # Columns of the 3×3 block correspond to index axes z, y, x.
        a[:3, 0] = self.direction[:, 2] * sz
        a[:3, 1] = self.direction[:, 1] * sy
        a[:3, 2] = self.direction[:, 0] * sx
        a[:3, 3] = self.origin_lps_mm
        return a

    def index_to_lps(self, index_zyx: Any) -> np.ndarray:
        """LPS mm (…, 3: x, y, z) of array indices (…, 3: z, y, x); fractional indices allowed."""
        idx = np.asarray(index_zyx, dtype=np.float64)
        a = self.affine_zyx_to_lps
        return idx @ a[:3, :3].T + a[:3, 3]

    def lps_to_index(self, lps_mm: Any) -> np.ndarray:
        """Array indices (…, 3: z, y, x), fractional, of LPS points (…, 3: x, y, z)."""
        p = np.asarray(lps_mm, dtype=np.float64)
        a = self.affine_zyx_to_lps
        return (p - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T

    def with_hu(self, hu: np.ndarray, **changes: Any) -> "Volume":
        """A copy with new voxels (and optionally new geometry fields)."""
        return replace(self, hu=hu, **changes)
