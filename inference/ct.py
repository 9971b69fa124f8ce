"""CT nodule scoring on Ray Data: DICOM series → findings with provenance.

    series (LAKE/imaging/series, eligible, study date ≤ as-of)
      → PrepareSeries    CPU tasks: read (pydicom) → 1 mm isotropic → window [0, 1]
      → SegmentSeries    engine actors: patches in large batches → engine → overlap blending
                         (on the GPU with CuPy where the engine runs on CUDA)
      → FindNodules      CPU tasks: connected components → findings (LPS mm)
      → LAKE/findings/model=ct_nodule/as_of=D/ (atomic), LAKE/runs/<run_id>/

The stages themselves are :mod:`inference.ct_stages`; this module selects the
series, builds the pipeline, reuses stored per-series results and commits. A
series that cannot become a volume is counted in the ledger with its reason
code (``SeriesError.reason``); an engine failure fails the run.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conf.settings import Settings
from engines.source import CachedEngine, EngineSource, ReferenceEngine
from inference import qc
from inference.actors import engine_actor_pool, ray_session
from inference.ct_stages import (COL_FILES, COL_PATIENT, COL_SERIES, COL_STUDY, GRID_MODEL, GRID_SCANNER,
                                 STATUS_OK, FindNodules,
                                 PrepareSeries, SegmentSeries, body_crop)
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

log = logging.getLogger(__name__)

MODEL = "ct_nodule"
STAGE = "score_ct"
# Engine actors per GPU unless ray.actors_per_gpu says: while one patches and stitches a series on the
# host, another's patches run (the CT defaults were measured with two, docs/benchmarks.md).
CT_ACTORS_PER_GPU = 2

# Columns of LAKE/imaging/series this stage reads beside inference.ct_stages' (written by jobs.dicom_index).
COL_DATE = "study_date"
COL_VERDICT = "verdict"
ELIGIBLE = "eligible"

# Ledger reasons for series this stage deliberately does not score (counted, never silent).
IGNORED_NOT_ELIGIBLE = "not_eligible"
IGNORED_AFTER_AS_OF = "study_after_as_of"
IGNORED_NO_DATE = "study_date_missing"
# Eligible series past a --limit (smoke runs): the first N by series_key are scored.
IGNORED_BEYOND_LIMIT = "beyond_limit"


def default_source(settings: Settings, force_ungated: bool = False) -> EngineSource:
    """fp32 on ONNX Runtime (which ``auto`` is for CT) scores with the reference ONNX itself; anything else
    with a cached, gated engine."""
    if settings.engines.backend in ("auto", "onnxruntime") and settings.engines.precision == "fp32":
        return ReferenceEngine(settings, MODEL)
    return CachedEngine(settings, MODEL, settings.engines.backend, force_ungated)


# ------------------------------------------------------- per-series results

# Per-series results, kept across runs: LAKE/imaging/scored_series/model=M/<config>/<series>.<content>.json
SERIES_RESULTS = "imaging/scored_series"
# Result fields stored per series (the Ray row minus the volumes).
_STORED = (COL_SERIES, COL_STUDY, COL_PATIENT, "status", "reason", "findings", "engine_fingerprint",
           "precision", "read_s", "resample_s", "patch_s", "engine_s", "stitch_s", "components_s",
           "patches", "components", "dropped_small", "arrays_on")


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
             "gantry_tilt": str(im.gantry_tilt), "min_slices": im.min_slices,
             "crop_to_body": [im.crop_to_body, im.body_threshold_hu, im.body_margin_mm]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store_result(path: Path, row: dict[str, Any]) -> None:
    write_json(path, {k: row.get(k) for k in _STORED}, indent=None)


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


# ---------------------------------------------------------------- pipeline

def build_pipeline(series: pa.Table, settings: Settings, source: EngineSource, precision: str,
                   batch_patches: tuple[int, int], num_actors: int, actor_resources: dict[str, float],
                   archive: Archive | None = None, ship: str = GRID_MODEL):
    """The Ray Data pipeline, read top to bottom; nothing runs until it is consumed.

    ``batch_patches``: (host batch, device maximum) patches per engine call. ``ship``: what the
    read tasks hand the engine actors — the windowed model input (GRID_MODEL) or, for actors on a
    GPU, the scanner grid as int16 (GRID_SCANNER; the actors resample, crop and window on the device).
    """
    import ray.data

    from preprocessing.ct_chain import to_model_input

    im = settings.imaging
    ds = ray.data.from_arrow(series)
    # One series per block: each read task holds one series, and blocks spread over tasks.
    ds = ds.repartition(max(1, series.num_rows))
    ds = ds.map_batches(PrepareSeries(im.target_spacing_mm, im.window_hu, im.gantry_tilt, im.min_slices, archive,
                                      body_crop(im), ship),
                        batch_size=1, batch_format="pyarrow", num_cpus=1)
    # Actors sharing a GPU: one patches and stitches its series on the host while
    # another's patches run on the device (inference.actors.engine_actor_pool).
    ds = ds.map_batches(SegmentSeries, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=num_actors),
                        fn_constructor_args=(source, precision, tuple(im.patch_size), tuple(im.patch_stride),
                                             *batch_patches, im.device_arrays,
                                             to_model_input(im.target_spacing_mm, im.window_hu, body_crop(im)),
                                             im.host_memory_budget_mb << 20),
                        **actor_resources)
    ds = ds.map_batches(FindNodules(im.probability_threshold, im.min_finding_volume_mm3),
                        batch_size=1, batch_format="pyarrow", num_cpus=0.5)
    return ds


def _card_patch_check(card: dict[str, Any], settings: Settings) -> tuple[int, int]:
    """The engine batch sizes (profile opt for the host path, profile max for the device path); refuse a
    patch size the model was not exported for."""
    inputs = card.get("inputs") or []
    shape = list(inputs[0]["shape"]) if inputs else []
    patch = list(settings.imaging.patch_size)
    if len(shape) != 5 or [int(v) for v in shape[2:]] != patch:
        raise ValueError(f"imaging.patch_size {tuple(patch)} does not match the ct_nodule model's input "
                         f"{shape} (card {card.get('card_file')}); set imaging.patch_size to the model's "
                         "patch or re-export the model")
    prof = (card.get("profiles") or {}).get("batch") or {}
    opt = int(prof.get("opt", 8))
    return opt, max(opt, int(prof.get("max", opt)))


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
    batch_patches, max_batch_patches = _card_patch_check(card, settings)
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

    use_gpu, num_actors, pipe_s = False, 0, 0.0
    if pending.num_rows:
        import ray

        with ray_session(settings):
            t_pipe = time.perf_counter()
            gpus = int(ray.cluster_resources().get("GPU", 0))
            use_gpu = gpus >= 1
            num_actors, actor_resources = engine_actor_pool(settings, gpus, CT_ACTORS_PER_GPU)
            # Read tasks resample on the host cores; with imaging.resample_on_device, actors on a GPU get
            # the scanner grid (int16) and resample on the device instead.
            ship = (GRID_SCANNER if use_gpu and settings.imaging.device_arrays == "auto"
                    and settings.imaging.resample_on_device else GRID_MODEL)
            ds = build_pipeline(pending, settings, source, precision, (batch_patches, max_batch_patches),
                                num_actors, actor_resources, archive, ship)
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                for r in batch.drop_columns([c for c in ("shape", "affine", "spacing_mm")
                                             if c in batch.column_names]).to_pylist():
                    # Stored at once: a run killed after this point does not score the series again.
                    _store_result(series_result_path(store, r[COL_SERIES], keys[r[COL_SERIES]]), r)
                    results.append({**r, "reused": False})
            pipe_s = time.perf_counter() - t_pipe

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
                     "crop_to_body": settings.imaging.crop_to_body,
                     "body_threshold_hu": settings.imaging.body_threshold_hu,
                     "body_margin_mm": settings.imaging.body_margin_mm,
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
               "batch_patches": batch_patches, "max_batch_patches": max_batch_patches,
               "series_on_gpu_arrays": sum(1 for r in results if r.get("arrays_on") == "gpu" and not r["reused"]),
               "failed": failed, "qc": verdict,
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
