"""TensorRT runtime runner: one execution context, device memory and a stream through cuda-python.

A plan is deserialised only after the engine cache has checked its sha256 and
platform (see engines.cache). TensorRT-RTX plans need an RTX-class GPU
(compute capability 7.5/8.x/12.x); without a compatible GPU ``activate``
refuses with a clear error instead of letting the runtime crash.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from engines import hardware
from engines.ort_runner import coerce_feed
from engines.runner import TensorSpec
from engines.trt_builder import import_tensorrt, trt_logger

# TensorRT-RTX runs on these architectures (its support matrix); Hopper (9.0) is not among them.
RTX_COMPUTE_CAPABILITIES = ("7.5", "8.0", "8.6", "8.7", "8.9", "12.0", "12.1")
_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32",
           "INT8": "int8", "BOOL": "bool", "UINT8": "uint8", "BF16": "bfloat16"}


class NoCompatibleGPU(RuntimeError):
    """The plan cannot execute on this machine (no GPU, no cuda-python, or an unsupported GPU)."""


def _check(result):
    """cuda-python calls return (err, *values); raise on a non-zero error."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def execution_blocker(backend_module: str) -> str | None:
    """Why a ``backend_module`` plan cannot execute here, or None when it can."""
    if hardware.import_cudart() is None:
        return ("TensorRT plans execute only on an NVIDIA GPU through cuda-python, which is not "
                "installed here (pip install 'medscreen[gpu]'); use --backend onnxruntime on this machine")
    gpu = hardware.gpu_info()
    if gpu is None:
        return "no NVIDIA GPU answers on this machine; use --backend onnxruntime here"
    if backend_module == "tensorrt_rtx" and gpu["compute_capability"] not in RTX_COMPUTE_CAPABILITIES:
        return (f"TensorRT-RTX plans do not run on {gpu['gpu']} (compute capability "
                f"{gpu['compute_capability']}); build with NVIDIA TensorRT "
                "(MEDSCREEN_TRT_MODULE=tensorrt) on this machine")
    return None


class TrtRunner:
    """Runs one serialized TensorRT plan (already verified by the cache) on GPU 0."""

    def __init__(self, plan_path: Path, backend_module: str, name: str | None = None):
        self.plan_path = Path(plan_path)
        self.backend_module = backend_module
        self.name = name or f"tensorrt:{self.plan_path.name}"
        self._engine = None
        self._context = None
        self._stream = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device ptr, bytes)
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(self._outputs)

    def activate(self) -> None:
        if self._context is not None:
            return
        blocker = execution_blocker(self.backend_module)
        if blocker:
            raise NoCompatibleGPU(f"cannot run {self.plan_path.name}: {blocker}")
        trt = import_tensorrt(self.backend_module)
        self._cudart = hardware.import_cudart()
        runtime = trt.Runtime(trt_logger(trt))
        self._engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise RuntimeError(f"{trt.__name__} refused to deserialise {self.plan_path}; "
                               "rebuild it with `medscreen engines build --backend tensorrt`")
        self._context = self._engine.create_execution_context()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._inputs, self._outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = _DTYPES.get(self._engine.get_tensor_dtype(name).name, "float32")
            shape = tuple(d if d >= 0 else ("batch" if j == 0 else "seq")
                          for j, d in enumerate(self._engine.get_tensor_shape(name)))
            spec = TensorSpec(name, dtype, shape)
            is_input = self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(spec)

    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _check(self._cudart.cudaFree(ptr))
            # Grow geometrically so length buckets do not reallocate every batch.
            size = max(nbytes, 2 * size, 1024)
            ptr = int(_check(self._cudart.cudaMalloc(size)))
            self._buffers[name] = (ptr, size)
        return ptr

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._context is None:
            raise RuntimeError(f"runner {self.name} is not active; call activate() first")
        cu = self._cudart
        h2d = cu.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = cu.cudaMemcpyKind.cudaMemcpyDeviceToHost
        arrays = coerce_feed(feed, self._inputs)
        for spec in self._inputs:
            arr = arrays[spec.name]
            if not self._context.set_input_shape(spec.name, tuple(arr.shape)):
                raise ValueError(f"input {spec.name!r} shape {arr.shape} is outside the plan's "
                                 "optimisation profile (see the model card's profiles)")
            ptr = self._device(spec.name, arr.nbytes)
            _check(cu.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, self._stream))
            self._context.set_tensor_address(spec.name, ptr)
        outputs: dict[str, np.ndarray] = {}
        for spec in self._outputs:
            shape = tuple(self._context.get_tensor_shape(spec.name))
            out = np.empty(shape, dtype=spec.dtype)
            ptr = self._device(spec.name, max(out.nbytes, 1))
            self._context.set_tensor_address(spec.name, ptr)
            outputs[spec.name] = out
        if not self._context.execute_async_v3(self._stream):
            raise RuntimeError(f"TensorRT execution of {self.plan_path.name} failed")
        for spec in self._outputs:
            out = outputs[spec.name]
            _check(cu.cudaMemcpyAsync(out.ctypes.data, self._buffers[spec.name][0], out.nbytes,
                                      d2h, self._stream))
        _check(cu.cudaStreamSynchronize(self._stream))
        return outputs

    def deactivate(self) -> None:
        if self._context is None:
            return
        for ptr, _ in self._buffers.values():
            self._cudart.cudaFree(ptr)
        self._buffers.clear()
        self._cudart.cudaStreamDestroy(self._stream)
        self._context = self._engine = self._stream = None

    def __enter__(self) -> "TrtRunner":
        self.activate()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()


