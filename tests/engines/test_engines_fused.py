"""The fused emr_risk graph (ORT contrib attention, SkipLayerNorm, BiasGelu): same answers, its own cache
entries, gated like any plan, chosen on GPUs, refused when its artefact changes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from engines import cache, gate as gate_mod, samples
from engines.model_card import ModelCardError, load_card
from engines.ort_runner import OrtRunner

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)


def _lake_batches(settings, rows: int = 300):
    _, table = samples.holdout_sample(settings, AS_OF, rows)
    return table, samples.feed_batches(table, settings.features.max_tokens)


@pytest.mark.parametrize("precision, limit", [("fp32", 1e-5), ("fp16", 5e-3)])
def test_committed_fused_graph_scores_like_the_reference_export(engines_settings, tmp_path, precision, limit):
    """The committed fused graphs answer as the reference export does on real lake timelines."""
    settings = engines_settings(tmp_path)
    card = load_card(settings)
    fused = Path(card["fused_onnx"]["graphs"][precision]["file"])
    table, batches = _lake_batches(settings)
    with OrtRunner(Path(card["onnx"]["file"]), providers=["CPUExecutionProvider"]) as ref, \
            OrtRunner(fused, providers=["CPUExecutionProvider"]) as got:
        a = gate_mod.run_batches(ref, batches, table.num_rows)
        b = gate_mod.run_batches(got, batches, table.num_rows)
    assert a.shape == b.shape == (table.num_rows, 3)
    assert float(np.max(np.abs(a - b))) < limit
    # Not trivially equal: the fused graph really is another graph.
    assert "com.microsoft" in {n.domain for n in onnx.load(str(fused)).graph.node}


def test_graph_choice(engines_settings, tmp_path):
    settings = engines_settings(tmp_path)
    card = load_card(settings)
    gpu = "NVIDIA H200 sm90"
    assert cache.graph_for(settings, card, "onnxruntime", "fp16", gpu) == "fused"
    assert cache.graph_for(settings, card, "onnxruntime", "fp32", gpu) == "fused"
    assert cache.graph_for(settings, card, "onnxruntime", "fp32", "cpu") == "reference"
    # TensorRT's parser has no contrib ops and int8 is quantized from the reference export.
    assert cache.graph_for(settings, card, "tensorrt", "fp16", gpu) == "reference"
    assert cache.graph_for(settings, card, "onnxruntime", "int8", gpu) == "reference"
    forced = engines_settings(tmp_path, **{"engines.graph": "fused"})
    assert cache.graph_for(forced, card, "onnxruntime", "fp32", "cpu") == "fused"
    with pytest.raises(cache.EngineCacheError, match="no fused int8 graph"):
        cache.graph_for(forced, card, "onnxruntime", "int8", "cpu")
    never = engines_settings(tmp_path, **{"engines.graph": "reference"})
    assert cache.graph_for(never, card, "onnxruntime", "fp16", gpu) == "reference"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_fused_engine_is_built_gated_and_loaded(engines_settings, tmp_path, precision):
    settings = engines_settings(tmp_path / "cache", **{"engines.graph": "fused"})
    reference_spec = cache.resolve(settings, precision=precision, graph="reference")
    path = cache.ensure(settings, precision=precision, as_of=AS_OF)
    assert path != reference_spec.plan_path and "fused" in path.name
    meta = cache.read_metadata(path)
    card = load_card(settings)
    assert meta["graph"] == "fused"
    assert meta["onnx_sha256"] == card["fused_onnx"]["graphs"][precision]["sha256"]
    assert meta["reference_onnx_sha256"] == card["onnx"]["sha256"]
    # Gated for real against the reference export (never passed "by definition").
    assert meta["gate"]["passed"] is True and meta["gate"]["reference"] == "onnxruntime-fp32-reference"
    assert meta["gate"]["candidate"].startswith(f"onnxruntime-fused-{precision}:")
    assert set(meta["gate"]["metrics"]["heads"]) == {"t2d", "ckd", "hf"}
    assert meta["gate"]["metrics"]["max_abs_delta_p"] < (1e-5 if precision == "fp32" else 5e-3)
    runner, loaded = cache.load_runner(settings, precision=precision)
    assert loaded["fingerprint"] == meta["fingerprint"] and "fused" in runner.name
    table, batches = _lake_batches(settings, 100)
    with runner, cache.reference_runner(settings) as ref:
        got = gate_mod.run_batches(runner, batches, table.num_rows)
        want = gate_mod.run_batches(ref, batches, table.num_rows)
    assert float(np.max(np.abs(got - want))) < (1e-5 if precision == "fp32" else 5e-3)


def test_fused_engine_refused_when_its_graph_changes(engines_settings, tmp_path):
    settings = engines_settings(tmp_path / "cache", **{"engines.graph": "fused"})
    path = cache.build(settings, precision="fp32")
    card = load_card(settings)
    raw = yaml.safe_load(Path(card["card_file"]).read_text())
    raw["onnx"]["path"] = card["onnx"]["file"]
    raw["torch"]["state_dict"] = str(Path(card["card_file"]).parents[2] / raw["torch"]["state_dict"])
    # Another fused fp32 artefact (here: the fp16 one's bytes under the fp32 name).
    other = tmp_path / "other-fused.onnx"
    other.write_bytes(Path(card["fused_onnx"]["graphs"]["fp16"]["file"]).read_bytes())
    raw["fused_onnx"]["graphs"]["fp32"] = {**raw["fused_onnx"]["graphs"]["fp16"], "path": str(other)}
    raw["fused_onnx"]["graphs"]["fp16"]["path"] = card["fused_onnx"]["graphs"]["fp16"]["file"]
    changed = tmp_path / "emr_risk.yaml"
    changed.write_text(yaml.safe_dump(raw))
    moved = engines_settings(tmp_path / "cache", **{"engines.graph": "fused"}, models={"emr_risk": str(changed)})
    assert any("stale" in p and "fused" in p for p in cache.verify(path, moved))
    # A card whose fused file does not match its recorded sha256 is refused outright.
    raw["fused_onnx"]["graphs"]["fp32"]["sha256"] = "0" * 64
    changed.write_text(yaml.safe_dump(raw))
    with pytest.raises(ModelCardError, match="export_fused"):
        load_card(moved)


def test_load_takes_the_plan_ensure_fell_back_to(engines_settings, tmp_path, monkeypatch, caplog):
    """On a GPU, ``engines.graph: auto`` puts the fused graph first. When it fails its gate, ``ensure``
    falls back to the reference graph, and ``load_runner`` (what scoring actors call) loads that same
    plan: both walk one candidate list (``plan_candidates``), so scoring finds what ensure built.

    The machine is declared a GPU platform (``hardware.platform_for``); the plans still run on ONNX
    Runtime's CPU EP. A zero |Δp| limit passes the reference graph (the gate's own reference, so
    Δp = 0) and fails the fused one (other kernels, Δp > 0)."""
    import logging

    from engines import hardware

    gpu = {"kind": "gpu", "gpu": "NVIDIA H200", "compute_capability": "9.0", "id": "NVIDIA H200 sm90"}
    monkeypatch.setattr(hardware, "platform_for", lambda backend, providers=None: gpu)
    settings = engines_settings(tmp_path / "cache", **{"engines.gate.fp32_max_abs_delta_p": 0.0})
    specs = cache.plan_candidates(settings, precision="fp32")
    assert [cache.describe_spec(s) for s in specs] == ["onnxruntime fused fp32", "onnxruntime fp32"]
    # From here torch "sees a GPU": auto's last candidate is the inductor plan, but asking for it imports
    # torch and starts CUDA (5-6 s in a scoring actor), so neither ensure nor load may ask while an ONNX
    # Runtime entry serves.
    from engines import inductor_runner

    asked: list[int] = []
    monkeypatch.setattr(inductor_runner, "cuda_available", lambda: asked.append(1) or True)

    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        path = cache.ensure(settings, precision="fp32", as_of=AS_OF)
    assert path == specs[1].plan_path
    assert cache.read_metadata(specs[0].plan_path)["gate"]["passed"] is False
    assert cache.read_metadata(path)["gate"]["passed"] is True
    assert any("onnxruntime fused fp32 engine" in m and "falling back to onnxruntime fp32" in m
               for m in caplog.messages), caplog.messages

    runner, meta = cache.load_runner(settings, precision="fp32")
    assert meta["fingerprint"] == cache.read_metadata(path)["fingerprint"] and "fused" not in runner.name
    assert asked == [], "the inductor candidate was resolved although an ONNX Runtime plan served"
    assert cache.backend_candidates(settings, "emr_risk") == ["onnxruntime", "inductor"] and asked == [1]
    monkeypatch.setattr(inductor_runner, "cuda_available", lambda: False)
    # Asked for the fused graph explicitly, the failed plan is refused, not replaced.
    fused_only = engines_settings(tmp_path / "cache", **{"engines.gate.fp32_max_abs_delta_p": 0.0,
                                                         "engines.graph": "fused"})
    with pytest.raises(cache.UngatedEngineError, match="failed its accuracy gate"):
        cache.load_runner(fused_only, precision="fp32")
