"""Crop a CT volume to the patient's body before the sliding window: air outside the body holds no nodule.

On an axial chest CT a third or more of the in-plane field of view is air
around the body; every patch there costs the engine as much as one through
the lungs. The body is found the conservative way: voxels above
``threshold_hu`` (fat, muscle, bone, the table; lung parenchyma at −850 HU is
enclosed by the body wall) projected onto each axis, and the box spanning
them grown by ``margin_mm`` and to at least ``min_shape_vox``. Anything
bright outside the body (the table, a stray artefact) only makes the box
larger: the crop can cost speed, never a finding inside the body.

The cropped volume keeps its geometry exactly: its origin is the LPS position
of the box's first voxel, so every index of the crop maps to the same patient
point it had in the full volume (findings' LPS centres are unchanged).
Runs on numpy arrays, or on CuPy arrays on the GPU (only the three 1-D
projections come back to the host).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from preprocessing.array_module import array_module, to_host
from preprocessing.volume import Volume

Box = tuple[slice, slice, slice]


def body_box(hu, spacing_mm: Sequence[float], threshold_hu: float, margin_mm: float,
             min_shape_vox: Sequence[int] = (1, 1, 1)) -> Box:
    """The (z, y, x) slices of ``hu`` spanning every voxel above ``threshold_hu``, plus ``margin_mm``.

    Grown to at least ``min_shape_vox`` per axis where the volume allows (a box
    smaller than a patch would only be padded back). A volume with no voxel
    above the threshold is kept whole.
    """
    xp = array_module(hu)
    fg = hu > threshold_hu
    box = []
    for axis, (n, s, least) in enumerate(zip(hu.shape, spacing_mm, min_shape_vox)):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(to_host(xp.any(fg, axis=others)))
        if not len(hit):
            return (slice(0, hu.shape[0]), slice(0, hu.shape[1]), slice(0, hu.shape[2]))
        margin = int(np.ceil(float(margin_mm) / float(s)))
        lo, hi = max(0, int(hit[0]) - margin), min(n, int(hit[-1]) + 1 + margin)
        want = min(int(least), n)
        if hi - lo < want:  # grow about the middle, shifted inside the volume where an edge is hit
            lo = min(max(0, (lo + hi - want) // 2), n - want)
            hi = lo + want
        box.append(slice(lo, hi))
    return tuple(box)  # type: ignore[return-value]


def crop(volume: Volume, box: Box) -> Volume:
    """``volume`` cut to ``box`` with its origin moved to the box's first voxel (LPS positions kept)."""
    first = [sl.start for sl in box]
    origin = volume.index_to_lps(first)
    return volume.with_hu(volume.hu[box], origin_lps_mm=tuple(float(v) for v in origin))


class CropToBody:
    """Volume in HU → the same volume cropped to the body (:func:`body_box`); geometry kept exact."""

    stage = "crop_s"

    def __init__(self, threshold_hu: float = -500.0, margin_mm: float = 16.0,
                 min_shape_vox: Sequence[int] = (1, 1, 1)):
        self.threshold_hu = float(threshold_hu)
        self.margin_mm = float(margin_mm)
        self.min_shape_vox = tuple(int(v) for v in min_shape_vox)

    def __call__(self, volume: Volume) -> Volume:
        box = body_box(volume.hu, volume.spacing_mm, self.threshold_hu, self.margin_mm, self.min_shape_vox)
        if all(sl.start == 0 and sl.stop == n for sl, n in zip(box, volume.shape)):
            return volume
        return crop(volume, box)
