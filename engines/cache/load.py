"""Engine cache, the load role: verify a plan against this machine and its card, then hand out its runner.

A plan whose sha256, platform or backend version does not match its sidecar
and this machine is never deserialised: callers get an error naming the
mismatch and the command that fixes it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from conf.settings import Settings
from engines import hardware
from engines.cache.key import (EngineCacheError, EngineSpec, UngatedEngineError, backend_identity,
                               compile_cache_path, describe_spec, iter_backend_candidates, iter_plan_candidates,
                               metadata_path, read_metadata, source_onnx)
from engines.model_card import file_sha256, load_card
from engines.runner import Runner

log = logging.getLogger(__name__)


def verify(plan_path: Path, settings: Settings | None = None) -> list[str]:
    """Every reason the plan must not be loaded here (empty list: it is intact and ours).

    Checks the sidecar exists, the plan's bytes hash to the recorded sha256, the
    backend module/version and the platform match this machine, and (with
    ``settings``) that the model card still describes the ONNX it was built from.
    """
    plan_path = Path(plan_path)
    try:
        meta = read_metadata(plan_path)
    except FileNotFoundError as exc:
        return [str(exc)]
    except json.JSONDecodeError as exc:
        return [f"engine metadata {metadata_path(plan_path)} is not valid JSON ({exc})"]
    problems = []
    if not plan_path.is_file():
        return [f"plan file {plan_path} is missing"]
    actual = file_sha256(plan_path)
    if actual != meta.get("plan_sha256"):
        problems.append(f"plan sha256 mismatch: file {actual[:16]}… vs metadata "
                        f"{str(meta.get('plan_sha256'))[:16]}… (corrupted or replaced)")
    backend = meta.get("backend")
    try:
        module, version = backend_identity(backend)
    except Exception as exc:  # backend not installed here: that is itself a mismatch
        problems.append(f"backend {backend!r} unavailable here: {exc}")
    else:
        if (module, version) != (meta.get("backend_module"), meta.get("backend_version")):
            problems.append(f"backend mismatch: built with {meta.get('backend_module')} "
                            f"{meta.get('backend_version')}, this machine has {module} {version}")
        here = hardware.platform_for(backend, meta.get("providers"))["id"]
        built = (meta.get("platform") or {}).get("id")
        if here != built:
            problems.append(f"platform mismatch: built for {built!r}, this machine is {here!r}")
    if backend == "inductor":
        problems += _inductor_problems(plan_path, meta)
    if settings is not None:
        try:
            card = load_card(settings, meta.get("model", "emr_risk"))
        except Exception as exc:
            problems.append(f"model card unusable: {exc}")
        else:
            graph = meta.get("graph", "reference")
            try:
                expected = source_onnx(card, graph, meta.get("precision", "fp32"))[1]
            except KeyError:
                expected = None
            if expected != meta.get("onnx_sha256"):
                problems.append(f"stale: built from {graph} ONNX {str(meta.get('onnx_sha256'))[:12]}…, the "
                                f"model card now names {str(expected)[:12]}…")
            weights = (card.get("torch") or {}).get("sha256")
            if backend == "inductor" and weights != meta.get("weights_sha256"):
                problems.append(f"stale: exported from torch weights {str(meta.get('weights_sha256'))[:12]}…, "
                                f"the model card now names {str(weights)[:12]}…")
    return problems


def _inductor_problems(plan_path: Path, meta: dict[str, Any]) -> list[str]:
    """The compile artefacts beside an inductor plan must be the ones its sidecar records."""
    cache_file = compile_cache_path(plan_path)
    recorded = (meta.get("compile_cache") or {}).get("sha256")
    if not cache_file.is_file():
        return [f"compile artefacts {cache_file} are missing"]
    actual = file_sha256(cache_file)
    if actual != recorded:
        return [f"compile artefacts sha256 mismatch: file {actual[:16]}… vs metadata {str(recorded)[:16]}… "
                "(corrupted or replaced)"]
    return []


def runner_for(plan_path: Path, meta: dict[str, Any], providers: list[str] | None = None) -> Runner:
    """A (not yet activated) runner for a verified plan."""
    if meta["backend"] == "onnxruntime":
        from engines.ort_runner import OrtRunner

        graph = "" if meta.get("graph", "reference") == "reference" else f"{meta['graph']}-"
        return OrtRunner(plan_path, providers=providers or meta.get("providers"),
                         name=f"onnxruntime-{graph}{meta['precision']}:{meta['fingerprint']}",
                         fp16_plan=meta["precision"] == "fp16")
    if meta["backend"] == "inductor":
        from engines.inductor_runner import InductorRunner

        return InductorRunner(plan_path, compile_cache_path(plan_path), meta["shapes"],
                              name=f"inductor-{meta['precision']}:{meta['fingerprint']}", device=meta.get("device"),
                              compile_threads=meta.get("compile_threads"),
                              compile_mode=meta.get("compile_mode", "per_shape"))
    from engines.trt_runner import TrtRunner

    return TrtRunner(plan_path, meta["backend_module"],
                     name=f"tensorrt-{meta['precision']}:{meta['fingerprint']}")


def reference_runner(settings: Settings, model: str = "emr_risk") -> Runner:
    """fp32 ONNX Runtime on the CPU EP over the card's ONNX: what every candidate is judged against."""
    from engines.ort_runner import OrtRunner

    card = load_card(settings, model)
    return OrtRunner(Path(card["onnx"]["file"]), providers=["CPUExecutionProvider"],
                     name="onnxruntime-fp32-reference")


def load_runner(settings: Settings, model: str = "emr_risk", backend: str | None = None,
                precision: str | None = None, force_ungated: bool = False,
                providers: list[str] | None = None) -> tuple[Runner, dict[str, Any]]:
    """The runner (not yet activated) and metadata of the cached, verified, gated engine.

    Refuses engines that are missing, fail verification, or have not passed
    their gate (unless ``force_ungated``), naming the command that fixes it.
    The entries of :func:`engines.cache.key.iter_plan_candidates` — the ones ``ensure``
    builds, in its order — are tried in turn: the first that is there, intact
    and gated is loaded; each one passed over is logged with its reason. A later
    entry is resolved only when the ones before it fail.
    """
    candidates = iter_plan_candidates(settings, model, iter_backend_candidates(settings, model, backend),
                                      precision, providers)
    spec = next(candidates)
    while True:
        try:
            return _load_one(settings, model, spec, False, providers)
        except (EngineCacheError, FileNotFoundError) as exc:
            # The next entry is resolved only now: the inductor plan's (torch, CUDA) is never looked
            # at while an ONNX Runtime plan loads.
            fallback = next(candidates, None)
            if fallback is None:
                if force_ungated and isinstance(exc, UngatedEngineError):
                    return _load_one(settings, model, spec, True, providers)
                raise
            log.warning("%s engine for %s not used (%s); trying %s", describe_spec(spec), model, exc,
                        describe_spec(fallback))
            spec = fallback


def _load_one(settings: Settings, model: str, spec: EngineSpec, force_ungated: bool,
              providers: list[str] | None) -> tuple[Runner, dict[str, Any]]:
    fix = (f"`medscreen engines ensure --model {model} --backend {spec.backend} "
           f"--precision {spec.precision} --cache {settings.engine_cache_dir}`")
    if not spec.plan_path.exists():
        raise EngineCacheError(f"no {spec.backend} {spec.precision} engine for {model} on platform "
                               f"{spec.components['platform']!r} in {settings.engine_cache_dir}; run {fix}")
    problems = verify(spec.plan_path, settings)
    if problems:
        raise EngineCacheError(f"engine {spec.plan_path} must not be loaded: " + "; ".join(problems)
                               + f"; rebuild with {fix[:-1]} --rebuild`")
    meta = read_metadata(spec.plan_path)
    passed = (meta.get("gate") or {}).get("passed")
    if passed is not True and not force_ungated:
        why = "failed its accuracy gate (" + "; ".join(meta["gate"].get("failures", [])) + ")" \
            if passed is False else "has not been gated"
        raise UngatedEngineError(f"engine {spec.plan_path.name} ({spec.backend} {spec.precision}) {why}; "
                                 f"run {fix} with a labelled --as-of, pick another precision, or "
                                 "pass --force-ungated to score anyway")
    if passed is not True:
        log.warning("scoring with ungated engine %s (forced)", spec.plan_path.name)
    return runner_for(spec.plan_path, meta, providers), meta
