"""Probability volume → findings: threshold, connected components, geometry in mm.

A finding is one 26-connected component of voxels whose probability is at or
above the threshold. Its centre is the component's voxel centroid mapped
through the volume's affine (voxel index (z, y, x) → patient LPS mm), its size
the voxel count times the voxel volume, its diameter that of the sphere of the
same volume. Components smaller than ``min_volume_mm3`` are dropped (counted in
:class:`ComponentSummary`, not silently).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Finding:
    """One connected component; ``finding_id`` counts from 1 in order of decreasing volume."""

    finding_id: int
    centre_lps_mm: tuple[float, float, float]   # x (L), y (P), z (S)
    diameter_mm: float                          # equivalent-sphere diameter
    volume_mm3: float
    max_prob: float
    mean_prob: float
    voxels: int


@dataclass
class ComponentSummary:
    """What :func:`find_components` kept and what it dropped by rule."""

    findings: list[Finding] = field(default_factory=list)
    components: int = 0
    dropped_small: int = 0


def sphere_diameter_mm(volume_mm3: float) -> float:
    """Diameter of the sphere of volume ``volume_mm3``: (6V/π)^(1/3)."""
    return (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0)


def find_components(prob: np.ndarray, spacing_zyx_mm: tuple[float, float, float],
                    index_zyx_to_lps: np.ndarray, threshold: float = 0.5,
                    min_volume_mm3: float = 0.0) -> ComponentSummary:
    """Findings in a probability volume ``prob`` (z, y, x).

    ``index_zyx_to_lps`` is the 4×4 affine taking homogeneous voxel indices
    (z, y, x, 1) to patient coordinates (x_L, y_P, z_S, 1) in mm; its spacing
    must agree with ``spacing_zyx_mm``.
    """
    if prob.ndim != 3:
        raise ValueError(f"probability volume must be 3-D (z, y, x); got shape {prob.shape}")
    affine = np.asarray(index_zyx_to_lps, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"index→LPS affine must be 4×4; got {affine.shape}")
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    mask = prob >= threshold
    # Work inside the bounding box of the above-threshold voxels: a CT volume is
    # tens of millions of voxels, its findings a few thousand, and every
    # whole-volume pass (label, per-label statistics) costs about a second.
    box = _bounding_box(mask)
    if box is None:
        return ComponentSummary()
    mask, prob = mask[box], prob[box]
    offset = np.array([s.start for s in box], dtype=np.float64)
    # 26-connectivity: a nodule touching itself only at a corner is still one nodule.
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    summary = ComponentSummary(components=int(n))
    kept = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        own = labels[sl] == k
        voxels = int(own.sum())
        vol = voxels * voxel_mm3
        if vol < min_volume_mm3:
            summary.dropped_small += 1
            continue
        p = prob[sl][own]
        centroid = np.argwhere(own).mean(axis=0) + offset + [s.start for s in sl]
        lps = affine @ np.append(centroid, 1.0)
        kept.append((vol, tuple(float(c) for c in lps[:3]), float(p.max()), float(p.mean(dtype=np.float64)),
                     voxels))
    # Largest first, ties broken by position, so ids are stable across reruns.
    kept.sort(key=lambda t: (-t[0], t[1]))
    summary.findings = [Finding(i + 1, c, sphere_diameter_mm(v), v, mx, mn, nv)
                        for i, (v, c, mx, mn, nv) in enumerate(kept)]
    return summary


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    """Slices of the smallest box holding every True voxel of ``mask``; None when there is none."""
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)
