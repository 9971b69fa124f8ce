"""CT nodule scoring on Ray Data: DICOM series → findings with provenance.

    series (LAKE/imaging/series, eligible, study date ≤ as-of)
      → PrepareSeries    CPU task: read (pydicom) → 1 mm isotropic → window [0, 1]
      → SegmentSeries    engine actor: patches in large batches → engine → overlap blending
      → FindNodules      CPU task: connected components → findings (LPS mm)
      → LAKE/findings/model=ct_nodule/as_of=D/ (atomic), LAKE/runs/<run_id>/

One series travels as one row, so at most one series' voxels are in flight per
task. Patches are cut inside the actor, as views of the windowed volume,
because moving a volume costs several times less than moving its overlapping
patches (with the default stride each voxel sits in ~8 patches); the actor
feeds them to the engine in batches of the card's optimal profile batch and
blends each batch into the volume as it comes back, so the patch set of a
series is never materialised. A series that cannot become a volume is
counted in the ledger with its reason code (``SeriesError.reason``); an engine
failure fails the run.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conf.settings import Settings
from engines.runner import Runner
from inference import qc
from inference.actors import engine_actor_pool
from inference.patient_link import attach_patients, link_counts, read_link
from lake import result_store
from lake.archive import Archive, imaging_archive
from lake.commit import atomic_partition, is_committed, partition_files, read_manifest
from lake.files import write_json_atomic as write_json
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.ledger import LedgerImbalance, StageLedger, write_ledger
from lake.locks import partition_lock
from lake.paths import TRIAL, LakePaths, as_of_str, is_trial_run
from lake.runs import new_run_id
from lake.schemas import FINDINGS
from preprocessing.components import find_components
from preprocessing.patches import extract_patches, pad_to_grid, patch_grid
from preprocessing.stitching import Stitcher

log = logging.getLogger(__name__)

MODEL = "ct_nodule"
STAGE = "score_ct"

# Columns of LAKE/imaging/series this stage reads (written by jobs.dicom_index).
COL_SERIES = "series_key"
COL_STUDY = "study_key"
COL_PATIENT = "patient_key"    # the EMR patient, from LAKE/imaging/patient_link (NULL: unlinked)
COL_DATE = "study_date"
COL_VERDICT = "verdict"
COL_FILES = "paths"
ELIGIBLE = "eligible"

# Ledger reasons for series this stage deliberately does not score (counted, never silent).
IGNORED_NOT_ELIGIBLE = "not_eligible"
IGNORED_AFTER_AS_OF = "study_after_as_of"
IGNORED_NO_DATE = "study_date_missing"
# Eligible series past a --limit (smoke runs): the first N by series_key are scored.
IGNORED_BEYOND_LIMIT = "beyond_limit"

STATUS_OK = "ok"
# Reason codes of series that failed between the index and the findings.
REASON_UNEXPECTED = "preprocessing_error"


class EngineSource(Protocol):
    """Where actors get their engine: ``load`` returns a runner (not yet activated) and its metadata."""

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]: ...


@dataclass(frozen=True)
class CachedEngine:
    """The engine cache (:mod:`engines.cache`) for ct_nodule: gated engines only, unless forced."""

    settings: Settings
    backend: str | None = None
    force_ungated: bool = False

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]:
        from engines import cache

        return cache.load_runner(self.settings, model=MODEL, backend=self.backend,
                                 precision=precision, force_ungated=self.force_ungated)


@dataclass(frozen=True)
class ReferenceEngine:
    """The card's fp32 ONNX itself on ONNX Runtime: the reference every candidate is gated against.

    Needs no gate (it is what gates compare to) and no build; the fingerprint
    names the exact artifact and runtime. ``intra_op_threads`` 0 = ORT's default.
    """

    settings: Settings
    intra_op_threads: int = 0

    def load(self, precision: str) -> tuple[Runner, dict[str, Any]]:
        import onnxruntime as ort

        from engines.model_card import load_card
        from engines.ort_runner import OrtRunner, default_providers

        if precision != "fp32":
            raise ValueError(f"the reference engine is fp32; precision {precision!r} needs a built engine "
                             "(`medscreen engines build --model ct_nodule`)")
        card = load_card(self.settings, MODEL)
        providers = default_providers()
        runner = OrtRunner(Path(card["onnx"]["file"]), providers=providers, name=f"onnxruntime:{MODEL}",
                           intra_op_threads=self.intra_op_threads)
        fingerprint = (f"onnxruntime-{ort.__version__}-{providers[0].replace('ExecutionProvider', '').lower()}"
                       f"-fp32-{card['onnx']['sha256'][:16]}")
        return runner, {"fingerprint": fingerprint, "precision": "fp32", "backend": "onnxruntime"}


def default_source(settings: Settings, force_ungated: bool = False) -> EngineSource:
    """fp32 on ONNX Runtime scores with the reference ONNX itself; anything else with a cached, gated engine."""
    if settings.engines.backend == "onnxruntime" and settings.engines.precision == "fp32":
        return ReferenceEngine(settings)
    return CachedEngine(settings, backend=settings.engines.backend, force_ungated=force_ungated)


# ------------------------------------------------------- per-series results

# Per-series results, kept across runs: LAKE/imaging/scored_series/model=M/<config>/<series>.<content>.json
SERIES_RESULTS = "imaging/scored_series"
# Result fields stored per series (the Ray row minus the volumes).
_STORED = (COL_SERIES, COL_STUDY, COL_PATIENT, "status", "reason", "findings", "engine_fingerprint",
           "precision", "read_s", "resample_s", "patch_s", "engine_s", "stitch_s", "components_s",
           "patches", "components", "dropped_small")


def series_content_key(row: dict[str, Any], archive: Archive | None = None) -> str:
    """What a series' result depends on in the archive: its keys and every file's path, size and
    mtime (a file added, removed or rewritten changes it; no pixel data is read).

    ``archive`` resolves the index's keyed relative paths to the files (None: paths as written).
    """
    h = hashlib.sha256(f"{row[COL_SERIES]}\0{row[COL_STUDY]}\0{row[COL_PATIENT]}\n".encode())
    for path in row[COL_FILES] or []:
        try:
            st = (archive.resolve(path) if archive is not None else Path(path)).stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:24]


def series_result_path(store: Path, series_key: str, content_key: str) -> Path:
    """Where the result of one series, as its files are now, is stored."""
    return Path(store) / f"{series_key}.{content_key}.json"


def _config_key(card: dict[str, Any], engine_meta: dict[str, Any], precision: str, settings: Settings) -> str:
    """Engine, model and every imaging setting a series' findings depend on."""
    im = settings.imaging
    parts = {"onnx": card["onnx"]["sha256"], "engine": engine_meta.get("fingerprint"), "precision": precision,
             "patch_size": list(im.patch_size), "stride": list(im.patch_stride),
             "spacing_mm": im.target_spacing_mm, "window_hu": list(im.window_hu),
             "threshold": im.probability_threshold, "min_volume_mm3": im.min_finding_volume_mm3,
             "gantry_tilt": str(im.gantry_tilt), "min_slices": im.min_slices}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store_result(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: row.get(k) for k in _STORED}, default=str))
    os.replace(tmp, path)


# ---------------------------------------------------------------- selection

def select_series(lake: LakePaths, as_of: str) -> tuple[pa.Table, dict[str, int], int]:
    """Eligible series with a study date on or before ``as_of``, with the EMR ``patient_key``
    and ``link_status`` of LAKE/imaging/patient_link.

    Returns (selected rows, counts ignored by rule, rows in the index). Raises
    FileNotFoundError naming the table when the index or the link was never committed.
    """
    path = lake.dicom_series
    if not is_committed(path):
        raise FileNotFoundError(f"series index {path} is not committed; run `medscreen dicom index` first")
    files = partition_files(path)  # one version of the index, resolved once
    columns = [COL_SERIES, COL_STUDY, COL_DATE, COL_VERDICT, COL_FILES]
    table = pq.read_table([str(f) for f in files], columns=columns, partitioning=None) if files else \
        pa.table({c: pa.array([], pa.string()) for c in columns})
    total = table.num_rows
    date = table.column(COL_DATE)
    if not pa.types.is_date(date.type):
        date = pc.cast(pc.cast(date, pa.string()), pa.date32())
    cutoff = pa.scalar(dt.date.fromisoformat(as_of), pa.date32())
    eligible = pc.equal(table.column(COL_VERDICT), ELIGIBLE)
    eligible = pc.fill_null(eligible, False)
    has_date = pc.is_valid(date)
    on_time = pc.fill_null(pc.less_equal(date, cutoff), False)
    keep = pc.and_(pc.and_(eligible, has_date), on_time)
    ignored = {
        IGNORED_NOT_ELIGIBLE: int(pc.sum(pc.invert(eligible)).as_py() or 0),
        IGNORED_NO_DATE: int(pc.sum(pc.and_(eligible, pc.invert(has_date))).as_py() or 0),
        IGNORED_AFTER_AS_OF: int(pc.sum(pc.and_(pc.and_(eligible, has_date), pc.invert(on_time))).as_py() or 0),
    }
    selected = table.filter(keep).select([COL_SERIES, COL_STUDY, COL_FILES])
    # Sorted so every rerun sees the series in the same order.
    selected = attach_patients(selected.sort_by([(COL_SERIES, "ascending")]), read_link(lake))
    return selected, {k: v for k, v in ignored.items() if v}, total


# ---------------------------------------------------------------- the three callables

def _nd_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


class PrepareSeries:
    """Ray Data batch fn (CPU task): series rows in, one windowed 1 mm volume per row out."""

    def __init__(self, target_spacing_mm: float, window_hu: tuple[float, float],
                 gantry_tilt: str = "correct", min_slices: int = 2, archive: Archive | None = None):
        self.archive = archive  # keyed relative paths are resolved here, in the read task
        self.target_spacing_mm = float(target_spacing_mm)
        self.window_hu = tuple(window_hu)
        self.gantry_tilt = gantry_tilt
        self.min_slices = int(min_slices)

    def __call__(self, rows: pa.Table) -> pa.Table:
        from preprocessing.dicom_series import SeriesError, load_volume
        from preprocessing.resample import resample_to_spacing, window_to_unit

        out: list[dict[str, Any]] = []
        for row in rows.to_pylist():
            rec = {COL_SERIES: row[COL_SERIES], COL_STUDY: row[COL_STUDY], COL_PATIENT: row[COL_PATIENT],
                   "status": STATUS_OK, "reason": None, "detail": None, "image": b"",
                   "shape": [0, 0, 0], "affine": [0.0] * 16, "spacing_mm": [0.0] * 3,
                   "read_s": 0.0, "resample_s": 0.0}
            t0 = time.perf_counter()
            try:
                files = list(row[COL_FILES] or [])
                vol = load_volume(self.archive.resolve_all(files) if self.archive else files,
                                  gantry_tilt=self.gantry_tilt, min_slices=self.min_slices)
                t1 = time.perf_counter()
                vol = resample_to_spacing(vol, self.target_spacing_mm)
                image = window_to_unit(vol.hu, self.window_hu)
                t2 = time.perf_counter()
            except SeriesError as exc:
                # The message can name files; keep only the reason code in the output.
                rec.update(status="failed", reason=exc.reason, detail=exc.reason)
                out.append(rec)
                continue
            except (OSError, ValueError, MemoryError) as exc:
                rec.update(status="failed", reason=REASON_UNEXPECTED, detail=type(exc).__name__)
                out.append(rec)
                continue
            rec.update(image=_nd_bytes(image.astype(np.float32)), shape=list(image.shape),
                       affine=[float(v) for v in vol.affine_zyx_to_lps.ravel()],
                       spacing_mm=list(vol.spacing_mm), read_s=t1 - t0, resample_s=t2 - t1)
            out.append(rec)
        return pa.Table.from_pylist(out, schema=PREPARED)


PREPARED = pa.schema([
    (COL_SERIES, pa.string()), (COL_STUDY, pa.string()), (COL_PATIENT, pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("image", pa.large_binary()), ("shape", pa.list_(pa.int64())), ("affine", pa.list_(pa.float64())),
    ("spacing_mm", pa.list_(pa.float64())), ("read_s", pa.float64()), ("resample_s", pa.float64()),
])


def segment_volume(runner: Runner, image: np.ndarray, patch_size: tuple[int, int, int],
                   stride: tuple[int, int, int], batch_patches: int,
                   timings: dict[str, float] | None = None) -> np.ndarray:
    """Sliding-window segmentation of one windowed volume with ``runner`` (batched patches).

    The probability volume (float32, same shape) is blended with
    :class:`preprocessing.stitching.Stitcher` batch by batch.
    """
    t = timings if timings is not None else {}
    grid = patch_grid(image.shape, patch_size, stride)  # type: ignore[arg-type]
    stitcher = Stitcher(grid)
    t0 = time.perf_counter()
    padded = pad_to_grid(image, grid)
    t["patch_s"] = t.get("patch_s", 0.0) + (time.perf_counter() - t0)
    for start in range(0, len(grid), batch_patches):
        idx = range(start, min(start + batch_patches, len(grid)))
        t0 = time.perf_counter()
        patches = extract_patches(padded, grid, idx)[:, None]
        t1 = time.perf_counter()
        prob = runner.infer({"image": patches})["prob"]
        t2 = time.perf_counter()
        stitcher.add(prob, idx)
        t3 = time.perf_counter()
        t["patch_s"] = t.get("patch_s", 0.0) + (t1 - t0)
        t["engine_s"] = t.get("engine_s", 0.0) + (t2 - t1)
        t["stitch_s"] = t.get("stitch_s", 0.0) + (t3 - t2)
        t["patches"] = t.get("patches", 0) + len(idx)
    t0 = time.perf_counter()
    out = stitcher.result()
    t["stitch_s"] = t.get("stitch_s", 0.0) + (time.perf_counter() - t0)
    return out


class SegmentSeries:
    """Holds one activated engine (``__init__`` loads it once); ``__call__`` segments each prepared series.

    Probabilities leave the actor as float16: they are only thresholded and
    averaged downstream, and half the bytes move through the object store.
    """

    def __init__(self, source: EngineSource, precision: str, patch_size: tuple[int, int, int],
                 stride: tuple[int, int, int], batch_patches: int):
        self.runner, self.metadata = source.load(precision)
        self.runner.activate()
        self.patch_size = tuple(patch_size)
        self.stride = tuple(stride)
        self.batch_patches = int(batch_patches)

    def __call__(self, block: pa.Table) -> pa.Table:
        probs, engine_s, patch_s, stitch_s, patches = [], [], [], [], []
        for row in block.select(["status", "image", "shape"]).to_pylist():
            if row["status"] != STATUS_OK:
                probs.append(b"")
                engine_s.append(0.0), patch_s.append(0.0), stitch_s.append(0.0), patches.append(0)
                continue
            image = np.frombuffer(row["image"], dtype=np.float32).reshape(row["shape"])
            t: dict[str, float] = {}
            prob = segment_volume(self.runner, image, self.patch_size, self.stride,  # type: ignore[arg-type]
                                  self.batch_patches, t)
            probs.append(_nd_bytes(prob.astype(np.float16)))
            engine_s.append(t["engine_s"]), patch_s.append(t["patch_s"])
            stitch_s.append(t["stitch_s"]), patches.append(int(t["patches"]))
        n = block.num_rows
        block = block.drop_columns(["image"])
        for name, values, typ in (("prob", probs, pa.large_binary()), ("engine_s", engine_s, pa.float64()),
                                  ("patch_s", patch_s, pa.float64()), ("stitch_s", stitch_s, pa.float64()),
                                  ("patches", patches, pa.int64()),
                                  ("engine_fingerprint", [self.metadata["fingerprint"]] * n, pa.string()),
                                  ("precision", [self.metadata["precision"]] * n, pa.string())):
            block = block.append_column(name, pa.array(values, typ))
        return block

    def __del__(self) -> None:
        runner = getattr(self, "runner", None)
        if runner is not None:
            try:
                runner.deactivate()
            except Exception:  # noqa: BLE001 — best effort at interpreter teardown
                pass


class FindNodules:
    """Ray Data batch fn (CPU task): probability volumes in, one summary row per series out."""

    def __init__(self, threshold: float, min_volume_mm3: float):
        self.threshold = float(threshold)
        self.min_volume_mm3 = float(min_volume_mm3)

    def __call__(self, block: pa.Table) -> pa.Table:
        findings_json, components, dropped, comp_s = [], [], [], []
        for row in block.select(["status", "prob", "shape", "affine", "spacing_mm"]).to_pylist():
            if row["status"] != STATUS_OK:
                findings_json.append("[]"), components.append(0), dropped.append(0), comp_s.append(0.0)
                continue
            t0 = time.perf_counter()
            prob = np.frombuffer(row["prob"], dtype=np.float16).reshape(row["shape"])
            summary = find_components(prob, tuple(row["spacing_mm"]),  # type: ignore[arg-type]
                                      np.asarray(row["affine"]).reshape(4, 4),
                                      self.threshold, self.min_volume_mm3)
            findings_json.append(json.dumps([
                {"finding_id": f.finding_id, "centre_lps_mm": list(f.centre_lps_mm),
                 "diameter_mm": f.diameter_mm, "volume_mm3": f.volume_mm3,
                 "max_prob": f.max_prob, "mean_prob": f.mean_prob} for f in summary.findings]))
            components.append(summary.components)
            dropped.append(summary.dropped_small)
            comp_s.append(time.perf_counter() - t0)
        block = block.drop_columns(["prob"])
        for name, values, typ in (("findings", findings_json, pa.string()), ("components", components, pa.int64()),
                                  ("dropped_small", dropped, pa.int64()), ("components_s", comp_s, pa.float64())):
            block = block.append_column(name, pa.array(values, typ))
        return block


# ---------------------------------------------------------------- pipeline

def build_pipeline(series: pa.Table, settings: Settings, source: EngineSource, precision: str,
                   batch_patches: int, num_actors: int, actor_resources: dict[str, float],
                   archive: Archive | None = None):
    """The Ray Data pipeline, read top to bottom; nothing runs until it is consumed."""
    import ray.data

    im = settings.imaging
    ds = ray.data.from_arrow(series)
    # One series per block: each read task holds one series, and blocks spread over tasks.
    ds = ds.repartition(max(1, series.num_rows))
    ds = ds.map_batches(PrepareSeries(im.target_spacing_mm, im.window_hu, im.gantry_tilt, im.min_slices, archive),
                        batch_size=1, batch_format="pyarrow", num_cpus=1)
    # Actors sharing a GPU: one patches and stitches its series on the host while
    # another's patches run on the device (inference.actors.engine_actor_pool).
    ds = ds.map_batches(SegmentSeries, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        fn_constructor_args=(source, precision, tuple(im.patch_size), tuple(im.patch_stride),
                                             batch_patches),
                        **actor_resources)
    ds = ds.map_batches(FindNodules(im.probability_threshold, im.min_finding_volume_mm3),
                        batch_size=1, batch_format="pyarrow", num_cpus=0.5)
    return ds


def _ensure_ray(settings: Settings) -> bool:
    """Connect to the configured cluster or start a local instance; True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(address=settings.ray.address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    return True


def _card_patch_check(card: dict[str, Any], settings: Settings) -> int:
    """The engine batch size; refuse a patch size the model was not exported for."""
    inputs = card.get("inputs") or []
    shape = list(inputs[0]["shape"]) if inputs else []
    patch = list(settings.imaging.patch_size)
    if len(shape) != 5 or [int(v) for v in shape[2:]] != patch:
        raise ValueError(f"imaging.patch_size {tuple(patch)} does not match the ct_nodule model's input "
                         f"{shape} (card {card.get('card_file')}); set imaging.patch_size to the model's "
                         "patch or re-export the model")
    prof = (card.get("profiles") or {}).get("batch") or {}
    return int(prof.get("opt", 8))


def score(settings: Settings, as_of: str, force_ungated: bool = False, run_id: str | None = None,
          source: EngineSource | None = None, limit: int | None = None, *, full: bool = False,
          lock_wait_s: float = 0.0) -> Path:
    """Score every eligible CT series with a study on or before ``as_of``; return the run directory.

    Writes findings atomically to ``LAKE/findings/model=ct_nodule/as_of=D/``
    (a rerun replaces the partition) and ``manifest.json``, ``ledger.json``
    (series in = scored + failed-with-reason + ignored by rule) and
    ``metrics.json`` (volumes/min, stage times) under ``LAKE/runs/<run_id>/``.
    Raises LedgerImbalance when series were lost.

    The engine: fp32 on ONNX Runtime scores with the card's ONNX itself (the
    reference; nothing to build or gate); any other backend/precision comes
    from the engine cache and must have passed its Dice gate unless
    ``force_ungated`` (``medscreen engines ensure --model ct_nodule``).
    ``source`` overrides both (benchmarks, tests).

    ``limit`` (smoke runs) scores only the first ``limit`` selected series by
    series_key; the rest are counted in the ledger as ignored ``beyond_limit``
    and the manifests record the limit and how many series were available.

    Incremental and resumable at series granularity: each series' result is
    stored as soon as it is scored (:func:`series_result_path`, keyed by the
    series' files and the engine and settings), and a later run — the next
    night, or a retry of a run that was killed — scores only series without a
    stored result, reusing the rest; ``full=True`` re-scores every series.
    Limited and forced-ungated runs write under the trial namespace. The run
    holds the findings partition's lock (waiting up to ``lock_wait_s``).
    """
    from engines.model_card import load_card

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1 series, got {limit}")
    as_of = as_of_str(as_of)
    run_id = run_id or new_run_id(STAGE)
    final = LakePaths(settings.lake.root).findings(MODEL, as_of, trial=is_trial_run(limit, force_ungated))
    with partition_lock(final, run_id, wait_s=lock_wait_s), contextlib.ExitStack() as held:
        run_dir = _score(settings, as_of, force_ungated, run_id, source, limit, full, final, held)
    # Stored results of series that changed and of retired configurations, unused for the retention
    # period; never a configuration a run holds (this one released its own above).
    result_store.collect_garbage(LakePaths(settings.lake.root).root / SERIES_RESULTS / f"model={MODEL}",
                                 settings.imaging.scored_series_retention_days * 86400.0)
    return run_dir


def _score(settings: Settings, as_of: str, force_ungated: bool, run_id: str, source: EngineSource | None,
           limit: int | None, full: bool, final: Path, held: contextlib.ExitStack) -> Path:
    from engines.model_card import load_card

    t_start = time.perf_counter()
    lake = LakePaths(settings.lake.root)
    key_fp = stage_key_fingerprint(settings.pseudonym, lake.root, {
        name: read_manifest(path) for name, path in (("imaging/series", lake.dicom_series),
                                                     ("imaging/patient_link", lake.imaging_link))
        if is_committed(path)})
    run_dir = lake.run(run_id)
    card = load_card(settings, MODEL)
    batch_patches = _card_patch_check(card, settings)
    precision = settings.engines.precision
    source = source or default_source(settings, force_ungated)

    # Resolve the engine here, before any Ray work: a missing or ungated engine is a
    # clear error from the cache, not an actor that dies in its constructor.
    _, engine_meta = source.load(precision)

    series, ignored, total = select_series(lake, as_of)
    archive = imaging_archive(settings)  # before Ray: a wrong key or root fails here, once
    available = series.num_rows
    if limit is not None and available > limit:
        series = series.slice(0, limit)  # select_series sorts by series_key: the same N every time
        ignored[IGNORED_BEYOND_LIMIT] = available - limit
    ledger = StageLedger(STAGE, records_in=total, ignored=dict(ignored), unit="series")

    store = lake.root / SERIES_RESULTS / f"model={MODEL}" / _config_key(card, engine_meta, precision, settings)
    held.enter_context(result_store.holding(store))  # the store's collector skips what this run uses
    keys = {r[COL_SERIES]: series_content_key(r, archive) for r in series.to_pylist()}
    results: list[dict[str, Any]] = []
    if not full:
        for key, content in keys.items():
            stored = series_result_path(store, key, content)
            if stored.is_file():
                results.append({**json.loads(stored.read_text()), "reused": True})
                result_store.touch(stored)
    reused = {r[COL_SERIES] for r in results}
    pending = series.filter(pc.invert(pc.is_in(series.column(COL_SERIES), pa.array(sorted(reused), pa.string()))))
    log.info("ct scoring %s: %d series selected, %d reused from earlier runs, %d to score%s", run_id,
             series.num_rows, len(reused), pending.num_rows, " (full re-score)" if full else "")

    started_ray = _ensure_ray(settings) if pending.num_rows else False
    use_gpu, num_actors, pipe_s = False, 0, 0.0
    try:
        t_pipe = time.perf_counter()
        if pending.num_rows:
            import ray

            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = gpus >= 1
            num_actors, actor_resources = engine_actor_pool(settings, gpus)
            ds = build_pipeline(pending, settings, source, precision, batch_patches, num_actors, actor_resources,
                                archive)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.drop_columns([c for c in ("shape", "affine", "spacing_mm")
                                             if c in batch.column_names]).to_pylist():
                    # Stored at once: a run killed after this point does not score the series again.
                    _store_result(series_result_path(store, r[COL_SERIES], keys[r[COL_SERIES]]), r)
                    results.append({**r, "reused": False})
        pipe_s = time.perf_counter() - t_pipe
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    results.sort(key=lambda r: r[COL_SERIES])
    rows: list[dict[str, Any]] = []
    quarantined: dict[str, int] = {}
    fingerprints = {r["engine_fingerprint"] for r in results if r["status"] == STATUS_OK}
    precisions = {r["precision"] for r in results if r["status"] == STATUS_OK}
    for r in results:
        if r["status"] != STATUS_OK:
            quarantined[r["reason"]] = quarantined.get(r["reason"], 0) + 1
            continue
        for f in json.loads(r["findings"]):
            x, y, z = f["centre_lps_mm"]
            rows.append({COL_SERIES: r[COL_SERIES], COL_STUDY: r[COL_STUDY], COL_PATIENT: r[COL_PATIENT],
                         "as_of": dt.date.fromisoformat(as_of), "finding_id": f["finding_id"],
                         "centre_x_mm": x, "centre_y_mm": y, "centre_z_mm": z,
                         "diameter_mm": f["diameter_mm"], "volume_mm3": f["volume_mm3"],
                         "max_prob": f["max_prob"], "mean_prob": f["mean_prob"], "model": MODEL,
                         "model_version": str(card["version"]), "engine_fingerprint": r["engine_fingerprint"],
                         "precision": r["precision"], "run_id": run_id})
    ledger.records_out = sum(1 for r in results if r["status"] == STATUS_OK)
    ledger.quarantined = quarantined
    failed = [{"series_key": r[COL_SERIES], "reason": r["reason"]} for r in results if r["status"] != STATUS_OK]
    write_ledger(run_dir, ledger)
    if not ledger.balanced:
        raise LedgerImbalance(f"CT scoring run {run_id}: {ledger.records_in} series in the index, "
                              f"{ledger.records_out} scored, {ledger.quarantined_total} failed, "
                              f"{ledger.ignored_total} ignored by rule; see {run_dir / 'ledger.json'}")

    table = pa.Table.from_pylist(rows, schema=FINDINGS)
    manifest: dict[str, Any] = {
        "stage": STAGE, "run_id": run_id, "as_of": as_of, "model": MODEL, "model_version": str(card["version"]),
        "onnx_sha256": card["onnx"]["sha256"], "engine_fingerprints": sorted(fingerprints),
        "precisions": sorted(precisions), "series_scored": ledger.records_out,
        "series_failed": ledger.quarantined_total, "findings": table.num_rows,
        # A smoke run says so: the limit and how many series a full run would have scored.
        "limit": limit, "series_available": available,
        # Scored series by link to an EMR patient: unlinked ones keep findings with patient_key NULL.
        "patient_link": link_counts(series),
        "settings": {"patch_size": list(settings.imaging.patch_size),
                     "patch_stride": list(settings.imaging.patch_stride),
                     "target_spacing_mm": settings.imaging.target_spacing_mm,
                     "window_hu": list(settings.imaging.window_hu),
                     "probability_threshold": settings.imaging.probability_threshold,
                     "min_finding_volume_mm3": settings.imaging.min_finding_volume_mm3,
                     "batch_patches": batch_patches},
        "forced_ungated": bool(force_ungated),
        "engine": {k: engine_meta.get(k) for k in ("fingerprint", "precision", "backend")},
        KEY_FIELD: key_fp,
    }
    verdict = qc.evaluate_ct(table, ledger.records_out, ledger.quarantined_total, settings.imaging.qc)
    manifest["qc_passed"] = verdict["passed"]
    manifest["series_reused"] = len(reused)
    manifest["series_scored_this_run"] = len(results) - len(reused)
    manifest["full_rescore"] = bool(full)
    manifest["trial"] = final.is_relative_to(lake.root / TRIAL)
    if verdict["passed"]:
        with atomic_partition(final, manifest, run_id=run_id) as staging:
            pq.write_table(table, staging / "part-00000.parquet")

    wall_s = time.perf_counter() - t_start
    stage_s = {k: round(sum(float(r.get(k) or 0.0) for r in results), 4)
               for k in ("read_s", "resample_s", "patch_s", "engine_s", "stitch_s", "components_s")}
    metrics = {"series": series.num_rows, "series_scored": ledger.records_out, "findings": table.num_rows,
               "patches": int(sum(int(r.get("patches") or 0) for r in results)),
               "wall_s": round(wall_s, 3), "pipeline_s": round(pipe_s, 3),
               "volumes_per_min": round(ledger.records_out / (pipe_s / 60.0), 3) if pipe_s > 0 else None,
               "stage_s": stage_s, "use_gpu": use_gpu, "num_actors": num_actors,
               "batch_patches": batch_patches, "failed": failed, "qc": verdict,
               "patient_link": manifest["patient_link"],
               "series_reused": len(reused), "series_scored_this_run": len(results) - len(reused)}
    write_json(run_dir / "metrics.json", metrics)
    if not verdict["passed"]:
        # Nothing is committed: the previous findings of this as-of (if any) stay as they were.
        write_json(run_dir / "manifest.json", {**manifest, "status": "failed_qc"})
        qc.raise_if_failed(verdict, f"{MODEL} as-of {as_of} (run {run_id}; see {run_dir / 'metrics.json'})")
    write_json(run_dir / "manifest.json", {**manifest, "status": "ok", "output": str(final)})
    log.info("ct scoring %s: %d series scored, %d failed, %d findings in %.1fs", run_id,
             ledger.records_out, ledger.quarantined_total, table.num_rows, wall_s)
    return run_dir
