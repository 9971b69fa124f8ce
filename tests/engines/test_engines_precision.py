"""Precision plans: the fp16 rewrite is a valid graph that keeps I/O and sensitive ops in fp32; int8 is real Q/DQ."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from engines import precision, samples
from engines.model_card import load_card
from engines.ort_runner import OrtRunner

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)


@pytest.fixture(scope="module")
def card(engines_settings, tmp_path_factory):
    return load_card(engines_settings(tmp_path_factory.mktemp("c")), "emr_risk")


@pytest.fixture(scope="module")
def feed(engines_lake):
    table = samples.read_timelines(engines_lake, AS_OF)
    return samples.to_feed(table.slice(0, 64), 256)


def test_fp16_plan_is_valid_mixed_precision_with_fp32_io(card, tmp_path, feed):
    out = precision.make_plan(Path(card["onnx"]["file"]), tmp_path / "fp16.onnx", "fp16")
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    io_types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert io_types == {"tokens": TensorProto.INT64, "days_before": TensorProto.FLOAT,
                        "age_years": TensorProto.FLOAT, "sex": TensorProto.INT64, "probs": TensorProto.FLOAT}
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    sensitive = [n for n in model.graph.node if n.op_type in ("LayerNormalization", "Softmax", "Sigmoid")]
    assert sensitive and all(types.get(n.input[0]) == TensorProto.FLOAT for n in sensitive)
    matmuls = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm")]
    assert matmuls and all(types.get(n.input[0]) == TensorProto.FLOAT16 for n in matmuls)
    with OrtRunner(Path(card["onnx"]["file"])) as ref, OrtRunner(out, fp16_plan=True) as half:
        a, b = ref.infer(feed)["probs"], half.infer(feed)["probs"]
    assert b.dtype == np.float32 and b.shape == a.shape
    assert np.max(np.abs(a - b)) < 0.02


def test_int8_plan_has_qdq_and_stays_close(card, tmp_path, feed, engines_lake):
    table = samples.stratified_sample(samples.read_timelines(engines_lake, AS_OF), 128, half=0)
    batches = [f for _, f in samples.feed_batches(table, 256, 32)]
    out = precision.make_plan(Path(card["onnx"]["file"]), tmp_path / "int8.onnx", "int8",
                              batches, "minmax")
    ops = [n.op_type for n in onnx.load(str(out)).graph.node]
    assert ops.count("QuantizeLinear") > 5 and ops.count("DequantizeLinear") > 5
    with OrtRunner(Path(card["onnx"]["file"])) as ref, OrtRunner(out) as q:
        assert np.max(np.abs(ref.infer(feed)["probs"] - q.infer(feed)["probs"])) < 0.15


def test_calibration_hash_tracks_content(feed):
    same = precision.calibration_sha256([feed])
    assert same == precision.calibration_sha256([{k: v.copy() for k, v in feed.items()}])
    changed = dict(feed, age_years=feed["age_years"] + 1)
    assert precision.calibration_sha256([changed]) != same


def test_unknown_precision_and_empty_calibration_are_refused(card, tmp_path):
    with pytest.raises(precision.PrecisionError, match="precision 'bf8'"):
        precision.make_plan(Path(card["onnx"]["file"]), tmp_path / "x.onnx", "bf8")
    with pytest.raises(precision.PrecisionError, match="at least one batch"):
        precision.make_plan(Path(card["onnx"]["file"]), tmp_path / "x.onnx", "int8", [])


def test_stratified_sample_covers_strata_and_halves_are_disjoint(engines_lake):
    table = samples.read_timelines(engines_lake, AS_OF)
    a = samples.stratified_sample(table, 100, half=0)
    b = samples.stratified_sample(table, 100, half=1)
    assert a.num_rows == 100 and b.num_rows == 100
    assert not set(a.column("patient_key").to_pylist()) & set(b.column("patient_key").to_pylist())
    assert set(a.column("sex").to_pylist()) == {"F", "M", "U"}
    lengths = np.array(a.column("length").to_pylist())
    assert lengths.min() <= 5 and lengths.max() >= 60  # short and long timelines both sampled


def test_to_feed_pads_and_keeps_most_recent():
    import pyarrow as pa

    t = pa.table({"tokens": [[5, 6, 7], []], "days_before": [[30, 20, 1], []],
                  "age_years": pa.array([50.0, None], pa.float32()), "sex": ["F", None],
                  "length": [3, 0]})
    f = samples.to_feed(t, max_tokens=2)
    assert f["tokens"].tolist() == [[6, 7], [0, 0]]
    assert f["days_before"].tolist() == [[20.0, 1.0], [0.0, 0.0]]
    assert f["sex"].tolist() == [1, 0] and f["age_years"].tolist() == [50.0, 0.0]


def test_fp16_plan_of_the_ct_unet_runs_its_convolutions_in_fp16(tmp_path):
    """The U-Net's work is convolutions: an fp16 plan that left them fp32 would be fp32 in disguise."""
    src = Path(__file__).resolve().parents[2] / "models" / "ct_nodule" / "ct_nodule.onnx"
    plan = onnx.load(str(precision.make_plan(src, tmp_path / "ct16.onnx", "fp16")))
    assert {i.data_type for i in plan.graph.initializer} == {TensorProto.FLOAT16}
    io = [*plan.graph.input, *plan.graph.output]
    assert {v.type.tensor_type.elem_type for v in io} == {TensorProto.FLOAT}
    casts = [n for n in plan.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # in at the input, out before the fp32 sigmoid
    x = np.random.default_rng(0).random((1, 1, 64, 128, 128), dtype=np.float32)
    ref = OrtRunner(src, providers=["CPUExecutionProvider"])
    cand = OrtRunner(tmp_path / "ct16.onnx", providers=["CPUExecutionProvider"], fp16_plan=True)
    ref.activate()
    cand.activate()
    name = ref.input_specs[0].name
    a, b = ref.infer({name: x}), cand.infer({name: x})
    out = ref.output_specs[0].name
    assert np.max(np.abs(a[out] - b[out])) < 0.02


def test_committed_models_carry_no_build_machine_metadata():
    """The exporter's stack traces name the build machine's source paths; committed artifacts drop them."""
    root = Path(__file__).resolve().parents[2] / "models"
    for path in (root / "emr_risk" / "emr_risk.onnx", root / "ct_nodule" / "ct_nodule.onnx"):
        model = onnx.load(str(path))
        assert not any(n.metadata_props or n.doc_string for n in model.graph.node), path
        assert b'File "/' not in path.read_bytes(), path
