"""The engine cache: precision plans and TensorRT plans keyed by everything that makes them valid.

Key = sha256 over (model, source graph and its ONNX sha256, backend, backend
module + version, platform id (GPU model + compute capability, or
"cpu"/"cpu-aot"), precision, optimisation profiles, and for int8 the
calibration method and size). For ``onnxruntime`` the plan is the
precision-converted ``.onnx`` — or, for the ``fused`` graph, the card's fused
graph of that precision, whose precision was decided at export — and for
``tensorrt`` the serialized ``.plan``. Beside each plan a JSON sidecar
(``<plan>.json``) records versions, platform, build time, calibration hash,
vocabulary, the gate verdict and the short ``fingerprint`` that score rows
carry as ``engine_fingerprint``.

A plan whose sha256, platform or backend version does not match its sidecar
and this machine is never deserialised: callers get an error naming the
mismatch (``ensure(..., rebuild=True)`` replaces it).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.settings import Settings
from engines import hardware
from engines.model_card import file_sha256, load_card, profiles as card_profiles
from engines.runner import PRECISIONS, Runner

# Loading a verified engine (what every scoring actor does at start-up) needs none of the
# gate, calibration or precision modules; they pull scipy, onnx and the sampling code, so
# they are imported inside the functions that build, calibrate and gate.

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt")
METADATA_FORMAT = 1
CALIBRATION_BATCH_ROWS = 64


class EngineCacheError(ValueError):
    """An engine is missing, stale, corrupted or built for another platform (an input problem:
    the CLI reports it as an error with its fix, not a crash)."""


class UngatedEngineError(EngineCacheError):
    """The engine has not passed its accuracy gate."""


def backend_identity(backend: str) -> tuple[str, str]:
    """(module, version) of the backend installed here."""
    if backend == "onnxruntime":
        import onnxruntime

        return "onnxruntime", onnxruntime.__version__
    if backend == "tensorrt":
        from engines.trt_builder import import_tensorrt

        trt = import_tensorrt()
        return trt.__name__, trt.__version__
    raise ValueError(f"backend {backend!r} unknown; use one of {BACKENDS}")


def cache_key(components: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of the key components."""
    return hashlib.sha256(json.dumps(components, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


@dataclass(frozen=True)
class EngineSpec:
    """Where the engine for (model, backend, precision) on this platform lives, and why."""

    model: str
    backend: str
    precision: str
    components: dict[str, Any]
    key: str
    plan_path: Path

    @property
    def meta_path(self) -> Path:
        return metadata_path(self.plan_path)


def metadata_path(plan_path: Path) -> Path:
    return Path(str(plan_path) + ".json")


GRAPHS = ("reference", "fused")


def graph_for(settings: Settings, card: dict[str, Any], backend: str, precision: str,
              platform_id: str, graph: str | None = None) -> str:
    """Which exported graph a plan is built from: ``fused`` or ``reference``.

    Fused graphs are ONNX Runtime contrib-op graphs of a fixed precision (the card's
    ``fused_onnx.graphs``): only ONNX Runtime runs them (TensorRT's parser has no
    com.microsoft ops), and int8 is quantized from the reference. ``auto`` takes the
    fused graph on a GPU execution provider, the reference elsewhere.
    """
    wanted = graph or settings.engines.graph
    available = backend == "onnxruntime" and precision in ((card.get("fused_onnx") or {}).get("graphs") or {})
    if wanted == "reference" or (wanted == "auto" and (not available or platform_id in ("cpu", "cpu-aot"))):
        return "reference"
    if not available:
        raise EngineCacheError(
            f"no fused {precision} graph for {backend} in model card {card.get('card_file')}: fused graphs "
            "exist for ONNX Runtime fp32/fp16 only (re-export with python -m models.emr_risk.export_fused), "
            "or set engines.graph: reference")
    return "fused"


def source_onnx(card: dict[str, Any], graph: str, precision: str) -> tuple[Path, str]:
    """(file, sha256) of the ONNX a plan of ``graph``/``precision`` is built from."""
    if graph == "fused":
        entry = card["fused_onnx"]["graphs"][precision]
        return Path(entry["file"]), entry["sha256"]
    return Path(card["onnx"]["file"]), card["onnx"]["sha256"]


def resolve(settings: Settings, model: str = "emr_risk", backend: str | None = None,
            precision: str | None = None, providers: list[str] | None = None,
            card: dict[str, Any] | None = None, graph: str | None = None) -> EngineSpec:
    """The cache entry the current settings, model card and machine call for.

    ``graph`` (``fused``/``reference``) overrides ``engines.graph`` for this call.
    """
    backend = backend or settings.engines.backend
    precision = precision or settings.engines.precision
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; use one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {PRECISIONS}")
    card = card or load_card(settings, model)
    module, version = backend_identity(backend)
    platform_id = hardware.platform_for(backend, providers)["id"]
    chosen = graph_for(settings, card, backend, precision, platform_id, graph)
    components: dict[str, Any] = {
        "model": model, "onnx_sha256": source_onnx(card, chosen, precision)[1], "backend": backend,
        "backend_module": module, "backend_version": version,
        "platform": platform_id, "precision": precision,
        "profiles": card_profiles(card)}
    if chosen != "reference":  # reference keys stay what they were: existing caches remain valid
        components["graph"] = chosen
    if precision == "int8":
        components["calibration"] = {"method": settings.engines.calibration_method,
                                     "rows": settings.engines.calibration_rows}
    key = cache_key(components)
    ext = ".onnx" if backend == "onnxruntime" else ".plan"
    label = precision if chosen == "reference" else f"{chosen}-{precision}"
    path = settings.engine_cache_dir / model / f"{backend}-{label}-{key[:16]}{ext}"
    return EngineSpec(model, backend, precision, components, key, path)


def read_metadata(plan_path: Path) -> dict[str, Any]:
    """The sidecar metadata of a plan; FileNotFoundError naming it when absent."""
    meta = metadata_path(plan_path)
    if not meta.is_file():
        raise FileNotFoundError(f"engine metadata {meta} does not exist; {plan_path} is not a "
                                "cached engine (build one with `medscreen engines build`)")
    return json.loads(meta.read_text())


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


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
    return problems


@contextlib.contextmanager
def _build_lock(plan_path: Path) -> Iterator[None]:
    # Several actors or DAG tasks may ensure the same engine at once; one builds, the others wait.
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    with open(str(plan_path) + ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


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
    with _build_lock(spec.plan_path):
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
        "format": METADATA_FORMAT, "model": spec.model, "model_version": card["version"],
        "backend": spec.backend, "backend_module": spec.components["backend_module"],
        "backend_version": spec.components["backend_version"], "precision": spec.precision,
        "graph": graph, "onnx_sha256": onnx_sha, "reference_onnx_sha256": card["onnx"]["sha256"],
        "plan_sha256": plan_sha,
        "plan_file": spec.plan_path.name, "plan_bytes": spec.plan_path.stat().st_size,
        "profiles": spec.components["profiles"],
        "platform": hardware.platform_for(spec.backend, providers), "providers": providers,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "calibration": calibration, "vocab": card.get("vocab"),
        "vocab_sha256": (card.get("vocab") or {}).get("sha256"),
        "cache_key": spec.key, "key_components": spec.components,
        "fingerprint": f"{spec.backend[:3]}-{spec.precision}-{plan_sha[:12]}",
        "io": extra.get("io"),
        "gate": {"passed": None, "pending": "not gated yet; run `medscreen engines gate`"},
    }
    _write_json_atomic(spec.meta_path, meta)
    log.info("built %s engine %s in %.1fs", spec.backend, spec.plan_path.name, meta["build_seconds"])
    return spec.plan_path


def runner_for(plan_path: Path, meta: dict[str, Any], providers: list[str] | None = None) -> Runner:
    """A (not yet activated) runner for a verified plan."""
    if meta["backend"] == "onnxruntime":
        from engines.ort_runner import OrtRunner

        graph = "" if meta.get("graph", "reference") == "reference" else f"{meta['graph']}-"
        return OrtRunner(plan_path, providers=providers or meta.get("providers"),
                         name=f"onnxruntime-{graph}{meta['precision']}:{meta['fingerprint']}",
                         fp16_plan=meta["precision"] == "fp16")
    from engines.trt_runner import TrtRunner

    return TrtRunner(plan_path, meta["backend_module"],
                     name=f"tensorrt-{meta['precision']}:{meta['fingerprint']}")


def reference_runner(settings: Settings, model: str = "emr_risk") -> Runner:
    """fp32 ONNX Runtime on the CPU EP over the card's ONNX: what every candidate is judged against."""
    from engines.ort_runner import OrtRunner

    card = load_card(settings, model)
    return OrtRunner(Path(card["onnx"]["file"]), providers=["CPUExecutionProvider"],
                     name="onnxruntime-fp32-reference")


def gate_plan(settings: Settings, plan_path: Path, as_of: str | None = None,
              rows: int | None = None) -> dict[str, Any]:
    """Run the accuracy gate for a cached plan and record the verdict in its metadata.

    ``rows``: held-out sample size (default :data:`engines.gate.DEFAULT_GATE_ROWS`).
    """
    from engines import gate as gate_mod, samples

    rows = rows or gate_mod.DEFAULT_GATE_ROWS
    plan_path = Path(plan_path)
    problems = verify(plan_path, settings)
    if problems:
        raise EngineCacheError(f"refusing to gate {plan_path}: " + "; ".join(problems))
    meta = read_metadata(plan_path)
    is_reference = meta["backend"] == "onnxruntime" and meta["precision"] == "fp32" \
        and meta.get("graph", "reference") == "reference" \
        and (meta.get("providers") or ["CPUExecutionProvider"])[0] == "CPUExecutionProvider"
    card = load_card(settings, meta["model"])
    segmentation = card.get("task") == "segmentation"
    reference = reference_runner(settings, meta["model"])
    candidate = runner_for(plan_path, meta)
    reference.activate()
    try:
        if is_reference and segmentation:
            verdict: dict[str, Any] = {"passed": True, "reference": True, "failures": [], "thresholds": {},
                       "metrics": {}, "checked_at": dt.datetime.now(dt.timezone.utc)
                       .isoformat(timespec="seconds")}
        elif is_reference:
            # The fp32 ONNX on ORT's CPU EP *is* the reference; record its own metrics where a
            # labelled sample exists, and pass by definition.
            verdict = {"passed": True, "reference": True, "failures": [], "thresholds": {},
                       "checked_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "metrics": {}}
            try:
                used_as_of, table = gate_mod.holdout_sample(settings, as_of, rows, model=meta["model"])
            except samples.SampleError as exc:
                verdict["note"] = f"no labelled sample for metrics: {exc}"
            else:
                batches = samples.feed_batches(table, settings.features.max_tokens)
                probs = gate_mod.run_batches(reference, batches, table.num_rows)
                verdict["metrics"] = {"rows": table.num_rows,
                                      "heads": gate_mod.head_metrics(probs, samples.labels(table))}
                verdict["as_of"] = used_as_of
        else:
            candidate.activate()
            try:
                if segmentation:
                    verdict = gate_mod.segmentation_gate(card, reference, candidate, meta["precision"])
                else:
                    verdict = gate_mod.gate(settings, reference, candidate, meta["precision"], as_of,
                                            rows, model=meta["model"])
            finally:
                candidate.deactivate()
    finally:
        reference.deactivate()
    with _build_lock(plan_path):
        meta = read_metadata(plan_path)
        meta["gate"] = verdict
        _write_json_atomic(metadata_path(plan_path), meta)
    return verdict


def ensure(settings: Settings, model: str = "emr_risk", backend: str | None = None,
           precision: str | None = None, as_of: str | None = None, rebuild: bool = False) -> Path:
    """Build and gate whatever is missing or stale for (model, backend, precision) here; return the plan path.

    A cached plan that fails verification (corrupted, other platform or
    backend version) raises EngineCacheError unless ``rebuild``. A TensorRT
    plan built on a machine without a usable GPU stays ungated (its gate runs
    where it can execute).
    """
    spec = resolve(settings, model, backend, precision)
    if spec.components.get("graph") == "fused" and settings.engines.graph == "auto":
        try:
            return _ensure(settings, spec, model, as_of, rebuild)
        except Exception as exc:  # noqa: BLE001 - any failure of the faster graph falls back, said why
            log.warning("fused %s engine for %s unavailable here (%s); falling back to the reference graph",
                        spec.precision, model, f"{type(exc).__name__}: {exc}"[:300])
            spec = resolve(settings, model, backend, precision, graph="reference")
    return _ensure(settings, spec, model, as_of, rebuild)


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
                with _build_lock(path):
                    _write_json_atomic(metadata_path(path), meta)
                return path
        verdict = gate_plan(settings, path, as_of)
        if graph == "fused" and not verdict.get("passed"):
            raise EngineCacheError(f"fused engine {path.name} failed its gate: "
                                   + "; ".join(verdict.get("failures", [])))
    elif graph == "fused" and meta["gate"].get("passed") is False:
        raise EngineCacheError(f"fused engine {path.name} failed its gate")
    return path


def load_runner(settings: Settings, model: str = "emr_risk", backend: str | None = None,
                precision: str | None = None, force_ungated: bool = False,
                providers: list[str] | None = None) -> tuple[Runner, dict[str, Any]]:
    """The runner (not yet activated) and metadata of the cached, verified, gated engine.

    Refuses engines that are missing, fail verification, or have not passed
    their gate (unless ``force_ungated``), naming the command that fixes it.
    """
    spec = resolve(settings, model, backend, precision, providers)
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
