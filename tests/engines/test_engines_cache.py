"""Engine cache: keys track every component; corrupted or foreign plans are never loaded."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from engines import cache, hardware
from engines.model_card import ModelCardError, load_card
from engines.ort_runner import OrtRunner


def test_cache_key_changes_with_every_component(engines_settings, tmp_path):
    base = cache.resolve(engines_settings(tmp_path)).components
    key = cache.cache_key(base)
    assert cache.cache_key(dict(base)) == key
    variants = {"onnx_sha256": "0" * 64, "backend": "tensorrt", "backend_version": "0.0.1",
                "backend_module": "tensorrt", "platform": "NVIDIA H100 80GB HBM3 sm90",
                "precision": "fp16", "profiles": {**base["profiles"], "seq": {"min": 1, "opt": 32, "max": 256}},
                "model": "other"}
    keys = {name: cache.cache_key({**base, name: value}) for name, value in variants.items()}
    assert key not in keys.values() and len(set(keys.values())) == len(keys)


def test_resolve_reflects_settings(engines_settings, tmp_path):
    s = engines_settings(tmp_path)
    a = cache.resolve(s, precision="int8")
    b = cache.resolve(engines_settings(tmp_path, **{"engines.calibration_method": "entropy"}), precision="int8")
    assert a.key != b.key and a.plan_path != b.plan_path
    assert a.plan_path.parent == tmp_path / "emr_risk"
    assert cache.resolve(s).components["platform"] == hardware.platform_for("onnxruntime")["id"]


def _fresh_fp32(engines_settings, tmp_path):
    settings = engines_settings(tmp_path / "cache")
    return settings, cache.ensure(settings)


def test_corrupted_plan_is_refused_then_rebuilt(engines_settings, tmp_path):
    settings, path = _fresh_fp32(engines_settings, tmp_path)
    assert cache.verify(path, settings) == []
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = cache.verify(path, settings)
    assert len(problems) == 1 and "sha256 mismatch" in problems[0]
    with pytest.raises(cache.EngineCacheError, match="sha256 mismatch"):
        cache.load_runner(settings)
    with pytest.raises(cache.EngineCacheError, match="--rebuild"):
        cache.ensure(settings)
    assert cache.ensure(settings, rebuild=True) == path
    assert cache.verify(path, settings) == []
    runner, meta = cache.load_runner(settings)
    assert meta["plan_sha256"] == cache.file_sha256(path)


def test_platform_and_backend_version_mismatch_refused(engines_settings, tmp_path):
    settings, path = _fresh_fp32(engines_settings, tmp_path)
    meta_file = cache.metadata_path(path)
    meta = json.loads(meta_file.read_text())
    meta["platform"] = {"kind": "gpu", "id": "NVIDIA H100 80GB HBM3 sm90"}
    meta_file.write_text(json.dumps(meta))
    assert any("platform mismatch" in p for p in cache.verify(path, settings))
    with pytest.raises(cache.EngineCacheError, match="platform mismatch"):
        cache.load_runner(settings)
    meta["platform"] = {"kind": "cpu", "id": "cpu"}
    meta["backend_version"] = "0.0.1"
    meta_file.write_text(json.dumps(meta))
    assert any("backend mismatch" in p for p in cache.verify(path, settings))


def test_missing_engine_names_the_command(engines_settings, tmp_path):
    with pytest.raises(cache.EngineCacheError, match="medscreen engines ensure --model emr_risk "
                                                     "--backend onnxruntime --precision fp16"):
        cache.load_runner(engines_settings(tmp_path), precision="fp16")


def test_card_with_wrong_sha_is_refused(engines_settings, tmp_path):
    settings = engines_settings(tmp_path)
    card = load_card(settings, "emr_risk")
    raw = yaml.safe_load(Path(card["card_file"]).read_text())
    raw["onnx"]["sha256"] = "f" * 64
    raw["onnx"]["path"] = card["onnx"]["file"]
    bad = tmp_path / "emr_risk.yaml"
    bad.write_text(yaml.safe_dump(raw))
    settings = engines_settings(tmp_path, models={"emr_risk": str(bad)})
    with pytest.raises(ModelCardError, match="re-export"):
        load_card(settings, "emr_risk")
    with pytest.raises(ModelCardError, match="no card"):
        load_card(settings, "nope")


def test_ort_runner_checks_feeds(engines_settings, tmp_path):
    card = load_card(engines_settings(tmp_path), "emr_risk")
    with OrtRunner(Path(card["onnx"]["file"])) as r:
        names = [s.name for s in r.input_specs]
        assert names == ["tokens", "days_before", "age_years", "sex"]
        assert [(s.name, s.dtype) for s in r.output_specs] == [("probs", "float32")]
        feed = {"tokens": np.array([[1, 2]], np.int32), "days_before": np.zeros((1, 2), np.float32),
                "age_years": np.array([40.0], np.float32), "sex": np.array([1], np.int32)}
        assert r.infer(feed)["probs"].shape == (1, 3)  # int32 widened to the contract's int64
        with pytest.raises(ValueError, match="lacks inputs \\['sex'\\]"):
            r.infer({k: v for k, v in feed.items() if k != "sex"})
        with pytest.raises(ValueError, match="'tokens' has dtype float32"):
            r.infer({**feed, "tokens": feed["tokens"].astype(np.float32)})
    with pytest.raises(RuntimeError, match="not active"):
        r.infer(feed)


def test_loading_an_engine_imports_no_gate_or_calibration_code(engines_settings, tmp_path):
    """What a scoring actor does at start-up; scipy.stats alone cost ~0.6 s of it before."""
    import subprocess
    import sys

    settings = engines_settings(tmp_path)
    cache.ensure(settings, precision="fp32")
    probe = (
        "import sys\n"
        "from conf.settings import load_settings\n"
        "from engines import cache\n"
        f"settings = load_settings({{'lake.root': {str(settings.lake.root)!r}, "
        f"'engines.cache_dir': {str(tmp_path)!r}}})\n"
        "runner, meta = cache.load_runner(settings, precision='fp32')\n"
        "runner.activate()\n"
        "assert meta['gate']['passed'] is True\n"
        "print(sorted(m for m in ('scipy', 'onnx', 'engines.gate', 'engines.precision', 'engines.samples')"
        " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
