"""Check (and time) the CT chain on device arrays against the host: resample, window, sliding window.

Runs where CuPy and a GPU are present; needs neither DICOM nor an engine (a
pointwise predictor stands in for the model, so the blend must return it
exactly). Prints one JSON object: the largest difference between the CuPy
and numpy results of each step, and each step's time on both.

    python bench/ct_device_arrays.py
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from preprocessing.resample import resample_to_spacing, window_to_unit  # noqa: E402
from preprocessing.sliding_window import sliding_window_inference  # noqa: E402
from preprocessing.volume import Volume  # noqa: E402


def main() -> int:
    import cupy

    rng = np.random.default_rng(0)
    hu = rng.normal(-400.0, 500.0, (240, 512, 512)).astype(np.float32)
    vol = Volume(hu, (1.25, 0.7, 0.7), (0.0, 0.0, 0.0))
    out: dict[str, object] = {}

    def timed(fn):
        fn()  # warm (kernel compilation)
        cupy.cuda.Device().synchronize()
        t0 = time.perf_counter()
        r = fn()
        cupy.cuda.Device().synchronize()
        return r, round(time.perf_counter() - t0, 4)

    host, out["resample_host_s"] = timed(lambda: window_to_unit(resample_to_spacing(vol, 1.0).hu))
    dvol = vol.with_hu(cupy.asarray(hu))
    dev, out["resample_device_s"] = timed(lambda: window_to_unit(resample_to_spacing(dvol, 1.0).hu))
    out["resample_window_max_abs_diff"] = float(np.abs(dev.get() - host).max())

    def square(p):
        return p * p

    hs, out["sliding_window_host_s"] = timed(lambda: sliding_window_inference(host, square, (64, 128, 128),
                                                                              (32, 64, 64), 16))
    ds, out["sliding_window_device_s"] = timed(lambda: sliding_window_inference(dev, square, (64, 128, 128),
                                                                                (32, 64, 64), 16))
    out["sliding_window_max_abs_diff"] = float(np.abs(ds.get() - hs).max())
    out["sliding_window_vs_truth_max_abs_diff"] = float(np.abs(hs - host * host).max())
    out["shape"] = list(host.shape)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
