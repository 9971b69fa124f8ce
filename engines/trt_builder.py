"""TensorRT plan builder: strongly typed network from a precision-planned ONNX, profiles from the model card.

Works with NVIDIA TensorRT 11 (``import tensorrt``) and TensorRT-RTX
(``import tensorrt_rtx``, same builder API, builds ahead-of-time on a CPU-only
machine). Precision comes from the ONNX graph (fp16 casts, int8 Q/DQ), never
from builder flags: TensorRT 11 builds strongly typed networks only.
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Any

log = logging.getLogger(__name__)

# Enterprise TensorRT first (data-centre GPUs); TensorRT-RTX where only it is installed.
TRT_MODULES = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailable(RuntimeError):
    """Neither tensorrt nor tensorrt_rtx can be imported."""


class BuildError(RuntimeError):
    """TensorRT could not parse or build the ONNX model."""


def import_tensorrt(module: str | None = None) -> ModuleType:
    """Import ``module`` or the first importable of tensorrt / tensorrt_rtx.

    ``MEDSCREEN_TRT_MODULE`` picks one explicitly.
    """
    names = [module] if module else ([os.environ["MEDSCREEN_TRT_MODULE"]]
                                     if os.environ.get("MEDSCREEN_TRT_MODULE") else TRT_MODULES)
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as exc:
            errors.append(f"{name}: {exc}")
    raise TensorRTUnavailable("no TensorRT Python module: " + "; ".join(errors) +
                              " (install the `tensorrt` extra: pip install tensorrt-rtx, or NVIDIA TensorRT 11)")


_LOGGER = None


def trt_logger(trt: ModuleType):
    # TensorRT keeps the first logger it was given process-wide and warns about any other.
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER


def _shape_for(dims: tuple[int, ...], prof: dict[str, dict[str, int]], which: str) -> tuple[int, ...]:
    # Contract: dim 0 is batch, dim 1 is seq; any other dynamic dim is an error in the model.
    names = ("batch", "seq")
    out = []
    for i, d in enumerate(dims):
        if d >= 0:
            out.append(d)
        elif i < len(names):
            out.append(prof[names[i]][which])
        else:
            raise BuildError(f"dynamic dim {i} of an input has no optimisation profile")
    return tuple(out)


def build_plan(onnx_path: Path, profiles: dict[str, dict[str, int]],
               module: str | None = None) -> tuple[bytes, dict[str, Any]]:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized plan.

    Returns (plan bytes, {"backend_module", "backend_version", "io"}).
    """
    trt = import_tensorrt(module)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT ({trt.__name__} {trt.__version__}) could not parse {onnx_path}: "
                         + " | ".join(errors))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    io = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        dims = tuple(t.shape)
        profile.set_shape(t.name, _shape_for(dims, profiles, "min"), _shape_for(dims, profiles, "opt"),
                          _shape_for(dims, profiles, "max"))
        io.append({"name": t.name, "mode": "input", "dtype": str(t.dtype), "shape": list(dims)})
    for i in range(network.num_outputs):
        t = network.get_output(i)
        io.append({"name": t.name, "mode": "output", "dtype": str(t.dtype), "shape": list(t.shape)})
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"TensorRT ({trt.__name__} {trt.__version__}) failed to build {onnx_path}; "
                         "see the TensorRT log above")
    log.info("built %s plan from %s (%d bytes)", trt.__name__, Path(onnx_path).name, plan.nbytes)
    return bytes(plan), {"backend_module": trt.__name__, "backend_version": trt.__version__, "io": io}
