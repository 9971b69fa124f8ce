"""Overlap blending of patch predictions back into one volume.

The one place the sliding-window blending math lives (MONAI
``sliding_window_inference`` with ``mode="gaussian"`` or ``"constant"``):

    out(v) = Σ_i w(v - s_i) · p_i(v - s_i)  /  Σ_i w(v - s_i)

over the patches i whose window (start s_i) contains voxel v, with importance
weights w over the patch:

- ``gaussian``: w(u) = Π_axis exp(-(u_a - c_a)² / (2 σ_a²)), σ_a = sigma_scale ·
  patch_a, c_a the patch centre, scaled to max 1. Patch edges, where a
  convolutional network sees the least context, count least; no voxel gets
  weight 0 (zeros are lifted to the smallest positive weight) so a voxel that
  only one patch edge reaches still has a defined prediction.
- ``constant``: w ≡ 1, a plain average of overlapping predictions.

Because out(v) is a weighted mean, a constant prediction stitches back to that
constant (up to float32 rounding) whatever the weights. Accumulation is
incremental (:class:`Stitcher`) so a caller can feed patches in batches and
never hold all of them at once. A rolling stitcher (``rolling=True``, patches
in grid order) keeps its sums over one patch's depth of slices only and writes
each slice out as soon as no later patch can reach it, so its buffers do not
grow with the series' length (a 1 000-slice series blends in the memory of 64
slices).
"""
from __future__ import annotations

from typing import Literal

import numpy as np

from preprocessing.array_module import array_module
from preprocessing.patches import PatchGrid

BlendMode = Literal["gaussian", "constant"]


def importance_map(patch_size: tuple[int, int, int], mode: BlendMode = "gaussian",
                   sigma_scale: float = 0.125) -> np.ndarray:
    """Blending weights over one patch, float32 of shape ``patch_size``, max 1, all > 0."""
    if mode == "constant":
        return np.ones(patch_size, dtype=np.float32)
    if mode != "gaussian":
        raise ValueError(f"blend mode {mode!r} is not one of 'gaussian', 'constant'")
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale {sigma_scale} must be positive")
    axes = []
    for p in patch_size:
        centre = (p - 1) / 2.0
        sigma = sigma_scale * p
        u = np.arange(p, dtype=np.float64)
        axes.append(np.exp(-((u - centre) ** 2) / (2.0 * sigma * sigma)))
    w = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    w = (w / w.max()).astype(np.float32)
    positive = w[w > 0]
    w[w <= 0] = positive.min()
    return w


class Stitcher:
    """Accumulates weighted patch predictions for one volume; :meth:`result` blends them.

    ``add`` takes predictions ``[k, pz, py, px]`` (or ``[k, 1, pz, py, px]``)
    for the grid indices ``indices`` in any order and any batch size; with
    ``rolling=True`` in grid order (z starts never decrease), and the sums span
    one patch's depth, each finished slice going to the ``out_dtype`` result at once.
    ``xp`` is the array module the buffers live in (numpy; CuPy keeps them on the GPU).
    """

    def __init__(self, grid: PatchGrid, mode: BlendMode = "gaussian", sigma_scale: float = 0.125,
                 xp=np, rolling: bool = False, out_dtype=np.float32):
        self.grid = grid
        self.xp = xp
        self.rolling = bool(rolling)
        self.out_dtype = out_dtype
        self.weights = xp.asarray(importance_map(grid.patch_size, mode, sigma_scale))
        shape = self.buffer_shape(grid, self.rolling)
        self._acc = xp.zeros(shape, dtype=np.float32)
        self._wsum = xp.zeros(shape, dtype=np.float32)
        self._seen = np.zeros(len(grid), dtype=bool)
        # Rolling: padded-volume slice held in buffer row 0; slices before it are in _out.
        self._z0 = 0
        self._out = xp.empty(grid.volume_shape, dtype=out_dtype) if self.rolling else None

    @staticmethod
    def buffer_shape(grid: PatchGrid, rolling: bool = False) -> tuple[int, int, int]:
        """Shape of each of the two blend buffers (rolling: one patch's depth of slices)."""
        depth = grid.patch_size[0] if rolling else grid.padded_shape[0]
        return (int(depth), int(grid.padded_shape[1]), int(grid.padded_shape[2]))

    @staticmethod
    def buffer_bytes(grid: PatchGrid, rolling: bool = False) -> int:
        """Device or host bytes the two blend buffers of ``grid`` take."""
        return 2 * 4 * int(np.prod(Stitcher.buffer_shape(grid, rolling)))

    def add(self, preds: np.ndarray, indices: list[int] | range | np.ndarray) -> None:
        preds = self.xp.asarray(preds)
        if preds.ndim == 5:
            if preds.shape[1] != 1:
                raise ValueError(f"patch predictions have {preds.shape[1]} channels; stitching takes one")
            preds = preds[:, 0]
        if preds.shape[1:] != tuple(self.grid.patch_size) or len(preds) != len(indices):
            raise ValueError(f"patch predictions of shape {preds.shape} do not match "
                             f"{len(indices)} patches of size {self.grid.patch_size}")
        for p, i in zip(preds, indices):
            sl = self.grid.slices(int(i))
            if self.rolling:
                if sl[0].start < self._z0:
                    raise ValueError(f"patch {int(i)} starts at slice {sl[0].start}, before slice {self._z0} "
                                     "that a rolling stitcher has already written out; add patches in grid order")
                self._advance(sl[0].start)
                sl = (slice(sl[0].start - self._z0, sl[0].stop - self._z0), sl[1], sl[2])
            self._acc[sl] += p * self.weights
            self._wsum[sl] += self.weights
            self._seen[int(i)] = True

    def _advance(self, z: int) -> None:
        """Rolling: slices before ``z`` are final (no later patch starts before it); write them out, shift."""
        n = z - self._z0
        if n <= 0:
            return
        self._emit(min(n, self._acc.shape[0]))
        depth = self._acc.shape[0]
        if n < depth:
            for buf in (self._acc, self._wsum):
                buf[:depth - n] = buf[n:].copy()
                buf[depth - n:] = 0.0
        else:
            self._acc[:] = 0.0
            self._wsum[:] = 0.0
        self._z0 = z

    def _emit(self, rows: int) -> None:
        z, y, x = self.grid.volume_shape
        rows = min(rows, z - self._z0)
        if rows > 0:
            self._out[self._z0:self._z0 + rows] = (self._acc[:rows, :y, :x] / self._wsum[:rows, :y, :x]
                                                   ).astype(self.out_dtype)

    @property
    def complete(self) -> bool:
        return bool(self._seen.all())

    def result(self) -> np.ndarray:
        """The blended volume, cropped to the original shape (``out_dtype``). Rolling: call it once."""
        if not self.complete:
            missing = int((~self._seen).sum())
            raise ValueError(f"{missing} of {len(self.grid)} patches were never added; "
                             "a stitched volume would have holes")
        z, y, x = self.grid.volume_shape
        if self.rolling:
            self._emit(self._acc.shape[0])
            return self._out
        return (self._acc[:z, :y, :x] / self._wsum[:z, :y, :x]).astype(self.out_dtype, copy=False)


def stitch(preds: np.ndarray, grid: PatchGrid, mode: BlendMode = "gaussian",
           sigma_scale: float = 0.125) -> np.ndarray:
    """Blend the predictions of every patch of ``grid`` (grid order) into one volume."""
    s = Stitcher(grid, mode, sigma_scale)
    s.add(preds, range(len(grid)))
    return s.result()
