"""Helpers for the CT index tests: the test phantom, series writers, nodule segmentation."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from synth.ct_phantom import ChestAnatomy, ChestPhantom, Nodule
from synth.ct import SeriesSpec, study_identity, write_series

# The same literal as tests/conftest.py's autouse key, for session-scoped fixtures
# that run before any function-scoped fixture sets the environment.
SESSION_KEY = "test-pseudonym-key-not-for-production-0001"

# A small chest: 200 mm field of view; lungs centred at x = ±38 mm.
ANATOMY = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0), fov_mm=(200.0, 200.0, 90.0))
NODULE = {"centre_lps_mm": [-37.3, 6.1, 3.7], "diameter_mm": 14.0, "kind": "solid"}


def z_regular(start: float, n: int, step: float) -> list[float]:
    return [start + k * step for k in range(n)]


def z_variable() -> list[float]:
    # 5 mm above and below, 1.25 mm through the middle (where the nodule is).
    return [-30.0, -25.0, -20.0, -15.0, -10.0] + [-10.0 + 1.25 * k for k in range(1, 17)] + [15.0, 20.0, 25.0, 30.0]


def write_case(folder: Path, seed: int = 0, nodules: list[dict[str, Any]] | None = None,
               **spec: Any) -> dict[str, Any]:
    """Write one series of the test phantom into ``folder``; returns its ground-truth record."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spec.setdefault("rows", 96)
    spec.setdefault("cols", spec["rows"])
    spec.setdefault("pixel_spacing_mm", 200.0 / spec["rows"])
    spec.setdefault("z_positions_mm", z_regular(-30.0, 25, 2.5))
    phantom = ChestPhantom(ANATOMY, [Nodule.from_dict(n) for n in (nodules if nodules is not None else [NODULE])])
    study = study_identity(np.random.default_rng(99), f"test/{seed}", 0)
    number = int(spec.pop("series_number", 1))
    rec = write_series(folder, phantom, SeriesSpec(label=spec.pop("label", "case"), **spec), study,
                       number, rng, f"test/{seed}")
    rec["paths"] = [folder / f for f in rec["files"]]
    return rec


def index_folder(spark: Any, folder: Path, lake: Path) -> dict[str, Any]:
    """Index ``folder`` into ``lake`` with the real DICOM index job on the shared Spark session."""
    import pytest

    from jobs import dicom_index

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", SESSION_KEY)
        settings = index_settings(lake)
        summary = dicom_index.run(settings, folder, spark=spark)
    return {"lake": lake, "settings": settings, "summary": summary}


def index_settings(lake: Path, **extra: Any):
    from conf.settings import load_settings

    merged = {"lake.root": str(lake), "spark.master": "local[2]", "spark.shuffle_partitions": 2,
              "imaging.min_slices": 4}
    merged.update(extra)
    return load_settings(merged)


def segment_centre_lps(volume, centre_lps_mm, diameter_mm: float, threshold_hu: float = -400.0) -> np.ndarray:
    """LPS centroid of the above-threshold blob under ``centre_lps_mm`` (within a box around it)."""
    from scipy import ndimage

    idx = volume.lps_to_index(centre_lps_mm)
    reach = [math.ceil((diameter_mm / 2 + 6) / s) for s in volume.spacing_mm]
    lo = [max(int(round(i)) - r, 0) for i, r in zip(idx, reach)]
    hi = [min(int(round(i)) + r + 1, n) for i, r, n in zip(idx, reach, volume.shape)]
    box = volume.hu[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] > threshold_hu
    labels, n = ndimage.label(box)
    assert n >= 1, "no nodule voxels found near the planted centre"
    # The blob under the planted centre (body wall or vessels may share the box).
    at = tuple(int(round(i)) - l for i, l in zip(idx, lo))
    label = int(labels[at]) if all(0 <= a < b for a, b in zip(at, labels.shape)) else 0
    if label == 0:
        label = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    com = np.asarray(ndimage.center_of_mass(box, labels, label))
    return volume.index_to_lps(com + np.asarray(lo))
