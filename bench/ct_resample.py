"""Benchmark: CT series → 1 mm isotropic volume, medscreen's resampler vs scipy.ndimage.zoom.

Times, on one synthetic 512×512×N chest volume (2.5 mm slices, 0.7 mm pixels)
in the same run:

- ``resample_s``: ``preprocessing.resample.resample_to_spacing`` (separable
  trilinear, exact target spacing, origin kept);
- ``baseline_zoom_s``: ``scipy.ndimage.zoom(order=1)`` to the same output shape
  (the usual MONAI-style ``Spacing`` fallback), named baseline;
- ``load_s``: ``preprocessing.dicom_series.load_volume`` on the same volume
  written as DICOM (pydicom read + rescale + sort), when ``--dicom`` is given.

The 99th percentile |ΔHU| between the two is printed (zoom maps corner to
corner, so it stretches the grid by up to half a voxel; edges differ most). Prints one JSON object last.

    python bench/ct_resample.py [--slices 300] [--dicom]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from synth.ct_phantom import default_origin_lps_mm, make_phantom
from preprocessing.resample import resample_to_spacing, resampled_shape
from preprocessing.volume import Volume


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dicom", action="store_true", help="also time load_volume on DICOM files")
    args = p.parse_args()
    spacing = (2.5, 0.7, 0.7)
    shape = (args.slices, args.rows, args.rows)
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    hu, _ = make_phantom(shape, spacing, [], rng)
    phantom_s = time.perf_counter() - t
    vol = Volume(hu.astype(np.float32), spacing, default_origin_lps_mm(shape, spacing))
    out_shape = resampled_shape(shape, spacing, (1.0, 1.0, 1.0))

    def best(fn) -> tuple[float, np.ndarray]:
        times, out = [], None
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    ours_s, ours = best(lambda: resample_to_spacing(vol, 1.0).hu)
    zoom = [o / i for o, i in zip(out_shape, shape)]
    base_s, base = best(lambda: ndimage.zoom(vol.hu, zoom, order=1, output=np.float32, grid_mode=False))
    result = {"bench": "ct_resample", "input_shape_zyx": list(shape), "input_spacing_mm": list(spacing),
              "output_shape_zyx": list(out_shape), "resample_s": round(ours_s, 3),
              "baseline": "scipy.ndimage.zoom(order=1)", "baseline_zoom_s": round(base_s, 3),
              "speedup_vs_baseline": round(base_s / ours_s, 2),
              "p99_abs_delta_hu_vs_baseline": round(float(np.percentile(np.abs(ours - base), 99)), 3),
              "output_mvoxels_per_s": round(np.prod(out_shape) / ours_s / 1e6, 1),
              "phantom_s": round(phantom_s, 2), "cpus": os.cpu_count(), "machine": platform.machine()}
    if args.dicom:
        from synth.ct_phantom import ChestAnatomy, ChestPhantom
        from synth.ct import SeriesSpec, study_identity, write_series
        from preprocessing.dicom_series import load_volume

        with tempfile.TemporaryDirectory() as d:
            anatomy = ChestAnatomy.for_grid(shape, spacing, default_origin_lps_mm(shape, spacing))
            spec = SeriesSpec("bench", rows=args.rows, cols=args.rows, pixel_spacing_mm=spacing[1],
                              z_positions_mm=[-(args.slices - 1) * 1.25 + 2.5 * k for k in range(args.slices)])
            rec = write_series(Path(d), ChestPhantom(anatomy), spec, study_identity(rng, "bench", 0), 1, rng, "bench")
            t0 = time.perf_counter()
            loaded = load_volume([Path(d) / f for f in rec["files"]])
            result["load_s"] = round(time.perf_counter() - t0, 3)
            result["load_shape_zyx"] = list(loaded.shape)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
