"""Engine cache, the key role: which entry (model, backend, precision, platform) the settings call for,
where it lives, and its JSON sidecar (read, written atomically, locked while written).

Key = sha256 over (model, source graph and its ONNX sha256, backend, backend
module + version, platform id (GPU model + compute capability, or
"cpu"/"cpu-aot"), precision, optimisation profiles, and for int8 the
calibration method and size).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conf.settings import Settings
from engines import hardware
from engines.model_card import load_card, profiles as card_profiles
from engines.runner import PRECISIONS
from lake.files import write_json_atomic
from lake.locks import hold

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tensorrt", "inductor")
# engines.backend may also be "auto": see backend_candidates.
AUTO = "auto"
# Models the inductor backend can export (it needs the torch model definition and weights).
INDUCTOR_MODELS = ("emr_risk",)
METADATA_FORMAT = 1
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
    if backend == "inductor":
        from engines.inductor_runner import torch_identity

        return torch_identity()
    raise ValueError(f"backend {backend!r} unknown; use one of {BACKENDS}")


def iter_backend_candidates(settings: Settings, model: str, backend: str | None = None) -> Iterator[str]:
    """The backends to try for ``model``, best first, lazily; more than one only for ``auto``.

    ``auto``: for emr_risk on a machine where torch sees a CUDA GPU, ONNX Runtime (the card's
    fused graph), then the inductor plan where ONNX Runtime cannot be built or fails its gate;
    ONNX Runtime alone everywhere else (CPU machines, CT). Any other value is that backend alone.
    ONNX Runtime comes first by measurement: on one H200 at 4 M rows (one threaded actor) the
    scoring run reached 219 k records/s with it and 108 k with the inductor plan. The inductor
    actor now loads its compile artefacts (5/5 hits) but still takes 20 s to start (importing
    torch and starting CUDA to find the plan 5 s, importing torch._dynamo 5 s, loading the
    program 2 s, five shapes 5.5 s) against ORT's 0.5 s, and inside the pipeline its device rate
    (337 k) is no better than ORT's (333 k), although alone it runs 625 k against 424 k
    (docs/benchmarks.md, "threaded engine actor").
    ``engines.backend: inductor`` chooses it.
    """
    backend = backend or settings.engines.backend
    if backend != AUTO:
        yield backend
        return
    yield "onnxruntime"
    # Asked only when ONNX Runtime's entries could not be used: asking imports torch and starts CUDA
    # (5-6 s in a fresh Ray actor on an H200), which a scoring actor loading the ORT plan never needs.
    from engines.inductor_runner import cuda_available

    if model in INDUCTOR_MODELS and cuda_available():
        yield "inductor"


def backend_candidates(settings: Settings, model: str, backend: str | None = None) -> list[str]:
    """All of :func:`iter_backend_candidates` (this asks whether torch sees a GPU)."""
    return list(iter_backend_candidates(settings, model, backend))


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
    backend = next(iter_backend_candidates(settings, model, backend))
    precision = precision or settings.engines.precision
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} unknown; use one of {BACKENDS}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} unknown; use one of {PRECISIONS}")
    card = card or load_card(settings, model)
    if backend == "inductor":
        return _resolve_inductor(settings, model, precision, card)
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


def plan_candidates(settings: Settings, model: str = "emr_risk", backends: Iterable[str] | None = None,
                    precision: str | None = None, providers: list[str] | None = None) -> list[EngineSpec]:
    """Every entry of :func:`iter_plan_candidates` (this resolves every backend, torch's included)."""
    return list(iter_plan_candidates(settings, model, backends, precision, providers))


def iter_plan_candidates(settings: Settings, model: str = "emr_risk", backends: Iterable[str] | None = None,
                         precision: str | None = None, providers: list[str] | None = None
                         ) -> Iterator[EngineSpec]:
    """The cache entries to try for ``model`` here, best first: what ``ensure`` builds and ``load_runner``
    loads, in one order, so a load always finds the plan an ensure fell back to.

    Lazy: a later backend is asked for (and resolved: the inductor entry imports torch) only when the
    caller goes past the entries before it. ``backends`` defaults to :func:`iter_backend_candidates`
    of the configured backend. For each backend, its entry; under ``engines.graph: auto`` an ONNX
    Runtime fused-graph entry is followed by the reference-graph entry of the same precision. A
    backend that cannot make an entry for this model or precision (the inductor backend asked for
    int8) is left out with its reason logged, unless it is the only one.
    """
    backends = iter(backends) if backends is not None else iter_backend_candidates(settings, model)
    card = load_card(settings, model)
    tried: list[str] = []
    errors: list[EngineCacheError] = []
    for backend in backends:
        tried.append(backend)
        try:
            spec = resolve(settings, model, backend, precision, providers, card)
        except EngineCacheError as exc:
            errors.append(exc)
            log.warning("%s engine for %s left out of the candidates (%s)", backend, model, exc)
            continue
        yield spec
        if spec.components.get("graph") == "fused" and settings.engines.graph == AUTO:
            yield resolve(settings, model, backend, precision, providers, card, graph="reference")
    if len(errors) == len(tried):  # nothing was yielded
        if len(errors) == 1:
            raise errors[0]
        raise EngineCacheError(f"no backend of {tried} can make a {precision or settings.engines.precision} "
                               f"engine for {model}")


def describe_spec(spec: EngineSpec) -> str:
    """``onnxruntime fused fp16``: a candidate as logs name it."""
    graph = spec.components.get("graph")
    return " ".join(p for p in (spec.backend, graph if graph and graph != "reference" else None, spec.precision)
                    if p)


def _resolve_inductor(settings: Settings, model: str, precision: str, card: dict[str, Any]) -> EngineSpec:
    """The inductor entry: keyed by torch version, how it is compiled and run, platform, precision, the
    scoring shapes, the weights and the reference ONNX (whose calibration the plan's scores take)."""
    if model not in INDUCTOR_MODELS:
        raise EngineCacheError(f"the inductor backend exports {INDUCTOR_MODELS} only, not {model!r}; "
                               "use backend onnxruntime")
    if precision not in ("fp32", "fp16"):
        raise EngineCacheError(f"the inductor backend builds fp32 and fp16 plans, not {precision}; "
                               "use backend onnxruntime for int8")
    from engines.inductor_runner import COMPILE_RECIPES

    module, version = backend_identity("inductor")
    mode = settings.engines.inductor_compile
    platform = hardware.platform_for("inductor")
    components: dict[str, Any] = {
        "model": model, "onnx_sha256": card["onnx"]["sha256"], "backend": "inductor",
        "backend_module": module, "backend_version": version, "compile_recipe": COMPILE_RECIPES[mode],
        "compile_mode": mode,
        "platform": platform["id"], "precision": precision,
        "weights_sha256": (card.get("torch") or {}).get("sha256"),
        # The shapes scoring forms where this plan runs (its platform's token budget).
        "shapes": {"token_budget": settings.scoring.token_budget_for(platform["kind"] == "gpu"),
                   "length_buckets": sorted(set(int(b) for b in settings.scoring.length_buckets))}}
    key = cache_key(components)
    path = settings.engine_cache_dir / model / f"inductor-{precision}-{key[:16]}.pt2"
    return EngineSpec(model, "inductor", precision, components, key, path)


def compile_cache_path(plan_path: Path) -> Path:
    """The Inductor compile artefacts (Mega-Cache) beside an inductor plan."""
    return Path(str(plan_path) + ".inductor-cache")


def read_metadata(plan_path: Path) -> dict[str, Any]:
    """The sidecar metadata of a plan; FileNotFoundError naming it when absent."""
    meta = metadata_path(plan_path)
    if not meta.is_file():
        raise FileNotFoundError(f"engine metadata {meta} does not exist; {plan_path} is not a "
                                "cached engine (build one with `medscreen engines build`)")
    return json.loads(meta.read_text())


def write_metadata_file(path: Path, data: dict[str, Any]) -> None:
    """Replace a sidecar atomically (readers see the old or the new file, never half of one)."""
    write_json_atomic(path, data)


@contextlib.contextmanager
def plan_lock(plan_path: Path) -> Iterator[None]:
    """Held while a plan or its sidecar is written."""
    # Several actors or DAG tasks may ensure the same engine at once; one builds, the others wait
    # (the lake's one flock, holder recorded beside the plan).
    with hold(Path(str(plan_path) + ".lock"), f"engine-build-{os.getpid()}", math.inf,
              f"engine plan {plan_path.name}", reentrant=False):
        yield


