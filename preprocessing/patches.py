"""Sliding-window patch grids over a volume (z, y, x), MONAI-style.

Every voxel is covered: along each axis the windows start at 0, ``stride``,
``2*stride`` … and the last window is pulled back so it ends exactly at the
volume's edge (no voxel is scored twice as often as it needs to be). An axis
shorter than the patch is padded at its far end so small volumes still make
one patch. The default pad repeats the edge voxels: a constant pad (MONAI's
default, 0.0 = air after windowing) puts a slab of air against whatever tissue
the series ends in, and a segmentation network reads tissue bounded by air as
a blob (seen: a thin series' whole top soft tissue scored as one "nodule").

Pure numpy: the same code runs in a Ray task, a Spark UDF or a unit test, and on CuPy
arrays on the GPU (:mod:`preprocessing.array_module`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from preprocessing.array_module import array_module

Zyx = tuple[int, int, int]


@dataclass(frozen=True)
class PatchGrid:
    """Where the patches of one volume lie.

    ``starts`` are the (z, y, x) voxel indices of each patch's first corner in
    the padded volume; ``padded_shape`` ≥ ``volume_shape`` on every axis (equal
    unless an axis is shorter than the patch).
    """

    volume_shape: Zyx
    patch_size: Zyx
    stride: Zyx
    padded_shape: Zyx
    starts: tuple[Zyx, ...]

    def __len__(self) -> int:
        return len(self.starts)

    def slices(self, i: int) -> tuple[slice, slice, slice]:
        """The (z, y, x) slices of patch ``i`` in the padded volume."""
        return tuple(slice(s, s + p) for s, p in zip(self.starts[i], self.patch_size))  # type: ignore[return-value]


def _axis_starts(n: int, patch: int, stride: int) -> tuple[list[int], int]:
    """Window starts along one axis and that axis's padded length."""
    if n <= patch:
        return [0], patch
    # ceil((n - patch) / stride) + 1 windows; the last is clamped to end at n.
    count = -(-(n - patch) // stride) + 1
    starts = sorted({min(i * stride, n - patch) for i in range(count)})
    return starts, n


def patch_grid(volume_shape: Zyx, patch_size: Zyx, stride: Zyx) -> PatchGrid:
    """The patch grid covering a volume of ``volume_shape`` (z, y, x) voxels.

    Raises ValueError when a size is not positive or a stride exceeds its patch
    (that would leave voxels uncovered).
    """
    volume_shape = tuple(int(v) for v in volume_shape)  # type: ignore[assignment]
    patch_size = tuple(int(v) for v in patch_size)  # type: ignore[assignment]
    stride = tuple(int(v) for v in stride)  # type: ignore[assignment]
    if len(volume_shape) != 3 or len(patch_size) != 3 or len(stride) != 3:
        raise ValueError(f"volume shape {volume_shape}, patch size {patch_size} and stride {stride} "
                         "must each be (z, y, x)")
    if min(volume_shape) < 1 or min(patch_size) < 1 or min(stride) < 1:
        raise ValueError(f"volume shape {volume_shape}, patch size {patch_size} and stride {stride} "
                         "must be positive")
    if any(s > p for s, p in zip(stride, patch_size)):
        raise ValueError(f"patch stride {stride} exceeds patch size {patch_size} on some axis; "
                         "voxels between windows would never be scored (imaging.patch_stride)")
    per_axis = [_axis_starts(n, p, s) for n, p, s in zip(volume_shape, patch_size, stride)]
    starts = tuple(itertools.product(*(a[0] for a in per_axis)))
    padded = tuple(a[1] for a in per_axis)
    return PatchGrid(volume_shape, patch_size, stride, padded, starts)  # type: ignore[arg-type]


def pad_to_grid(volume: np.ndarray, grid: PatchGrid, pad_mode: str = "edge",
                pad_value: float = 0.0) -> np.ndarray:
    """``volume`` padded at the far end of each axis to ``grid.padded_shape``.

    ``pad_mode`` is ``"edge"`` (repeat the last voxel) or ``"constant"``
    (``pad_value``). Returns ``volume`` itself when no padding is needed or
    when it already has the padded shape.
    """
    shape = tuple(volume.shape)
    if shape == grid.padded_shape:
        return volume
    if shape != grid.volume_shape:
        raise ValueError(f"volume of shape {volume.shape} does not match its patch grid "
                         f"(built for {grid.volume_shape})")
    pad = [(0, p - n) for n, p in zip(grid.volume_shape, grid.padded_shape)]
    xp = array_module(volume)
    if pad_mode == "edge":
        return xp.pad(volume, pad, mode="edge")
    if pad_mode == "constant":
        return xp.pad(volume, pad, mode="constant", constant_values=pad_value)
    raise ValueError(f"pad mode {pad_mode!r} is not one of 'edge', 'constant'")


def extract_patches(volume: np.ndarray, grid: PatchGrid, indices: list[int] | range | None = None,
                    pad_mode: str = "edge", pad_value: float = 0.0) -> np.ndarray:
    """Patches of ``volume`` as one array ``[n, pz, py, px]`` (float32), in grid order.

    ``indices`` picks a subset of the grid (to bound memory); default all.
    ``volume`` may already be padded (:func:`pad_to_grid`): callers that cut
    patches batch by batch pad once.
    """
    padded = pad_to_grid(volume, grid, pad_mode, pad_value)
    idx = range(len(grid)) if indices is None else indices
    out = array_module(padded).empty((len(idx), *grid.patch_size), dtype=np.float32)
    for k, i in enumerate(idx):
        out[k] = padded[grid.slices(i)]
    return out


class PatchExtractor:
    """MONAI-style callable: parameters in ``__init__``, a volume in ``__call__``.

    Returns ``(grid, patches)`` where ``patches`` is ``[n, 1, pz, py, px]`` float32,
    the channel axis the segmentation engine expects.
    """

    def __init__(self, patch_size: Zyx, stride: Zyx, pad_mode: str = "edge", pad_value: float = 0.0):
        self.patch_size = tuple(patch_size)
        self.stride = tuple(stride)
        self.pad_mode = pad_mode
        self.pad_value = pad_value

    def __call__(self, volume: np.ndarray) -> tuple[PatchGrid, np.ndarray]:
        grid = patch_grid(volume.shape, self.patch_size, self.stride)  # type: ignore[arg-type]
        return grid, extract_patches(volume, grid, None, self.pad_mode, self.pad_value)[:, None]
