"""What this machine can run: GPU model, compute capability, driver and CUDA versions (or none).

Engine cache keys and plan metadata carry this, so a plan is never loaded on a
platform it was not built (and gated) for.
"""
from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any


def import_cudart():
    """cuda-python's runtime module (new or old layout), or None when cuda-python is not installed."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # older cuda-python
        return cudart
    except ImportError:
        return None


@functools.lru_cache(maxsize=1)
def gpu_info() -> dict[str, Any] | None:
    """GPU 0's name, compute capability, driver and CUDA runtime versions; None without a usable GPU."""
    cudart = import_cudart()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
            if int(err) == 0 and count > 0:
                err, props = cudart.cudaGetDeviceProperties(0)
                _, driver = cudart.cudaDriverGetVersion()
                _, runtime = cudart.cudaRuntimeGetVersion()
                name = props.name.decode() if isinstance(props.name, bytes) else str(props.name)
                return {"gpu": name.strip("\x00 "), "compute_capability": f"{props.major}.{props.minor}",
                        "driver": _cuda_version(driver), "cuda": _cuda_version(runtime)}
        except Exception:  # a broken driver is "no GPU" here; the runner says why when asked to run
            pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.strip().splitlines()
            if out:
                name, cc, driver = (s.strip() for s in out[0].split(","))
                return {"gpu": name, "compute_capability": cc, "driver": driver, "cuda": None}
        except (subprocess.SubprocessError, ValueError, OSError):
            pass
    return None


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


def platform_for(backend: str, providers: list[str] | None = None) -> dict[str, Any]:
    """The platform an engine of ``backend`` built or run here is bound to.

    ``id`` is the part that enters cache keys: ``"<gpu> sm<cc>"`` on a GPU,
    ``"cpu"`` for ONNX Runtime's CPU EP (and torch without CUDA), ``"cpu-aot"``
    for a TensorRT(-RTX) plan built ahead-of-time without a GPU.
    """
    if backend == "inductor":
        from engines.inductor_runner import torch_platform

        return torch_platform()
    gpu = gpu_info()
    if backend == "onnxruntime":
        from engines.ort_runner import default_providers

        uses_gpu = (providers or default_providers())[0] in ("CUDAExecutionProvider",
                                                             "TensorrtExecutionProvider")
        if not uses_gpu or gpu is None:
            return {"kind": "cpu", "id": "cpu"}
    elif gpu is None:
        return {"kind": "cpu-aot", "id": "cpu-aot"}
    cc = gpu["compute_capability"].replace(".", "")
    return {"kind": "gpu", **gpu, "id": f"{gpu['gpu']} sm{cc}"}
