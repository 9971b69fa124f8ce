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
                             timings: dict[str, float] | None = None, out_dtype: Any = np.float32) -> Any:
    """Probability volume (``out_dtype``, ``image``'s shape and device) from patches of ``image``.

    Patches are cut ``batch_patches`` at a time from the edge-padded image, given
    to ``predictor`` and blended as they come back, in grid order, by a rolling
    :class:`Stitcher`: neither a volume's patch set nor whole-volume blend sums
    are ever held (:func:`window_bytes` is what it holds besides ``image``).
    ``timings`` (when given) gains ``patch_s``, ``engine_s``, ``stitch_s`` and ``patches``.
    """
    if batch_patches < 1:
        raise ValueError(f"batch_patches must be at least 1, got {batch_patches}")
    t = timings if timings is not None else {}
    xp = array_module(image)
    grid: PatchGrid = patch_grid(image.shape, patch_size, stride)  # type: ignore[arg-type]
    stitcher = Stitcher(grid, mode, xp=xp, rolling=True, out_dtype=out_dtype)
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


# Arrays of one patch's size a batch holds at once per patch: the cut input, the prediction, the
# weighted prediction while it is blended.
PATCH_ARRAYS = 3


def window_bytes(shape_zyx: tuple[int, ...], patch_size: tuple[int, int, int], stride: tuple[int, int, int],
                 batch_patches: int, out_itemsize: int = 4) -> int:
    """Bytes :func:`sliding_window_inference` holds for a float32 image of ``shape_zyx`` besides the image
    and the predictor's own working memory: the padded copy (where an axis is shorter than a patch),
    the rolling blend buffers, the result and ``batch_patches`` patches' arrays."""
    grid = patch_grid(tuple(int(v) for v in shape_zyx), patch_size, stride)  # type: ignore[arg-type]
    padded = 4 * int(np.prod(grid.padded_shape)) if grid.padded_shape != grid.volume_shape else 0
    return (padded + Stitcher.buffer_bytes(grid, rolling=True) + out_itemsize * int(np.prod(shape_zyx))
            + PATCH_ARRAYS * 4 * int(np.prod(patch_size)) * int(batch_patches))


def _add(t: dict[str, float], key: str, value: float) -> None:
    t[key] = t.get(key, 0.0) + value


def runner_predictor(runner: Any, input_name: str = "image", output_name: str = "prob") -> Predictor:
    """A predictor over an engine runner (:class:`engines.runner.Runner`): numpy patches in, numpy out."""
    def predict(patches: np.ndarray) -> np.ndarray:
        return runner.infer({input_name: patches})[output_name]

    return predict
