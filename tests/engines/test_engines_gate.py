"""The accuracy gate: fp16 and int8 candidates against the fp32 reference; a broken candidate is refused."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from engines import cache, gate
from engines.ort_runner import OrtRunner

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)


def test_auc_and_brier_known_answers():
    y = np.array([0, 0, 1, 1])
    assert gate.roc_auc(y, np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert gate.roc_auc(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.5)
    assert np.isnan(gate.roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))
    assert gate.brier(y, np.array([0.0, 0.0, 1.0, 0.5])) == pytest.approx(0.0625)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_gate_passes_lower_precision_and_records_verdict(engines_settings, shared_cache, precision):
    settings = engines_settings(shared_cache)
    path = cache.ensure(settings, precision=precision, as_of=AS_OF)
    meta = cache.read_metadata(path)
    verdict = meta["gate"]
    assert verdict["passed"] is True, verdict["failures"]
    assert verdict["as_of"] == AS_OF and verdict["metrics"]["rows"] >= 200
    heads = verdict["metrics"]["heads"]
    assert set(heads) == {"t2d", "ckd", "hf"}
    # The fixture's labels follow the reference model, so its AUC is well above chance.
    assert heads["t2d"]["auc_reference"] > 0.7
    assert verdict["thresholds"]["max_abs_delta_auc"] == (
        settings.engines.gate.fp16_max_abs_delta_auc if precision == "fp16"
        else settings.engines.gate.int8_max_abs_delta_auc)
    if precision == "int8":
        assert meta["calibration"]["rows"] == 200 and len(meta["calibration"]["sha256"]) == 64
        # The configured default calibration is the one that passed (conf/defaults.yaml says why).
        assert meta["calibration"]["method"] == settings.engines.calibration_method == "minmax"
    runner, loaded = cache.load_runner(settings, precision=precision)
    assert loaded["fingerprint"] == meta["fingerprint"]


def test_gate_thresholds_come_from_settings(engines_settings, tmp_path, monkeypatch):
    settings = engines_settings(tmp_path)
    limits = {p: gate.thresholds_for(settings, p) for p in ("fp32", "fp16", "int8")}
    assert [(t.max_abs_delta_auc, t.max_abs_delta_brier, t.max_abs_delta_p, t.max_p99_abs_delta_p)
            for t in limits.values()] == [(0.001, 0.001, 0.005, None), (0.005, 0.002, 0.02, None),
                                          (0.01, 0.005, None, 0.05)]
    # A calibrated reference and a candidate 0.01 above it everywhere: same ranking, p99 |Δp| = 0.01.
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.05, 0.9, (400, 3)).astype(np.float32)
    y = (rng.random((400, 3)) < ref).astype(np.int8)
    assert gate.compare(ref, ref + 0.01, y, limits["int8"])["passed"]
    monkeypatch.setenv("MEDSCREEN_ENGINES__GATE__INT8_MAX_P99_ABS_DELTA_P", "0.005")
    strict = gate.thresholds_for(engines_settings(tmp_path), "int8")
    verdict = gate.compare(ref, ref + 0.01, y, strict)
    assert not verdict["passed"] and verdict["thresholds"]["max_p99_abs_delta_p"] == 0.005
    assert [f.split(":")[1].split()[:2] for f in verdict["failures"]] == [["p99", "|Δp|"]] * 3


def _broken_copy(src: Path, dst: Path) -> None:
    """The same graph with the heads' weights negated: valid ONNX, inverted risk ranking."""
    model = onnx.load(str(src))
    for init in model.graph.initializer:
        if init.name.startswith("heads."):
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(dst))


def test_gate_refuses_broken_candidate(engines_settings, tmp_path):
    settings = engines_settings(tmp_path / "cache")
    path = cache.build(settings, precision="fp16")
    # Swap a broken plan in under the same metadata, re-sealing its sha so only the gate can object.
    _broken_copy(path, path)
    meta = cache.read_metadata(path)
    meta["plan_sha256"] = cache.file_sha256(path)
    cache._write_json_atomic(cache.metadata_path(path), meta)
    verdict = cache.gate_plan(settings, path, AS_OF)
    assert verdict["passed"] is False
    assert any("ΔAUC" in f for f in verdict["failures"])
    assert any("max |Δp|" in f for f in verdict["failures"])
    with pytest.raises(cache.UngatedEngineError, match="failed its accuracy gate"):
        cache.load_runner(settings, precision="fp16")
    runner, meta = cache.load_runner(settings, precision="fp16", force_ungated=True)
    assert meta["gate"]["passed"] is False


def test_gate_needs_labelled_sample(engines_settings, tmp_path):
    settings = engines_settings(tmp_path / "cache", **{"lake.root": str(tmp_path / "empty")})
    path = cache.build(settings, precision="fp16")
    with pytest.raises(ValueError, match="--with-labels"):
        cache.gate_plan(settings, path)


def test_comparator_flags_nan_outputs():
    y = np.array([[0, 1, 0], [1, 0, 1]] * 100)
    ref = np.where(y == 1, 0.8, 0.2).astype(np.float32)
    cand = ref.copy()
    cand[3, 1] = np.nan
    verdict = gate.compare(ref, cand, y, gate.GateThresholds(0.01, 0.01, 0.05, 10))
    assert not verdict["passed"] and any(f.startswith("ckd") for f in verdict["failures"])


def test_fp32_reference_gate_passes_without_lake(engines_settings, tmp_path):
    settings = engines_settings(tmp_path / "cache", **{"lake.root": str(tmp_path / "empty")})
    path = cache.ensure(settings)
    meta = cache.read_metadata(path)
    assert meta["gate"]["passed"] is True and meta["gate"]["reference"] is True
    runner, _ = cache.load_runner(settings)
    with runner:
        feed = {"tokens": np.array([[3, 4, 0]]), "days_before": np.array([[3.0, 1.0, 0.0]], np.float32),
                "age_years": np.array([61.0], np.float32), "sex": np.array([2])}
        probs = runner.infer(feed)["probs"]
    assert probs.shape == (1, 3) and np.all((probs > 0) & (probs < 1))
    shutil.rmtree(tmp_path / "cache")


def test_segmentation_model_gate_uses_dice(engines_settings, tmp_path):
    """ct_nodule (task: segmentation): fp16 judged by ΔDice on planted spheres; int8 refused clearly."""
    settings = engines_settings(tmp_path / "cache")
    path = cache.ensure(settings, model="ct_nodule", precision="fp16")
    verdict = cache.read_metadata(path)["gate"]
    assert verdict["passed"] is True, verdict["failures"]
    assert verdict["metrics"]["dice_reference"] > 0.5  # the planted spheres are findable
    assert verdict["thresholds"]["max_abs_delta_dice"] == 0.01
    with pytest.raises(ValueError, match="int8 calibration for 'ct_nodule'"):
        cache.ensure(settings, model="ct_nodule", precision="int8")
