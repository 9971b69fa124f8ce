"""Engine cache, the build role: precision plan (and TensorRT plan) for a cache entry, with its sidecar, ungated.

int8 plans are calibrated on real timelines from the lake (:func:`calibration_set`).
"""
from __future__ import annotations

import datetime as dt
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

from conf.settings import Settings
from engines import hardware
from engines.cache.key import (METADATA_FORMAT, EngineSpec, compile_cache_path, plan_lock, resolve, source_onnx,
                               write_metadata_file)
from engines.model_card import file_sha256, load_card

log = logging.getLogger(__name__)

CALIBRATION_BATCH_ROWS = 64


def calibration_set(settings: Settings, as_of: str | None, seed: int = 0, model: str = "emr_risk"
                    ) -> tuple[dict[str, Any], list[dict]]:
    """Real timelines for int8 calibration: stratified, half 0 of the key split, length-sorted batches."""
    from engines import precision as precision_mod, samples

    if load_card(settings, model).get("task") == "segmentation":
        raise precision_mod.PrecisionError(
            f"int8 calibration for {model!r} needs CT patches from the lake, which the engines do "
            "not read yet; build fp16 or fp32 for this model")
    as_of = as_of or samples.latest_as_of(settings.lake.root)
    if as_of is None:
        raise samples.SampleError(
            f"int8 calibration needs timelines in lake {settings.lake.root}; run "
            "`medscreen emr features --as-of D` first and pass --as-of D")
    table = samples.read_timelines(settings.lake.root, as_of)
    samples.check_vocabulary(settings.lake.root, as_of, load_card(settings, model))
    sample = samples.stratified_sample(table, settings.engines.calibration_rows, seed=seed, half=0)
    batches = [feed for _, feed in samples.feed_batches(sample, settings.features.max_tokens,
                                                        CALIBRATION_BATCH_ROWS)]
    info = {"method": settings.engines.calibration_method, "rows": sample.num_rows,
            "rows_requested": settings.engines.calibration_rows, "as_of": as_of,
            "sha256": precision_mod.calibration_sha256(batches)}
    return info, batches


def build(settings: Settings, model: str = "emr_risk", backend: str | None = None,
          precision: str | None = None, as_of: str | None = None,
          providers: list[str] | None = None, graph: str | None = None) -> Path:
    """Build (or rebuild) the plan for this platform and write its metadata, ungated."""
    card = load_card(settings, model)
    spec = resolve(settings, model, backend, precision, providers, card, graph)
    with plan_lock(spec.plan_path):
        if spec.backend == "inductor":
            return _build_inductor_locked(spec, card)
        return _build_locked(settings, spec, card, as_of, providers)


def _build_locked(settings: Settings, spec: EngineSpec, card: dict[str, Any], as_of: str | None,
                  providers: list[str] | None) -> Path:
    from engines import precision as precision_mod

    started = time.perf_counter()
    graph = spec.components.get("graph", "reference")
    onnx_file, onnx_sha = source_onnx(card, graph, spec.precision)
    calibration, batches = None, None
    if spec.precision == "int8":
        calibration, batches = calibration_set(settings, as_of, model=spec.model)
    tag = uuid.uuid4().hex[:8]
    tmp_onnx = spec.plan_path.with_name(f".{spec.plan_path.stem}.{tag}.onnx.tmp")
    tmp_plan = spec.plan_path.with_name(f".{spec.plan_path.name}.{tag}.tmp")
    extra: dict[str, Any] = {}
    try:
        if graph == "fused":
            # Precision was decided when the fused graph was exported; check it loads here.
            precision_mod.check_loads(onnx_file, tmp_onnx)
        else:
            precision_mod.make_plan(onnx_file, tmp_onnx, spec.precision, batches,
                                    settings.engines.calibration_method)
        if spec.backend == "onnxruntime":
            os.replace(tmp_onnx, tmp_plan)
        else:
            from engines.trt_builder import build_plan

            plan, extra = build_plan(tmp_onnx, spec.components["profiles"],
                                     spec.components["backend_module"])
            tmp_plan.write_bytes(plan)
        plan_sha = file_sha256(tmp_plan)
        os.replace(tmp_plan, spec.plan_path)
    finally:
        for t in (tmp_onnx, tmp_plan):
            t.unlink(missing_ok=True)
    meta = {
        **_sidecar(spec, card, plan_sha, started, hardware.platform_for(spec.backend, providers)),
        "graph": graph, "onnx_sha256": onnx_sha, "profiles": spec.components["profiles"], "providers": providers,
        "calibration": calibration, "io": extra.get("io"),
    }
    write_metadata_file(spec.meta_path, meta)
    log.info("built %s engine %s in %.1fs", spec.backend, spec.plan_path.name, meta["build_seconds"])
    return spec.plan_path


def _sidecar(spec: EngineSpec, card: dict[str, Any], plan_sha: str, started: float,
             platform: dict[str, Any]) -> dict[str, Any]:
    """The sidecar fields every backend's plan carries (ungated)."""
    return {
        "format": METADATA_FORMAT, "model": spec.model, "model_version": card["version"],
        "backend": spec.backend, "backend_module": spec.components["backend_module"],
        "backend_version": spec.components["backend_version"], "precision": spec.precision,
        # Scores take the card's calibration, fitted for the reference ONNX (inference.emr checks this).
        "reference_onnx_sha256": card["onnx"]["sha256"], "plan_sha256": plan_sha,
        "plan_file": spec.plan_path.name, "plan_bytes": spec.plan_path.stat().st_size, "platform": platform,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "vocab": card.get("vocab"), "vocab_sha256": (card.get("vocab") or {}).get("sha256"),
        "cache_key": spec.key, "key_components": spec.components,
        "fingerprint": f"{spec.backend[:3]}-{spec.precision}-{plan_sha[:12]}",
        "gate": {"passed": None, "pending": "not gated yet; run `medscreen engines gate`"},
    }


def _build_inductor_locked(spec: EngineSpec, card: dict[str, Any]) -> Path:
    """Export the torch model (the plan), compile it for the scoring shapes, keep the compile artefacts."""
    from engines import inductor_export
    from engines.inductor_runner import default_device, scoring_shapes

    started = time.perf_counter()
    _, weights_sha = inductor_export.weights_file(card)
    if weights_sha != spec.components["weights_sha256"]:
        raise inductor_export.InductorBuildError(
            f"torch weights of {spec.model} hash to {weights_sha[:12]}…, the card records "
            f"{str(spec.components['weights_sha256'])[:12]}…")
    device = default_device()
    shapes = scoring_shapes(spec.components["shapes"]["token_budget"], spec.components["shapes"]["length_buckets"])
    tag = uuid.uuid4().hex[:8]
    # torch.export.save/load want the .pt2 suffix.
    tmp_plan = spec.plan_path.with_name(f".{spec.plan_path.stem}.{tag}.tmp.pt2")
    cache_file = compile_cache_path(spec.plan_path)
    tmp_cache = cache_file.with_name(f".{cache_file.name}.{tag}.tmp")
    try:
        inductor_export.export_program(card, spec.precision, device, tmp_plan)
        export_s = round(time.perf_counter() - started, 3)
        compile_mode = spec.components.get("compile_mode", "per_shape")
        artefacts, compile_s, threads = inductor_export.compile_artifacts(tmp_plan, shapes, device, compile_mode)
        tmp_cache.write_bytes(artefacts)
        plan_sha = file_sha256(tmp_plan)
        os.replace(tmp_cache, cache_file)
        os.replace(tmp_plan, spec.plan_path)
    finally:
        for t in (tmp_plan, tmp_cache):
            t.unlink(missing_ok=True)
    meta = {
        **_sidecar(spec, card, plan_sha, started, hardware.platform_for("inductor")),
        "graph": "torch-export", "onnx_sha256": card["onnx"]["sha256"], "weights_sha256": weights_sha,
        "device": device, "shapes": [list(s) for s in shapes],
        "compile_cache": {"file": cache_file.name, "sha256": file_sha256(cache_file),
                          "bytes": cache_file.stat().st_size},
        "export_seconds": export_s, "compile_seconds": compile_s, "compile_threads": threads,
        "compile_mode": compile_mode,
    }
    write_metadata_file(spec.meta_path, meta)
    log.info("built inductor engine %s (%s, shapes %s) in %.1fs", spec.plan_path.name, device, shapes,
             meta["build_seconds"])
    return spec.plan_path
