"""The one CT preprocessing chain: DICOM files → volume → 1 mm grid → window, as small callables.

MONAI's ``Compose`` pattern: each step keeps its parameters (units in the
names) in ``__init__`` and takes data in ``__call__``; :class:`Compose` runs
them in order and times each under its ``stage`` name. Scoring, training,
the CT benchmark and the NIfTI export build their chains from these steps, so
what the model was trained on is what it is given::

    model_input(spacing_mm=1.0, window_hu=(-1000, 400))(paths)      # → WindowedVolume
    Compose(LoadSeries(), ResampleToSpacing(1.0))(paths)             # → Volume (export)

Given a volume on the GPU (:class:`ToDevice`, CuPy), resampling and
windowing run there; decoding and geometry always run on the host.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from preprocessing.body_crop import CropToBody
from preprocessing.dicom_series import load_volume
from preprocessing.resample import resample_to_spacing, window_to_unit
from preprocessing.volume import Volume


@dataclass(frozen=True)
class WindowedVolume:
    """The model's input: ``image`` in [0, 1] (float32, z, y, x) on ``volume``'s grid.

    ``volume`` is the resampled HU volume (its geometry places findings in LPS mm).
    """

    image: Any
    volume: Volume


class LoadSeries:
    """DICOM files of one series → :class:`Volume` in HU (decode, sort, geometry, tilt correction).

    ``resolve`` maps the index's stored paths to files (the imaging archive), or None.
    """

    stage = "read_s"

    def __init__(self, gantry_tilt: str = "correct", min_slices: int = 2,
                 resolve: Callable[[Sequence[str]], Sequence[Path | str]] | None = None):
        self.gantry_tilt = gantry_tilt
        self.min_slices = int(min_slices)
        self.resolve = resolve

    def __call__(self, paths: Sequence[Path | str]) -> Volume:
        files = self.resolve(list(paths)) if self.resolve is not None else list(paths)
        return load_volume(files, gantry_tilt=self.gantry_tilt, min_slices=self.min_slices)


class ToDevice:
    """Volume → the same volume with its voxels on the GPU (CuPy, float32): one host→device copy."""

    stage = "h2d_s"

    def __call__(self, volume: Volume) -> Volume:
        import cupy

        return volume.with_hu(cupy.asarray(np.asarray(volume.hu, dtype=np.float32)))


class ResampleToSpacing:
    """Volume → volume on a ``spacing_mm`` grid (linear; origin and LPS positions kept)."""

    stage = "resample_s"

    def __init__(self, spacing_mm: float | Sequence[float] = 1.0, order: int = 1):
        self.spacing_mm = spacing_mm
        self.order = order

    def __call__(self, volume: Volume) -> Volume:
        return resample_to_spacing(volume, self.spacing_mm, self.order)


class WindowToUnit:
    """Volume in HU → :class:`WindowedVolume`: HU clipped to ``window_hu`` and scaled to [0, 1]."""

    stage = "window_s"

    def __init__(self, window_hu: Sequence[float] = (-1000.0, 400.0)):
        self.window_hu = tuple(float(v) for v in window_hu)

    def __call__(self, volume: Volume) -> WindowedVolume:
        return WindowedVolume(window_to_unit(volume.hu, self.window_hu), volume)


class Compose:
    """Run steps in order; ``timings`` (when given) gains each step's seconds under its ``stage``."""

    def __init__(self, *steps: Callable[[Any], Any]):
        self.steps = steps

    def __call__(self, data: Any, timings: dict[str, float] | None = None) -> Any:
        for step in self.steps:
            t0 = time.perf_counter()
            data = step(data)
            if timings is not None:
                stage = getattr(step, "stage", type(step).__name__)
                timings[stage] = timings.get(stage, 0.0) + (time.perf_counter() - t0)
        return data


def model_input(spacing_mm: float, window_hu: Sequence[float], gantry_tilt: str = "correct",
                min_slices: int = 2, resolve: Callable[[Sequence[str]], Sequence[Path | str]] | None = None,
                crop: CropToBody | None = None) -> Compose:
    """Files of one series → the segmentation model's input on the host (scoring, benchmark).

    ``crop`` (scoring): cut the resampled volume to the body before windowing.
    """
    return Compose(LoadSeries(gantry_tilt, min_slices, resolve), *to_model_input(spacing_mm, window_hu, crop).steps)


def to_model_input(spacing_mm: float, window_hu: Sequence[float], crop: CropToBody | None = None) -> Compose:
    """A scanner-grid :class:`Volume` → the model's input, on the device its voxels live on
    (numpy: the host; CuPy: the GPU): resample, crop to the body (when given), window."""
    return Compose(ResampleToSpacing(spacing_mm), *([crop] if crop is not None else []), WindowToUnit(window_hu))


def on_device(spacing_mm: float, window_hu: Sequence[float], crop: CropToBody | None = None) -> Compose:
    """A host :class:`Volume` → the model's input on the GPU: one copy, then resample, crop and window there."""
    return Compose(ToDevice(), *to_model_input(spacing_mm, window_hu, crop).steps)
