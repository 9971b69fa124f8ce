"""TensorRT: a real TensorRT-RTX plan built ahead-of-time on this CPU machine; refusal paths; GPU execution (gpu mark)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engines import cache, hardware
from engines.trt_builder import TensorRTUnavailable, import_tensorrt
from engines.trt_runner import NoCompatibleGPU, TrtRunner, execution_blocker

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)


@pytest.fixture(scope="module")
def trt_plan(engines_settings, tmp_path_factory):
    settings = engines_settings(tmp_path_factory.mktemp("trt-cache"))
    return settings, cache.build(settings, backend="tensorrt", precision="fp16")


def test_plan_metadata(trt_plan):
    settings, path = trt_plan
    meta = cache.read_metadata(path)
    assert path.suffix == ".plan" and path.stat().st_size == meta["plan_bytes"] > 10_000
    assert meta["backend"] == "tensorrt" and meta["backend_module"] in ("tensorrt", "tensorrt_rtx")
    assert meta["precision"] == "fp16" and meta["plan_sha256"] == cache.file_sha256(path)
    assert meta["platform"]["id"] == hardware.platform_for("tensorrt")["id"]
    assert meta["profiles"]["seq"]["max"] >= meta["profiles"]["seq"]["opt"] >= 1
    io = {t["name"]: t for t in meta["io"]}
    assert io["tokens"]["dtype"].endswith("INT64") and io["probs"]["mode"] == "output"
    assert meta["gate"]["passed"] is None
    assert cache.verify(path, settings) == []


def test_flipped_bytes_are_never_deserialised(trt_plan, tmp_path):
    settings, path = trt_plan
    bad = tmp_path / path.name
    data = bytearray(path.read_bytes())
    data[100:116] = bytes(b ^ 0x5A for b in data[100:116])
    bad.write_bytes(bytes(data))
    cache.metadata_path(bad).write_text(cache.metadata_path(path).read_text())
    problems = cache.verify(bad, settings)
    assert any("sha256 mismatch" in p for p in problems)


def test_platform_mismatch_refused(trt_plan, tmp_path):
    settings, path = trt_plan
    other = tmp_path / path.name
    other.write_bytes(path.read_bytes())
    meta = json.loads(cache.metadata_path(path).read_text())
    meta["platform"] = {"kind": "gpu", "gpu": "NVIDIA GeForce RTX 4090", "id": "NVIDIA GeForce RTX 4090 sm89"}
    cache.metadata_path(other).write_text(json.dumps(meta))
    assert any("platform mismatch" in p for p in cache.verify(other, settings))


def test_ungated_trt_engine_refused_for_scoring(trt_plan):
    settings, _ = trt_plan
    with pytest.raises(cache.UngatedEngineError, match="has not been gated"):
        cache.load_runner(settings, backend="tensorrt", precision="fp16")


def test_runtime_runs_or_refuses_with_the_reason(trt_plan):
    """Where the plan cannot execute, activate() refuses naming why; where it can, it runs for real."""
    settings, path = trt_plan
    meta = cache.read_metadata(path)
    blocker = execution_blocker(meta["backend_module"])
    runner = TrtRunner(path, meta["backend_module"])
    if blocker is not None:
        with pytest.raises(NoCompatibleGPU, match="cannot run"):
            runner.activate()
        return
    # A GPU this plan runs on: the ungated plan still executes, and agrees with the fp32 reference.
    feed = {"tokens": np.array([[3, 4, 0], [5, 0, 0]]), "days_before": np.ones((2, 3), np.float32),
            "age_years": np.array([61.0, 40.0], np.float32), "sex": np.array([2, 1])}
    with runner, cache.reference_runner(settings) as reference:
        assert np.max(np.abs(runner.infer(feed)["probs"] - reference.infer(feed)["probs"])) < 0.02


def _trt_execution_blocker() -> str | None:
    """Why no TensorRT plan built here can execute on this machine (None: one can)."""
    try:
        module = import_tensorrt().__name__
    except TensorRTUnavailable as exc:
        return str(exc)
    return execution_blocker(module)


@pytest.mark.gpu
def test_trt_matches_onnxruntime_on_gpu(engines_settings, tmp_path):
    """GPU machine: build, gate and run the TensorRT fp16 engine; it must agree with the fp32 reference."""
    blocker = _trt_execution_blocker()
    if blocker is not None:  # e.g. an H100/H200 with only TensorRT-RTX installed
        pytest.skip(f"TensorRT cannot execute here: {blocker}")
    settings = engines_settings(tmp_path / "cache")
    path = cache.ensure(settings, backend="tensorrt", precision="fp16", as_of=AS_OF)
    assert cache.read_metadata(path)["gate"]["passed"] is True
    runner, _ = cache.load_runner(settings, backend="tensorrt", precision="fp16")
    reference = cache.reference_runner(settings)
    feed = {"tokens": np.array([[3, 4, 0], [5, 0, 0]]), "days_before": np.ones((2, 3), np.float32),
            "age_years": np.array([61.0, 40.0], np.float32), "sex": np.array([2, 1])}
    with runner, reference:
        assert np.max(np.abs(runner.infer(feed)["probs"] - reference.infer(feed)["probs"])) < 0.02


@pytest.mark.gpu
def test_ort_cuda_ep_with_io_binding_matches_cpu(engines_settings, tmp_path):
    """GPU machine with onnxruntime-gpu: the CUDA EP (I/O binding) agrees with the CPU EP."""
    from pathlib import Path

    from engines.model_card import load_card
    from engines.ort_runner import OrtRunner

    card = load_card(engines_settings(tmp_path), "emr_risk")
    feed = {"tokens": np.array([[3, 4, 0], [5, 0, 0]]), "days_before": np.ones((2, 3), np.float32),
            "age_years": np.array([61.0, 40.0], np.float32), "sex": np.array([2, 1])}
    with OrtRunner(Path(card["onnx"]["file"]), providers=["CUDAExecutionProvider"]) as gpu, \
            OrtRunner(Path(card["onnx"]["file"]), providers=["CPUExecutionProvider"]) as cpu:
        assert gpu.active_providers[0] == "CUDAExecutionProvider"
        assert np.max(np.abs(gpu.infer(feed)["probs"] - cpu.infer(feed)["probs"])) < 1e-3
