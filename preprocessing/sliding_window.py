"""Sliding-window segmentation of one volume with any predictor (MONAI ``sliding_window_inference``).

The one place patches are cut, fed in batches and blended back: CT scoring
passes an engine runner, training passes the torch model; both see the same
grid (:mod:`preprocessing.patches`) and blending (:mod:`preprocessing.stitching`).
Runs on numpy arrays, or on CuPy arrays on the GPU when the image and the
predictor's output live there.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from preprocessing.array_module import array_module
from preprocessing.patches import PatchGrid, extract_patches, pad_to_grid, patch_grid
from preprocessing.stitching import BlendMode, Stitcher

# patches [n, 1, pz, py, px] float32 → probabilities of the same shape
Predictor = Callable[[Any], Any]


def sliding_window_inference(image: Any, predictor: Predictor, patch_size: tuple[int, int, int],
                             stride: tuple[int, int, int], batch_patches: int, mode: BlendMode = "gaussian",
                             timings: dict[str, float] | None = None) -> Any:
    """Probability volume (float32, ``image``'s shape and device) from patches of ``image``.

    Patches are cut ``batch_patches`` at a time from the edge-padded image, given
    to ``predictor`` and blended into the volume as they come back, so a
    volume's patch set is never held whole. ``timings`` (when given) gains
    ``patch_s``, ``engine_s``, ``stitch_s`` and ``patches``.
    """
    if batch_patches < 1:
        raise ValueError(f"batch_patches must be at least 1, got {batch_patches}")
    t = timings if timings is not None else {}
    xp = array_module(image)
    grid: PatchGrid = patch_grid(image.shape, patch_size, stride)  # type: ignore[arg-type]
    stitcher = Stitcher(grid, mode, xp=xp)
    t0 = time.perf_counter()
    padded = pad_to_grid(image, grid)
    _add(t, "patch_s", time.perf_counter() - t0)
    for start in range(0, len(grid), batch_patches):
        idx = range(start, min(start + batch_patches, len(grid)))
        t0 = time.perf_counter()
        patches = extract_patches(padded, grid, idx)[:, None]
        t1 = time.perf_counter()
        prob = predictor(patches)
        t2 = time.perf_counter()
        stitcher.add(prob, idx)
        t3 = time.perf_counter()
        _add(t, "patch_s", t1 - t0)
        _add(t, "engine_s", t2 - t1)
        _add(t, "stitch_s", t3 - t2)
        _add(t, "patches", len(idx))
    t0 = time.perf_counter()
    out = stitcher.result()
    _add(t, "stitch_s", time.perf_counter() - t0)
    return out


def _add(t: dict[str, float], key: str, value: float) -> None:
    t[key] = t.get(key, 0.0) + value


def runner_predictor(runner: Any, input_name: str = "image", output_name: str = "prob") -> Predictor:
    """A predictor over an engine runner (:class:`engines.runner.Runner`): numpy patches in, numpy out."""
    def predict(patches: np.ndarray) -> np.ndarray:
        return runner.infer({input_name: patches})[output_name]

    return predict
