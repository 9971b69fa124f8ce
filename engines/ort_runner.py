"""ONNX Runtime runner: CPU EP (embedded default, CI) and CUDA EP (GPU machines without TensorRT)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from engines.runner import TensorSpec

log = logging.getLogger(__name__)

_ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
              "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
              "tensor(bool)": "bool"}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_providers() -> list[str]:
    """CUDA EP first when onnxruntime-gpu is installed and a GPU answers, else CPU EP."""
    avail = available_providers()
    if "CUDAExecutionProvider" in avail:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) else str(d) for d in arg.shape)
    return TensorSpec(arg.name, _ORT_TYPES.get(arg.type, arg.type), shape)


class OrtRunner:
    """Runs one ONNX file with ONNX Runtime. ``activate`` loads, ``infer`` runs, ``deactivate`` frees.

    On the CUDA EP inputs and outputs go through I/O binding: each input is
    copied to the device once and the output is fetched once.
    """

    def __init__(self, path: Path, providers: list[str] | None = None, name: str | None = None,
                 intra_op_threads: int = 0, fp16_plan: bool = False):
        self.path = Path(path)
        self.providers = providers
        self.name = name or f"onnxruntime:{self.path.name}"
        self.intra_op_threads = intra_op_threads
        # ORT 1.31's CPU layout optimisations (level ALL) crash on fp16 graphs; fp16 plans use EXTENDED.
        self.fp16_plan = fp16_plan
        self._session = None
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []

    @property
    def is_active(self) -> bool:
        return self._session is not None

    @property
    def active_providers(self) -> list[str]:
        return list(self._session.get_providers()) if self._session is not None else []

    @property
    def input_specs(self) -> list[TensorSpec]:
        self._require_active()
        return list(self._inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        self._require_active()
        return list(self._outputs)

    def activate(self) -> None:
        import onnxruntime as ort

        if self._session is not None:
            return
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX plan {self.path} does not exist; build it with "
                                    "`medscreen engines build`")
        providers = self.providers or default_providers()
        if "CUDAExecutionProvider" in providers and hasattr(ort, "preload_dlls"):
            # onnxruntime-gpu finds the CUDA/cuDNN wheels' libraries only once preloaded.
            ort.preload_dlls()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.log_severity_level = 3
        if self.fp16_plan and providers[0] == "CPUExecutionProvider":
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        self._session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        self._inputs = [_spec(a) for a in self._session.get_inputs()]
        self._outputs = [_spec(a) for a in self._session.get_outputs()]
        self._use_binding = self._session.get_providers()[0] == "CUDAExecutionProvider"
        log.debug("activated %s on %s", self.path.name, self._session.get_providers())

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._require_active()
        arrays = coerce_feed(feed, self._inputs)
        if self._use_binding:
            binding = self._session.io_binding()
            for name, arr in arrays.items():
                binding.bind_cpu_input(name, arr)
            for spec in self._outputs:
                binding.bind_output(spec.name, "cuda")
            self._session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
            return {spec.name: v for spec, v in zip(self._outputs, values)}
        values = self._session.run([s.name for s in self._outputs], arrays)
        return {spec.name: v for spec, v in zip(self._outputs, values)}

    @property
    def runs_on_gpu(self) -> bool:
        """True when the active session's first provider is the CUDA EP (device arrays can be bound)."""
        return self._session is not None and self._use_binding

    def infer_device(self, feed: dict[str, Any]) -> dict[str, Any]:
        """``infer`` on arrays already on the GPU (CuPy, device 0): bound in place, outputs allocated there.

        Nothing crosses to the host. Symbolic output dims take the size of the
        input dim of the same name (``batch``). Inputs are checked as in
        :meth:`infer`, except that dtypes must already match.
        """
        self._require_active()
        if not self._use_binding:
            raise RuntimeError(f"runner {self.name} runs on {self.active_providers[0]}; device arrays need "
                               "the CUDA execution provider")
        import cupy

        dims: dict[str, int] = {}
        binding = self._session.io_binding()
        for spec in self._inputs:
            if spec.name not in feed:
                raise ValueError(f"feed lacks input {spec.name!r}")
            arr = cupy.ascontiguousarray(feed[spec.name])
            if arr.dtype != np.dtype(spec.dtype) or arr.ndim != len(spec.shape):
                raise ValueError(f"input {spec.name!r} is {arr.dtype} {arr.shape}, expected {spec.dtype} "
                                 f"{spec.shape}")
            dims.update({d: n for d, n in zip(spec.shape, arr.shape) if isinstance(d, str)})
            binding.bind_input(spec.name, "cuda", 0, arr.dtype.type, list(arr.shape), arr.data.ptr)
            feed = {**feed, spec.name: arr}  # keep the contiguous copy alive through the run
        outputs = {}
        for spec in self._outputs:
            shape = [dims[d] if isinstance(d, str) else int(d) for d in spec.shape]
            out = cupy.empty(shape, dtype=np.dtype(spec.dtype))
            binding.bind_output(spec.name, "cuda", 0, out.dtype.type, shape, out.data.ptr)
            outputs[spec.name] = out
        # CuPy's kernels that wrote the inputs run on its stream; ORT runs on its own.
        cupy.cuda.get_current_stream().synchronize()
        self._session.run_with_iobinding(binding)
        return outputs

    def deactivate(self) -> None:
        self._session = None

    def __enter__(self) -> "OrtRunner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def _require_active(self) -> None:
        if self._session is None:
            raise RuntimeError(f"runner {self.name} is not active; call activate() first")


def coerce_feed(feed: dict[str, np.ndarray], specs: list[TensorSpec]) -> dict[str, np.ndarray]:
    """Check names and dtypes against ``specs``; widen ints/floats of the same kind (int32 → int64).

    A missing input or a kind change (float where int is expected) is an error
    naming the input, never a silent cast.
    """
    missing = [s.name for s in specs if s.name not in feed]
    if missing:
        raise ValueError(f"feed lacks inputs {missing}; the model expects "
                         f"{[(s.name, s.dtype) for s in specs]}")
    out = {}
    for s in specs:
        arr = np.asarray(feed[s.name])
        want = np.dtype(s.dtype)
        if arr.dtype != want:
            if arr.dtype.kind != want.kind and not (arr.dtype.kind in "iu" and want.kind == "i"):
                raise ValueError(f"input {s.name!r} has dtype {arr.dtype}, expected {want} "
                                 f"(shape {s.shape})")
            arr = arr.astype(want)
        if len(s.shape) != arr.ndim:
            raise ValueError(f"input {s.name!r} has {arr.ndim} dims {arr.shape}, expected {s.shape}")
        out[s.name] = np.ascontiguousarray(arr)
    return out
