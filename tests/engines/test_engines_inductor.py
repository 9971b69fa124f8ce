"""The inductor backend (torch.export program + Inductor compile artefacts per scoring shape): built, gated
and loaded like every plan, same answers as the reference, padded to compiled shapes without changing
them, refused when tampered with, chosen by ``auto`` only where torch sees a GPU.

Real torch (CPU: Inductor's C++ kernels, no CUDA graphs), real ONNX Runtime, real Ray. Compiling costs
tens of seconds per shape on a small CPU, so the plan is built once for the module with two shapes.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from engines import cache, gate as gate_mod, samples
from engines.model_card import load_card

pytestmark = pytest.mark.slow

AS_OF = "2024-06-30"  # the engines lake fixture's partition (tests/engines/conftest.py)
# Two buckets, small budget: shapes (16, 64) and (4, 256).
TINY = {"scoring.token_budget": 1024, "scoring.length_buckets": [64, 256]}


@pytest.fixture(scope="module")
def inductor_fp32(engines_settings, tmp_path_factory):
    settings = engines_settings(tmp_path_factory.mktemp("inductor-cache"), **TINY)
    path = cache.ensure(settings, backend="inductor", precision="fp32", as_of=AS_OF)
    return settings, path


def _lake_batches(settings, rows: int = 200):
    _, table = samples.holdout_sample(settings, AS_OF, rows)
    return table, samples.feed_batches(table, settings.features.max_tokens)


def test_inductor_plan_is_built_gated_and_scores_like_the_reference(inductor_fp32):
    settings, path = inductor_fp32
    meta = cache.read_metadata(path)
    card = load_card(settings)
    assert meta["backend"] == "inductor" and meta["backend_module"] == "torch" and path.suffix == ".pt2"
    assert meta["shapes"] == [[16, 64], [4, 256]] and meta["device"] == "cpu"
    assert set(meta["compile_seconds"]) == {"16x64", "4x256"}
    # Scores take the card's calibration, which is tied to the reference ONNX.
    assert meta["reference_onnx_sha256"] == meta["onnx_sha256"] == card["onnx"]["sha256"]
    assert meta["weights_sha256"] == card["torch"]["sha256"]
    assert cache.compile_cache_path(path).stat().st_size == meta["compile_cache"]["bytes"] > 0
    assert meta["gate"]["passed"] is True, meta["gate"]
    assert meta["gate"]["candidate"].startswith("inductor-fp32:ind-fp32-")
    assert meta["gate"]["metrics"]["max_abs_delta_p"] < settings.engines.gate.fp32_max_abs_delta_p

    runner, loaded = cache.load_runner(settings, backend="inductor", precision="fp32")
    assert loaded["fingerprint"] == meta["fingerprint"]
    table, batches = _lake_batches(settings)
    with runner, cache.reference_runner(settings) as ref:
        got = gate_mod.run_batches(runner, batches, table.num_rows)
        want = gate_mod.run_batches(ref, batches, table.num_rows)
        assert set(runner.describe()["compile_seconds"]) == {"16x64", "4x256"}
    assert np.all(np.isfinite(got)) and got.shape == (table.num_rows, 3)
    assert float(np.max(np.abs(got - want))) < 1e-4


def test_a_dynamic_plan_compiles_once_for_every_shape_and_scores_like_the_per_shape_plan(inductor_fp32,
                                                                                        engines_settings,
                                                                                        tmp_path):
    """engines.inductor_compile dynamic: one compile with symbolic shapes serves both scoring shapes (one
    cache lookup at load instead of one per shape), keyed apart from the per-shape plan, gated the same."""
    settings, static_path = inductor_fp32
    dyn = engines_settings(tmp_path / "dyn-cache", **TINY, **{"engines.inductor_compile": "dynamic"})
    path = cache.ensure(dyn, backend="inductor", precision="fp32", as_of=AS_OF)
    meta = cache.read_metadata(path)
    assert meta["compile_mode"] == "dynamic" and meta["gate"]["passed"] is True, meta.get("gate")
    assert meta["fingerprint"] != cache.read_metadata(static_path)["fingerprint"]
    runner, _ = cache.load_runner(dyn, backend="inductor", precision="fp32")
    static, _ = cache.load_runner(settings, backend="inductor", precision="fp32")
    table, batches = _lake_batches(settings)
    with runner, static:
        assert runner.describe()["compile_cache"] == {"hit": 1}, runner.describe()
        got = gate_mod.run_batches(runner, batches, table.num_rows)
        want = gate_mod.run_batches(static, batches, table.num_rows)
        assert runner.eager_calls == 0
    assert float(np.max(np.abs(got - want))) < 1e-4


def test_padding_to_compiled_shapes_gives_the_unpadded_answer(inductor_fp32):
    """Rows padded up to the compiled batch, chunked past it, sequences padded to the bucket: the
    outputs are those of the exported program run eagerly on the batch as it came; longer sequences
    than any compiled shape run eagerly."""
    import torch

    settings, path = inductor_fp32
    table, _ = _lake_batches(settings, 300)
    program = torch.export.load(str(path)).module()
    runner, _ = cache.load_runner(settings, backend="inductor", precision="fp32")
    with runner:
        # Each batch hits the compiled shape of the smallest length that holds it.
        assert [runner.shape_for(r, s) for r, s in ((5, 40), (37, 64), (3, 200), (9, 256), (1, 300))] == \
            [(16, 64), (16, 64), (4, 256), (4, 256), None]
        for rows, seq in ((5, 40), (37, 64), (3, 200), (9, 256)):
            feed = samples.to_feed(table.slice(0, rows), seq, pad_to=seq)
            got = runner.infer(feed)["probs"]
            with torch.inference_mode():
                want = program(*(torch.from_numpy(feed[k]) for k in ("tokens", "days_before", "age_years", "sex")))
            assert got.shape == (rows, 3)
            np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0)
        assert runner.eager_calls == 0
        longer = samples.to_feed(table.slice(0, 3), 300, pad_to=300)
        assert runner.infer(longer)["probs"].shape == (3, 3) and runner.eager_calls == 1
        assert runner.infer({k: v[:0] for k, v in feed.items()})["probs"].shape == (0, 3)


_LOAD_IN_A_FRESH_PROCESS = """
import json, sys, types
# As in a Ray GPU worker: a module ahead of torch in sys.modules holds torch.contiguous_format, so
# plain pickling would name that module (a memory_format has no __module__) in every cache key.
decoy = sys.modules["medscreen_test_decoy"] = types.ModuleType("medscreen_test_decoy")
import torch
decoy.contiguous_format = torch.contiguous_format
from pathlib import Path
from engines import cache
plan = Path(sys.argv[1])
runner = cache.runner_for(plan, cache.read_metadata(plan))
with runner:
    print(json.dumps(runner.describe()))
"""


def test_a_fresh_process_with_another_thread_count_compiles_from_the_plans_artefacts(inductor_fp32, tmp_path):
    """A Ray actor runs with OMP_NUM_THREADS=1, an empty compile cache and its own import history:
    Inductor's cache key holds torch's thread count (the runner compiles under the build's count) and
    pickled tensor metadata (the runner names memory formats itself, not after whichever module in
    sys.modules holds them first), so every shape is a hit in the plan's Mega-Cache artefacts, not a
    fresh compile."""
    import os
    import subprocess
    import sys

    from engines.model_card import REPO_ROOT

    _, path = inductor_fp32
    built_with = cache.read_metadata(path)["compile_threads"]
    assert built_with >= 1
    env = {**os.environ, "OMP_NUM_THREADS": "2" if built_with == 1 else "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "empty-inductor-cache")}
    done = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    described = json.loads(done.stdout.strip().splitlines()[-1])
    assert described["compile_cache"] == {"hit": 2}, described


def test_cache_keys_name_memory_formats_the_same_in_every_process():
    """Some torch versions (2.11, the GPU image's) pickle a memory_format by the first module in
    sys.modules that holds it, so a Ray GPU worker's cache keys named another module than the build's.
    Pinned, the pickled tensor metadata names the runner's own function and round-trips."""
    import pickle
    import sys
    import types

    import torch
    from torch._inductor.codecache import extract_tensor_metadata_for_cache_key

    from engines.inductor_runner import pin_cache_key_pickling

    decoy = sys.modules["medscreen_test_decoy"] = types.ModuleType("medscreen_test_decoy")
    try:
        decoy.contiguous_format = torch.contiguous_format
        pin_cache_key_pickling()
        blob = pickle.dumps(extract_tensor_metadata_for_cache_key(torch.empty(4, 4)))
        assert b"engines.inductor_runner" in blob and b"memory_format_named" in blob
        assert b"medscreen_test_decoy" not in blob
        assert pickle.loads(pickle.dumps(torch.channels_last)) is torch.channels_last
    finally:
        del sys.modules["medscreen_test_decoy"]


def test_verify_refuses_a_tampered_or_foreign_inductor_plan(inductor_fp32, tmp_path):
    settings, path = inductor_fp32
    assert cache.verify(path, settings) == []

    def copy() -> Path:
        d = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for f in (path, cache.metadata_path(path), cache.compile_cache_path(path)):
            shutil.copy(f, d / f.name)
        return d / path.name

    other_torch = copy()
    meta = cache.read_metadata(other_torch)
    meta["backend_version"] = "2.11.0+cu130"
    cache.metadata_path(other_torch).write_text(json.dumps(meta))
    assert any("backend mismatch" in p for p in cache.verify(other_torch, settings))

    other_gpu = copy()
    meta = cache.read_metadata(other_gpu)
    meta["platform"] = {"kind": "gpu", "id": "NVIDIA H200 sm90"}
    cache.metadata_path(other_gpu).write_text(json.dumps(meta))
    assert any("platform mismatch" in p for p in cache.verify(other_gpu, settings))

    artefacts = copy()
    blob = cache.compile_cache_path(artefacts)
    blob.write_bytes(blob.read_bytes()[:-1] + b"\0")
    assert any("compile artefacts sha256 mismatch" in p for p in cache.verify(artefacts, settings))

    stale = copy()
    meta = cache.read_metadata(stale)
    meta["weights_sha256"] = "0" * 64
    cache.metadata_path(stale).write_text(json.dumps(meta))
    assert any("torch weights" in p for p in cache.verify(stale, settings))


def test_auto_is_onnxruntime_without_a_gpu(engines_settings, engines_lake, tmp_path, capsys):
    """`engines ensure` (CLI, as the DAGs run it) and the scoring actors' engine source resolve the
    default backend, auto, alike: ONNX Runtime on a machine without a GPU."""
    from engines.inductor_runner import cuda_available
    from engines.source import CachedEngine
    from medscreen.cli import main

    settings = engines_settings(tmp_path / "cache")
    assert settings.engines.backend == "auto"
    if cuda_available():
        pytest.skip("this machine has a CUDA GPU torch can use")
    assert cache.backend_candidates(settings, "emr_risk") == ["onnxruntime"]
    assert cache.backend_candidates(settings, "ct_nodule") == ["onnxruntime"]
    assert cache.backend_candidates(settings, "emr_risk", "inductor") == ["inductor"]
    assert main(["engines", "ensure", "--model", "emr_risk", "--lake", str(engines_lake),
                 "--cache", str(tmp_path / "cache"), "--as-of", AS_OF]) == 0
    plan = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan.name.startswith("onnxruntime-fp32-")
    _, meta = CachedEngine(settings, "emr_risk", settings.engines.backend).load("fp32")
    assert meta["fingerprint"] == cache.read_metadata(plan)["fingerprint"]


def test_auto_falls_back_to_onnxruntime_with_its_reason(engines_settings, tmp_path, caplog):
    """A card without torch weights cannot give an inductor plan: ensure takes ONNX Runtime and says why."""
    card = yaml.safe_load(Path(load_card(engines_settings(tmp_path))["card_file"]).read_text())
    card.pop("torch")
    card_file = tmp_path / "emr_risk_no_torch.yaml"
    card_file.write_text(yaml.safe_dump(card))
    settings = engines_settings(tmp_path / "cache", models={"emr_risk": str(card_file)})
    with caplog.at_level(logging.WARNING, logger="engines.cache"):
        path = cache.ensure_first(settings, ["inductor", "onnxruntime"], precision="fp32", as_of=AS_OF)
    assert cache.read_metadata(path)["backend"] == "onnxruntime"
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("inductor" in m and "names no torch weights" in m and "falling back to onnxruntime" in m
               for m in warning), warning


def test_score_emr_end_to_end_with_the_inductor_engine(inductor_fp32, engines_lake, tmp_path, ray_local):
    from inference import emr

    from lake.commit import atomic_partition
    from lake.paths import LakePaths

    settings, path = inductor_fp32
    # The engines lake's timelines, committed as `emr features` commits them (with their vocabulary).
    lake = tmp_path / "lake"
    table = pq.read_table(next(LakePaths(engines_lake).timelines(AS_OF).glob("*.parquet")))
    vocab = load_card(settings)["vocab"]
    with atomic_partition(LakePaths(lake).timelines(AS_OF),
                          {"run_id": "test", "as_of": AS_OF, "vocabulary": vocab}) as staging:
        pq.write_table(table, staging / "part-00000.parquet")
    settings = settings.model_copy(update={
        "lake": settings.lake.model_copy(update={"root": lake}),
        "engines": settings.engines.model_copy(update={"backend": "inductor"}),
        "ray": settings.ray.model_copy(update={"actor_num_cpus": 0.5})})
    run_dir = emr.score(settings, AS_OF, fragment_rows=400)
    scores = pa.concat_tables(pq.read_table(f) for f in sorted(LakePaths(lake).scores("emr_risk", AS_OF)
                                                                .glob("*.parquet")))
    assert scores.num_rows > 700
    assert set(scores.column("engine_fingerprint").to_pylist()) == {cache.read_metadata(path)["fingerprint"]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["qc"]["passed"] is True
    # The actors (OMP_NUM_THREADS=1 under Ray) compiled every shape from the plan's cache entries.
    startup = metrics["throughput"]["startup"]
    assert startup["engine_compile_cache"] == {"hit": 2 * startup["actors"]}, startup


@pytest.mark.gpu
def test_cuda_graphs_serve_calls_from_another_thread(engines_settings, tmp_path):
    """Ray Data may call an actor from another thread than the one that activated its engine: every
    shape has its CUDA graph, replayed from that thread with the activating thread's answers."""
    import threading

    settings = engines_settings(tmp_path, **TINY)
    cache.ensure(settings, backend="inductor", precision="fp16", as_of=AS_OF)
    runner, _ = cache.load_runner(settings, backend="inductor", precision="fp16")
    table, batches = _lake_batches(settings, 100)
    with runner:
        assert runner.describe()["device"] == "cuda"
        assert runner.describe()["cuda_graphs"] == len(runner.shapes)
        here = gate_mod.run_batches(runner, batches, table.num_rows)
        there: dict = {}
        worker = threading.Thread(target=lambda: there.update(p=gate_mod.run_batches(runner, batches,
                                                                                     table.num_rows)))
        worker.start()
        worker.join()
        assert runner.eager_calls == 0
    np.testing.assert_array_equal(there["p"], here)
