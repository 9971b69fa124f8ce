"""The engine cache: precision plans, TensorRT plans and Inductor plans keyed by everything that makes them valid.

Key = sha256 over (model, source graph and its ONNX sha256, backend, backend
module + version, platform id (GPU model + compute capability, or
"cpu"/"cpu-aot"), precision, optimisation profiles, and for int8 the
calibration method and size). For ``onnxruntime`` the plan is the
precision-converted ``.onnx`` — or, for the ``fused`` graph, the card's fused
graph of that precision, whose precision was decided at export — and for
``tensorrt`` the serialized ``.plan``; for ``inductor`` the ``torch.export``
program (``.pt2``, keyed also by the torch weights and the scoring shapes)
with its Inductor compile artefacts beside it. Beside each plan a JSON sidecar
(``<plan>.json``) records versions, platform, build time, calibration hash,
vocabulary, the gate verdict and the short ``fingerprint`` that score rows
carry as ``engine_fingerprint``.

A plan whose sha256, platform or backend version does not match its sidecar
and this machine is never deserialised: callers get an error naming the
mismatch (``ensure(..., rebuild=True)`` replaces it).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from conf.settings import Settings
from engines.cache.build import CALIBRATION_BATCH_ROWS, build, calibration_set
from engines.cache.gate import gate_plan
from engines.cache.key import (AUTO, BACKENDS, GRAPHS, METADATA_FORMAT, EngineCacheError, EngineSpec,
                               UngatedEngineError, backend_candidates, backend_identity, cache_key,
                               compile_cache_path, describe_spec, graph_for, iter_backend_candidates,
                               iter_plan_candidates, metadata_path, plan_candidates, plan_lock, read_metadata,
                               resolve, source_onnx, write_metadata_file)
from engines.cache.load import load_runner, reference_runner, runner_for, verify
from engines.model_card import file_sha256

__all__ = ["AUTO", "BACKENDS", "CALIBRATION_BATCH_ROWS", "GRAPHS", "METADATA_FORMAT", "EngineCacheError",
           "EngineSpec", "UngatedEngineError", "backend_candidates", "backend_identity", "build", "cache_key",
           "calibration_set", "compile_cache_path", "ensure", "ensure_first", "file_sha256", "gate_plan",
           "graph_for", "iter_backend_candidates", "iter_plan_candidates", "load_runner", "metadata_path",
           "plan_candidates", "read_metadata", "reference_runner", "resolve", "runner_for", "source_onnx", "verify",
           "write_metadata_file"]

log = logging.getLogger(__name__)

# The sidecar writer under the name the cache's tests know it by.
_write_json_atomic = write_metadata_file


def ensure(settings: Settings, model: str = "emr_risk", backend: str | None = None,
           precision: str | None = None, as_of: str | None = None, rebuild: bool = False) -> Path:
    """Build and gate whatever is missing or stale for (model, backend, precision) here; return the plan path.

    A cached plan that fails verification (corrupted, other platform or
    backend version) raises EngineCacheError unless ``rebuild``. A TensorRT
    plan built on a machine without a usable GPU stays ungated (its gate runs
    where it can execute). With ``backend`` ``auto`` (and a fused graph under
    ``engines.graph: auto``) the entries of :func:`plan_candidates` are tried in
    order (:func:`ensure_first`).
    """
    return ensure_first(settings, iter_backend_candidates(settings, model, backend), model, precision, as_of,
                        rebuild)


def ensure_first(settings: Settings, backends: Iterable[str], model: str = "emr_risk", precision: str | None = None,
                 as_of: str | None = None, rebuild: bool = False) -> Path:
    """Ensure the first entry of :func:`iter_plan_candidates` over ``backends`` that builds and passes its
    gate here; return its plan path.

    Every entry but the last must pass its gate to be chosen; one that cannot be built or fails
    its gate is passed over with a WARNING giving the reason. The last is ensured as any plan is.
    A later entry is resolved only when the ones before it fail. :func:`load_runner` walks the same
    entries in the same order.
    """
    candidates = iter_plan_candidates(settings, model, backends, precision)
    spec = next(candidates)
    while True:
        try:
            path = _ensure(settings, spec, model, as_of, rebuild)
        except Exception as exc:  # noqa: BLE001 - any failure of the preferred entry falls back, said why
            fallback = next(candidates, None)
            if fallback is None:
                raise
            why = f"{type(exc).__name__}: {exc}"
        else:
            verdict = read_metadata(path)["gate"]
            if verdict.get("passed") is True:
                return path
            fallback = next(candidates, None)
            if fallback is None:
                return path  # the last entry is ensured as any plan is, whatever its gate said
            why = f"{path.name} did not pass its gate: " + "; ".join(verdict.get("failures")
                                                                      or [str(verdict.get("pending"))])
        log.warning("%s engine for %s unavailable here (%s); falling back to %s", describe_spec(spec), model,
                    why[:500], describe_spec(fallback))
        spec = fallback


def _ensure(settings: Settings, spec: EngineSpec, model: str, as_of: str | None, rebuild: bool) -> Path:
    path = spec.plan_path
    graph = spec.components.get("graph", "reference")
    if path.exists() and not rebuild:
        problems = verify(path, settings)
        if problems:
            raise EngineCacheError(f"cached engine {path} must not be loaded: " + "; ".join(problems)
                                   + "; rerun with --rebuild (ensure(..., rebuild=True)) to replace it")
    if rebuild or not path.exists() or not metadata_path(path).exists():
        build(settings, model, spec.backend, spec.precision, as_of, graph=graph)
    meta = read_metadata(path)
    if meta["gate"].get("passed") is None:
        if spec.backend == "tensorrt":
            from engines.trt_runner import execution_blocker

            blocker = execution_blocker(meta["backend_module"])
            if blocker:
                log.warning("engine %s built but not gated: %s", path.name, blocker)
                meta["gate"] = {"passed": None, "pending": f"cannot execute here: {blocker}"}
                with plan_lock(path):
                    write_metadata_file(metadata_path(path), meta)
                return path
        verdict = gate_plan(settings, path, as_of)
        if graph == "fused" and not verdict.get("passed"):
            raise EngineCacheError(f"fused engine {path.name} failed its gate: "
                                   + "; ".join(verdict.get("failures", [])))
    elif graph == "fused" and meta["gate"].get("passed") is False:
        raise EngineCacheError(f"fused engine {path.name} failed its gate")
    return path


