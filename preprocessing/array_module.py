"""numpy on the host, CuPy on the GPU: the array module an array belongs to.

The CT chain (resample, window, patches, blending) is written once against the
numpy API; given a CuPy array the same code runs on the device. CuPy is never
imported unless such an array is passed.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np


def array_module(a: Any) -> ModuleType:
    """``cupy`` for a CuPy array, else ``numpy``."""
    if type(a).__module__.split(".", 1)[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(a: Any) -> np.ndarray:
    """A numpy array of ``a`` (a device array is copied to the host once)."""
    return a.get() if array_module(a) is not np else np.asarray(a)
