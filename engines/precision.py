"""Precision plans at the ONNX level: fp32 ONNX → fp16 mixed precision, or → int8 Q/DQ.

TensorRT 11 builds strongly typed networks only, so the precision of every
layer is decided here, in the graph, and every backend runs the same plan.

fp16: a node-by-node rewrite. Each convertible node gets fp16 inputs (fp16
copies of its weights, Casts for its activations) and its outputs are cast
back to fp32 under their original names; afterwards every
``Cast(fp16→fp32) → Cast(fp32→fp16)`` pair is folded away (exact: fp16→fp32→fp16
is lossless), so runs of convertible nodes become fp16 islands joined without
casts. Numerically sensitive ops (LayerNorm, Softmax, reductions, exp/log,
the output sigmoid) are never converted, graph inputs and outputs keep their
types. The result is checked with ``onnx.checker`` (full) and must load in ORT.

int8: ``onnxruntime.quantization.quantize_static`` in QDQ format with per-channel
MatMul weights, calibrated (minmax by default, ``engines.calibration_method``;
entropy and percentile on request) on real timelines from the lake.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, helper, numpy_helper

from engines.runner import PRECISIONS

log = logging.getLogger(__name__)

CALIBRATION_METHODS = ("entropy", "minmax", "percentile")

# Ops that compute in fp16 with no meaningful loss: matrix products, elementwise
# arithmetic and pure data movement. Anything not listed stays fp32.
FP16_OPS = frozenset({
    "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Relu", "Gelu", "Erf", "Tanh",
    "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Concat", "Split", "Slice",
    "Gather", "Expand", "Where", "Identity", "Flatten",
    # Convolutional models (ct_nodule): the convolutions are nearly all of the work.
    "Conv", "ConvTranspose", "MaxPool", "AveragePool", "Resize",
})
# Kept in fp32 whatever FP16_OPS says: statistics over many values, and the
# exponentials/logs whose fp16 range is too small.
FP32_ALWAYS = frozenset({
    "LayerNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "ReduceL2", "ReduceSumSquare", "Pow", "Sqrt", "Exp", "Log", "Sigmoid",
    "CumSum", "Sin", "Cos", "Cast", "Constant", "ConstantOfShape", "Range", "Shape",
})
_FP16_MAX = float(np.finfo(np.float16).max)


class PrecisionError(ValueError):
    """A precision plan could not be produced or is invalid."""


# --------------------------------------------------------------------------- fp16

def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor in the (shape-inferred) main graph."""
    g = model.graph
    names = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            names.add(vi.name)
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    names.add(node.output[0])
    return names


def _typed_tensors(model: onnx.ModelProto) -> set[str]:
    g = model.graph
    names = {i.name for i in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type != TensorProto.UNDEFINED:
            names.add(vi.name)
    return names


def convert_fp16(model: onnx.ModelProto, block_ops: Iterable[str] = (),
                 block_nodes: Iterable[str] = ()) -> onnx.ModelProto:
    """Return a mixed-precision copy of ``model`` (inputs/outputs keep their types).

    ``block_ops``/``block_nodes`` keep more op types / named nodes in fp32.
    """
    model = onnx.inliner.inline_local_functions(model)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    g = model.graph
    floats = _float_tensors(model)
    typed = _typed_tensors(model)
    blocked_ops = FP32_ALWAYS | set(block_ops)
    blocked_nodes = set(block_nodes)
    inits = {i.name: i for i in g.initializer}
    new_inits: dict[str, TensorProto] = {}
    new_nodes: list[onnx.NodeProto] = []
    converted = 0

    for node in g.node:
        float_io = [t for t in list(node.input) + list(node.output) if t in floats]
        ok = (node.op_type in FP16_OPS and node.op_type not in blocked_ops
              and node.name not in blocked_nodes and node.domain in ("", "ai.onnx")
              and float_io
              # Every tensor the node touches must have a known type, or we could
              # mistake an untyped float for a non-float and leave it fp32.
              and all(t in typed or t == "" for t in list(node.input) + list(node.output)))
        if node.op_type == "Gather" and ok:
            ok = node.input[0] in inits  # embedding tables only; indices stay int
        if not ok:
            new_nodes.append(node)
            continue
        converted += 1
        ins = []
        for t in node.input:
            if t not in floats:
                ins.append(t)
            elif t in inits:
                name = f"{t}__fp16"
                if name not in new_inits:
                    arr = numpy_helper.to_array(inits[t])
                    new_inits[name] = numpy_helper.from_array(
                        np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), name)
                ins.append(name)
            else:
                cast_out = f"{t}__to_fp16__{node.name or converted}"
                new_nodes.append(helper.make_node("Cast", [t], [cast_out], to=TensorProto.FLOAT16,
                                                  name=f"{cast_out}__cast"))
                ins.append(cast_out)
        outs = []
        post = []
        for t in node.output:
            if t in floats:
                half = f"{t}__fp16"
                outs.append(half)
                post.append(helper.make_node("Cast", [half], [t], to=TensorProto.FLOAT,
                                             name=f"{t}__to_fp32__cast"))
            else:
                outs.append(t)
        clone = onnx.NodeProto()
        clone.CopyFrom(node)
        del clone.input[:]
        clone.input.extend(ins)
        del clone.output[:]
        clone.output.extend(outs)
        new_nodes.append(clone)
        new_nodes.extend(post)

    del g.node[:]
    g.node.extend(_fold_cast_pairs(new_nodes, {o.name for o in g.output}))
    g.initializer.extend(new_inits.values())
    _drop_unused_initializers(g)
    # Stale fp32 value_info would contradict the rewritten graph; let ORT/checker re-infer.
    del g.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    log.info("fp16 plan: %d of %d nodes converted", converted, len(list(g.node)))
    return model


def _fold_cast_pairs(nodes: list[onnx.NodeProto], graph_outputs: set[str]) -> list[onnx.NodeProto]:
    """Drop ``Cast→fp16`` nodes whose input came from a ``Cast→fp32`` of an fp16 tensor."""
    to_fp32_src = {n.output[0]: n.input[0] for n in nodes
                   if n.op_type == "Cast" and n.name.endswith("__to_fp32__cast")}
    rename: dict[str, str] = {}
    kept = []
    for n in nodes:
        if (n.op_type == "Cast" and n.name.endswith("__cast") and "__to_fp16__" in n.output[0]
                and n.input[0] in to_fp32_src):
            rename[n.output[0]] = to_fp32_src[n.input[0]]
            continue
        kept.append(n)
    for n in kept:
        for i, t in enumerate(n.input):
            if t in rename:
                n.input[i] = rename[t]
    # Back-casts nobody reads any more (their fp32 consumers were all fp16 islands).
    used = {t for n in kept for t in n.input} | graph_outputs
    return [n for n in kept if not (n.name.endswith("__to_fp32__cast") and n.output[0] not in used)]


def _drop_unused_initializers(g: onnx.GraphProto) -> None:
    used = {t for n in g.node for t in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)


# --------------------------------------------------------------------------- int8

class FeedCalibrationReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over prepared feed batches."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]]):
        self._batches = list(batches)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        """Strided calibration: the next pass reads batches [start_index, end_index)."""
        self._it = iter(self._batches[start_index:end_index])


def calibration_sha256(batches: Iterable[dict[str, np.ndarray]]) -> str:
    """A content hash of the calibration set (names, dtypes, shapes, bytes), recorded in engine metadata."""
    h = hashlib.sha256()
    for batch in batches:
        for name in sorted(batch):
            arr = np.ascontiguousarray(batch[name])
            h.update(f"{name}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()


def quantize_int8(model_path: Path, out_path: Path, batches: list[dict[str, np.ndarray]],
                  method: str = "minmax") -> Path:
    """Write an int8 Q/DQ model of ``model_path`` calibrated on ``batches``; return ``out_path``.

    Only weight MatMul/Gemm are quantized (weights per channel, see
    ``_int8_excluded_nodes`` for the ones kept fp32); embeddings, LayerNorm,
    Softmax and the heads' sigmoid stay fp32.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise PrecisionError(f"calibration method {method!r} unknown; use one of {CALIBRATION_METHODS}")
    if not batches:
        raise PrecisionError("int8 calibration needs at least one batch of real timelines; "
                             "build timelines first (medscreen emr features --as-of D)")
    cal = {"entropy": CalibrationMethod.Entropy, "minmax": CalibrationMethod.MinMax,
           "percentile": CalibrationMethod.Percentile}[method]
    out_path = Path(out_path)
    exclude = _int8_excluded_nodes(onnx.load(str(model_path)))
    # ORT's calibrators print progress to stdout; CLI commands keep stdout for their result.
    with tempfile.TemporaryDirectory(prefix="medscreen-int8-") as tmp, \
            contextlib.redirect_stdout(sys.stderr):
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out_path), FeedCalibrationReader(batches),
                        quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
                        calibrate_method=cal,
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                       # Batches differ in seq length (length-bucketed like
                                       # scoring). Collecting one batch per stride lets the
                                       # histogram collectors merge them (they cannot stack
                                       # ragged batches) and bounds memory to one batch.
                                       "CalibStridedMinMax": 1,
                                       "CalibMovingAverage": False,
                                       "CalibTensorRangeSymmetric": True,
                                       # TensorRT dequantizes int8/fp8 only; int32 biases
                                       # would make the plan unbuildable there.
                                       "QuantizeBias": False})
    onnx.checker.check_model(str(out_path), full_check=True)
    return out_path


def _int8_excluded_nodes(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes that stay fp32 in the int8 plan.

    Activation × activation products (attention scores, attention × values)
    quantize badly (softmax outputs and keys share one per-tensor scale), and
    the tiny projections (time/age features in, the three heads out) cost
    nothing in fp32 but sit right at the model's inputs and outputs.
    """
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        weight = inits.get(n.input[1]) if len(n.input) > 1 else None
        if weight is None or min(weight.dims, default=0) < 16:
            out.append(n.name)
    return out


# --------------------------------------------------------------------------- plans

def make_plan(onnx_path: Path, out_path: Path, precision: str,
              calibration: list[dict[str, np.ndarray]] | None = None,
              method: str = "minmax") -> Path:
    """Write the ``precision`` variant of ``onnx_path`` to ``out_path`` (fp32 is a verified copy)."""
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if precision not in PRECISIONS:
        raise PrecisionError(f"precision {precision!r} unknown; use one of {PRECISIONS}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if precision == "fp32":
        out_path.write_bytes(onnx_path.read_bytes())
    elif precision == "fp16":
        onnx.save_model(convert_fp16(onnx.load(str(onnx_path))), str(out_path),
                        save_as_external_data=False)
    else:
        quantize_int8(onnx_path, out_path, calibration or [], method)
    return out_path


def check_loads(onnx_path: Path, out_path: Path) -> Path:
    """Copy a graph whose precision was fixed at export (a fused graph) to ``out_path``,
    after checking it and that ONNX Runtime builds a session for it (CPU EP: every
    contrib op it uses must exist in this onnxruntime)."""
    import onnxruntime as ort

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    onnx.checker.check_model(str(onnx_path))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(onnx_path.read_bytes())
    return out_path
