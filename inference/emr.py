"""EMR risk scoring: committed timelines in, committed scores + screening list out.

The run, top to bottom (:func:`_attempt`, :mod:`inference.emr_feed`)::

    fragments of LAKE/emr/timelines/as_of=D          (plan from Parquet footers)
      → pack_fragments    Ray tasks (CPU): read, validate, length-sort, pad to buckets,
                          cut by token budget; one row per fragment (its padded batches)
      → ScoreActor        engine actors created when the run starts, one engine each (three per
                          GPU, ray.actors_per_gpu overrides; ray.actor_threads calls at once, the
                          device under the actor's lock; else fractional CPUs); runs infer over a
                          fragment's batches
      → write_fragments   Ray tasks beside the actor (ray.fragment_writers: tasks, the default)
                          or the actor itself (actor): the model card's calibration
                          (engines.calibration: the one place it is applied, whatever the
                          backend), the fragment's Parquet into run staging, its screening
                          candidates and score summary
      → driver            receives one small record per fragment, writes its done marker
      → QC gate           on the merged per-fragment score summaries the actors made
                          (inference.score_stats; FP32 safe mode on a low-precision trip)
      → commit            LAKE/scores/model=emr_risk/as_of=D, then screening list

Speed comes from what the actor does NOT do: no per-row Python, no padding,
no pandas; it gets big numpy views of batches CPU tasks already padded, and
its next fragments are packed and on their way while it computes. The driver
stays off the data path: scored rows go from the actor (or a writer task
beside it) straight to the staging directory, so adding GPUs adds writers
instead of queueing every score on one process.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from conf.settings import Settings
from engines.calibration import Calibration, from_card, reliability
from engines.model_card import load_card
from inference import metrics as run_metrics
from inference import qc, report, score_stats, screening
from engines.source import CachedEngine, EngineSource
from inference import emr_feed
from inference.actors import ray_session
from inference.emr_actors import ScoreActor
from inference.batching import validate_buckets
from inference.fragments import (DEFAULT_FRAGMENT_ROWS, FragmentSink, FragmentSpec, RunStaging, fragment_name,
                                 plan_fragments, spec_dicts)
from lake.commit import (STALE_STAGING_AGE_S, clean_stale_staging, commit, is_committed, partition_files,
                         read_manifest, reading)
from lake.files import write_json_atomic
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.locks import partition_lock, store_dir
from lake.ledger import StageLedger, write_ledger
from lake.paths import LakePaths, as_of_str, is_trial_run
from lake.runs import new_run_id
from lake.schemas import HEADS

MODEL = "emr_risk"
STAGE = "score_emr"


def on_cluster_devices(settings: Settings) -> Settings:
    """``settings`` with what depends on the Ray cluster's devices resolved: the token budget
    (``scoring.token_budget``, else conf.settings.DEFAULT_TOKEN_BUDGET for GPUs where the cluster has
    any). Everything after it — the staging plan, the packers, the engine source, the metrics — reads
    the one value."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    return settings.on_device(gpus > 0)


log = logging.getLogger(__name__)


class VocabularyMismatch(RuntimeError):
    """The timelines were encoded with a different vocabulary than the engine was trained on."""


@dataclass
class Attempt:
    """One scoring pass with one engine precision (a run has two in FP32 safe mode)."""

    precision: str
    metadata: dict[str, Any]
    staging: RunStaging
    records: list[dict[str, Any]] = field(default_factory=list)
    batches_this_attempt: list[dict[str, Any]] = field(default_factory=list)
    resumed_fragments: int = 0
    wall_s: float = 0.0
    started_at: float = 0.0
    rows_this_attempt: int = 0
    # Driver time: waiting on the feed for fragment records vs. writing done markers.
    driver: dict[str, float] = field(default_factory=dict)
    # The merged per-fragment score summaries (inference.score_stats): QC, drift and histograms.
    stats: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    # Start-up of this attempt: the driver's engine-metadata load, actor creation and engine loads.
    startup: dict[str, float] = field(default_factory=dict)
    # Calls each engine actor ran at once (inference.emr_feed.actor_threads); None when nothing was pending.
    actor_threads: int | None = None


def score(settings: Settings, as_of: str, force_ungated: bool = False, run_id: str | None = None, *,
          limit: int | None = None, engine_source: EngineSource | None = None,
          actor_cls: type = ScoreActor, fragment_rows: int = DEFAULT_FRAGMENT_ROWS,
          on_fragment_done: Callable[[int, int], None] | None = None, lock_wait_s: float = 0.0) -> Path:
    """Score the committed timelines of ``as_of`` and commit scores and the screening list.

    Returns the run directory (LAKE/runs/<run_id>/: manifest.json, ledger.json,
    metrics.json, report.html). Pass the ``run_id`` of a crashed run to resume
    it: only fragments without a _DONE marker are scored again. Raises
    :class:`inference.qc.QCFailed` when the scores fail the QC gate (after
    FP32 safe mode, when that applies), :class:`VocabularyMismatch` when the
    engine and the timelines disagree on the vocabulary. ``on_fragment_done``
    (fragment, fragments done this attempt) is called after each fragment is
    durably staged.

    ``limit`` (smoke runs) scores only the first ``limit`` timelines in plan
    order (:func:`inference.fragments.plan_fragments`); the rest are counted in
    the ledger as ignored ``beyond_limit``, and the scores partition, screening
    list and run manifests record ``limit`` and ``rows_available``.

    Limited and forced-ungated runs write their scores and list under the trial
    namespace (LakePaths ``trial=True``), never over a real run's. The run holds
    the locks of both partitions it writes from start to commit (waiting up to
    ``lock_wait_s`` for another writer, then failing with its name) and a lease
    on the one timelines version it reads; the list is built from exactly the
    scores version this run committed.
    """
    as_of = as_of_str(as_of)
    lake = LakePaths(settings.lake.root)
    timelines = lake.timelines(as_of)
    if not is_committed(timelines):
        raise FileNotFoundError(f"timelines for as-of {as_of} are not committed ({timelines} has no "
                                f"_SUCCESS); run `medscreen emr features --as-of {as_of}` first")
    if settings.scoring.screening_exclude_prevalent:
        # Before any lock or staging: an unusable partition fails in seconds, leaving nothing behind.
        screening.require_prevalence_columns(timelines, as_of)
    run_id = run_id or new_run_id(STAGE)
    trial = is_trial_run(limit, force_ungated)
    final = lake.scores(MODEL, as_of, trial=trial)
    with contextlib.ExitStack() as held:
        for partition in (final, lake.screening(as_of, trial=trial)):
            held.enter_context(partition_lock(partition, run_id, wait_s=lock_wait_s))
        timelines_version = held.enter_context(reading(timelines))
        # Staging of earlier runs of this partition that nobody resumed (no lock holds it now).
        clean_stale_staging(final.parent, min_age_s=STALE_STAGING_AGE_S)
        return _score(settings, lake, as_of, force_ungated, run_id, limit=limit, engine_source=engine_source,
                      actor_cls=actor_cls, fragment_rows=fragment_rows, on_fragment_done=on_fragment_done,
                      timelines=timelines_version, final=final, trial=trial)


def _score(settings: Settings, lake: LakePaths, as_of: str, force_ungated: bool, run_id: str, *,
           limit: int | None, engine_source: EngineSource | None, actor_cls: type, fragment_rows: int,
           on_fragment_done: Callable[[int, int], None] | None, timelines: Path, final: Path,
           trial: bool) -> Path:
    in_manifest = read_manifest(timelines)  # the one read of the timelines manifest in this run
    key_fp = stage_key_fingerprint(settings.pseudonym, lake.root,
                                   {f"emr/timelines/as_of={as_of} version {timelines.name}": in_manifest})
    for gpu in (False, True):  # before Ray starts: whichever device the engines turn out to run on
        validate_buckets(settings.scoring.length_buckets, settings.scoring.token_budget_for(gpu))
    run_dir = lake.run(run_id)
    calibration = from_card(load_card(settings, MODEL, verify=False))
    if calibration is None:
        log.warning("model card %s has no calibration: scores are the engine's raw outputs, and the "
                    "screening list needs configured thresholds", settings.models.get(MODEL))
    criteria = _screening_criteria(settings, calibration)
    specs = plan_fragments(timelines, fragment_rows)
    available = sum(s.num_rows for s in specs)
    if limit is not None:
        specs = plan_fragments(timelines, fragment_rows, limit)
    started = time.time()
    log.info("score_emr run %s: %d fragments, %d of %d rows%s", run_id, len(specs),
             sum(s.num_rows for s in specs), available, f" (--limit {limit})" if limit is not None else "")

    startup: dict[str, float] = {}
    # The drift reference (the previous committed partition) is read while Ray and the actors start.
    drift = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="drift-reference")
    reference = drift.submit(_drift_reference, settings, lake, as_of, calibration)
    drift.shutdown(wait=False)
    try:
        t_ray = time.perf_counter()
        with ray_session(settings):
            startup["ray_init_s"] = round(time.perf_counter() - t_ray, 3)
            settings = on_cluster_devices(settings)
            source = engine_source or CachedEngine(settings, MODEL, settings.engines.backend, force_ungated)
            attempts = [_attempt(settings, source, settings.engines.precision, specs, in_manifest, timelines,
                                 final, run_id, actor_cls, on_fragment_done, calibration,
                                 as_of=as_of, reference=reference, criteria=criteria)]
            first = attempts[0]
            if (not first.qc["passed"] and first.precision != "fp32"
                    and settings.scoring.qc.fallback_to_fp32):
                log.warning("QC failed for the %s engine (%s); re-scoring in FP32 safe mode",
                            first.precision, "; ".join(first.qc["reasons"]))
                first.staging.discard()
                attempts.append(_attempt(settings, source, "fp32", specs, in_manifest, timelines, final,
                                         run_id, actor_cls, on_fragment_done, calibration,
                                         as_of=as_of, reference=reference, criteria=criteria))
    except BaseException as exc:
        # Finished fragments stay staged: the same run_id picks up where this one stopped.
        exc.add_note(f"score_emr run {run_id} stopped; finished fragments are kept — resume with "
                     f"`medscreen score emr --as-of {as_of} --run-id {run_id}` "
                     f"(inference.emr.score(..., run_id={run_id!r}))")
        raise

    chosen = attempts[-1]
    ledger = _ledger(specs, chosen, available)
    quarantine = chosen.staging.quarantine()
    summary = run_metrics.summarise(_all_batches(chosen), chosen.wall_s, chosen.rows_this_attempt,
                                    chosen.batches_this_attempt, chosen.started_at)
    summary.update({
        "fragments": len(specs), "fragments_resumed": chosen.resumed_fragments,
        "fragments_scored_this_attempt": len(specs) - chosen.resumed_fragments,
        "batches_scored_this_attempt": len(chosen.batches_this_attempt),
        "driver": chosen.driver, "startup": {**startup, **chosen.startup},
    })
    safe_mode = len(attempts) > 1
    run_summary: dict[str, Any] = {
        "run_id": run_id, "stage": STAGE, "model": MODEL, "as_of": as_of,
        "status": "ok" if chosen.qc["passed"] else "failed_qc",
        "engine": _engine_summary(chosen.metadata, chosen.precision),
        "fp32_safe_mode": safe_mode,
        "attempts": [{"precision": a.precision, "engine_fingerprint": a.metadata.get("fingerprint"),
                      "qc": a.qc} for a in attempts],
        "qc": chosen.qc,
        "throughput": summary,
        "throughput_over_time": run_metrics.throughput_series(chosen.batches_this_attempt, chosen.started_at),
        "histograms": score_stats.histograms(chosen.stats),
        "calibration": _calibration_summary(calibration),
        "ledger": ledger.to_dict(),
        "settings": {"token_budget": settings.scoring.token_budget,
                     "length_buckets": list(settings.scoring.length_buckets),
                     "actor_num_cpus": settings.ray.actor_num_cpus,
                     "actors_per_gpu": settings.ray.actors_per_gpu or emr_feed.EMR_ACTORS_PER_GPU,
                     "actor_threads": chosen.actor_threads or settings.ray.actor_threads,
                     "fragment_writers": settings.ray.fragment_writers,
                     "fragment_rows": fragment_rows},
        "started_at": _iso(started), "finished_at": _iso(time.time()),
    }
    if settings.scoring.prometheus_port:
        run_metrics.exporter_for(settings.scoring.prometheus_port).publish(
            MODEL, chosen.precision, summary, _all_batches(chosen), chosen.qc["passed"])

    run_dir.mkdir(parents=True, exist_ok=True)
    if quarantine is not None:
        pq.write_table(quarantine, run_dir / "quarantine.parquet")
    manifest: dict[str, Any] = {
        "run_id": run_id, "stage": STAGE, "model": MODEL, "as_of": as_of,
        "input": {"partition": lake.timelines(as_of).relative_to(lake.root).as_posix(), "run_id": in_manifest.get("run_id"),
                  "version": in_manifest.get("version"), "vocab_sha256": _vocab_sha256(in_manifest)},
        "engine": run_summary["engine"], "fp32_safe_mode": safe_mode,
        "calibration": _calibration_summary(calibration),
        "qc_passed": chosen.qc["passed"], "rows": ledger.records_out,
        "quarantined": ledger.quarantined, "started_at": run_summary["started_at"],
        # A smoke run says so: the limit and how many timelines a full run would have scored.
        "limit": limit, "rows_available": available,
        # Never published: a limited or forced-ungated run (its partitions live under trial/).
        "trial": trial, "force_ungated": bool(force_ungated),
        KEY_FIELD: key_fp,
    }
    if not chosen.qc["passed"]:
        chosen.staging.discard()
        manifest["status"] = "failed_qc"
        _write_run(run_dir, manifest, run_summary, [ledger])
        qc.raise_if_failed(chosen.qc, f"{MODEL} as-of {as_of} (run {run_id}; see {run_dir / 'report.html'})")

    ledger.check()
    # The actors' screening candidates live beside the resume bookkeeping that sealing removes.
    staged = _timed(chosen.driver, "read_candidates_s", _staged_candidates, chosen.records, chosen.staging,
                    criteria)
    files = [p.name for p in chosen.staging.part_files()]
    scores_manifest = {**manifest, "files": files}
    _timed(chosen.driver, "commit_s", commit, chosen.staging.seal(), final, scores_manifest, run_id=run_id)
    scores_version = store_dir(final) / scores_manifest["version"]
    reliability_curves = _timed(chosen.driver, "reliability_s", _reliability_against_labels,
                                scores_version, timelines)
    if reliability_curves is not None:
        run_summary["reliability"] = reliability_curves
    # Handed what this run already holds: the lake, the scores version it committed with its
    # manifest, and the leased timelines version with its manifest (nothing read twice).
    candidates = _timed(chosen.driver, "screening_s", _candidates, criteria, staged, specs, scores_version,
                        as_of, timelines.name)
    screening_dir, screening_ledger = _timed(
        chosen.driver, "screening_s", screening.build,
        settings, as_of, run_id, lake=lake, scores=scores_version, scores_manifest=scores_manifest,
        timelines=timelines, timelines_manifest=in_manifest, trial=trial, candidates=candidates)
    manifest.update({"status": "ok", "outputs": {
        "scores": final.relative_to(lake.root).as_posix(), "scores_version": scores_manifest["version"],
        "screening": screening_dir.relative_to(lake.root).as_posix()},
                     "finished_at": _iso(time.time())})
    run_summary["ledger_screening"] = screening_ledger.to_dict()
    _write_run(run_dir, manifest, run_summary, [ledger, screening_ledger])
    log.info("score_emr run %s committed %d rows (%s records/s)", run_id, ledger.records_out,
             summary.get("records_per_s"))
    return run_dir


def _attempt(settings: Settings, source: EngineSource, precision: str, specs: list[FragmentSpec],
             in_manifest: dict[str, Any], timelines: Path, final: Path, run_id: str, actor_cls: type,
             on_fragment_done: Callable[[int, int], None] | None,
             calibration: Calibration | None = None, *, as_of: str,
             reference: concurrent.futures.Future, criteria: screening.Criteria | None = None) -> Attempt:
    t_load = time.perf_counter()
    runner, metadata = source.load(precision)  # metadata only; actors activate their own runner
    del runner
    driver_load_s = round(time.perf_counter() - t_load, 3)
    _check_vocabulary(in_manifest, metadata, timelines,
                      allow_unrecorded=bool(getattr(source, "force_ungated", False)))
    # A fused-graph engine records the reference export it answers for (same weights, same outputs
    # within its gate); the calibration was fitted on that export's outputs.
    built_for = metadata.get("reference_onnx_sha256") or metadata.get("onnx_sha256")
    if calibration is not None and built_for not in (None, calibration.onnx_sha256):
        raise RuntimeError(f"engine {metadata.get('fingerprint')} was built from ONNX "
                           f"{str(built_for)[:12]}… but the card's calibration was fitted for "
                           f"{calibration.onnx_sha256[:12]}…; rebuild the engine (`medscreen engines ensure`)")
    staging = RunStaging(final, run_id, precision)
    plan = {"input": str(timelines), "input_run_id": in_manifest.get("run_id"),
            "fragments": spec_dicts(specs), "engine_fingerprint": metadata.get("fingerprint"),
            "precision": precision, "token_budget": settings.scoring.token_budget,
            "length_buckets": list(settings.scoring.length_buckets),
            # A resume under another calibration would mix two score scales in one partition.
            "calibration_id": calibration.id if calibration is not None else None}
    done = staging.open(plan)
    attempt = Attempt(precision=precision, metadata=metadata, staging=staging, resumed_fragments=len(done))
    attempt.startup["driver_engine_metadata_s"] = driver_load_s
    pending = [s for s in specs if s.fragment not in done]
    attempt.started_at = time.time()
    attempt_id = uuid.uuid4().hex[:8]
    t_ref = time.perf_counter()
    reference_name, reference_bins, attempt.driver["read_reference_s"] = reference.result()
    attempt.driver["reference_wait_s"] = round(time.perf_counter() - t_ref, 3)
    psi_edges = _psi_edges(reference_bins)
    if pending:
        sink = FragmentSink(final=str(final), run_id=run_id, precision=precision, attempt_id=attempt_id,
                            as_of=as_of, model=str(metadata.get("model", MODEL)),
                            model_version=str(metadata.get("model_version")),
                            engine_fingerprint=str(metadata.get("fingerprint")),
                            calibration=calibration, psi_edges=psi_edges, screening_criteria=criteria)
        t_build = time.perf_counter()
        with emr_feed.started(pending, settings, source, precision, sink, actor_cls, _vocab_size(metadata)) as feed:
            # Creating the engine actors (their engines load meanwhile) and the feed.
            attempt.startup["feed_start_s"] = round(time.perf_counter() - t_build, 3)
            attempt.actor_threads = feed.threads
            attempt.rows_this_attempt, marking = _mark_fragments(
                feed.markers(), {s.fragment for s in pending}, staging, str(metadata.get("fingerprint")),
                on_fragment_done)
        attempt.driver.update(marking)
    attempt.wall_s = time.time() - attempt.started_at
    attempt.records = staging.records()
    attempt.batches_this_attempt = [b for r in attempt.records if r["attempt_id"] == attempt_id
                                    for b in r["batches"]]
    attempt.startup.update(_actor_startup([r for r in attempt.records if r["attempt_id"] == attempt_id],
                                          attempt.started_at))
    attempt.stats = _timed(attempt.driver, "merge_stats_s", _merged_stats, attempt.records, staging, psi_edges)
    attempt.qc = _timed(attempt.driver, "qc_s", score_stats.qc_verdict, attempt.stats, settings.scoring.qc,
                        reference_bins, reference_name)
    return attempt


def _drift_reference(settings: Settings, lake: LakePaths, as_of: str, calibration: Calibration | None
                     ) -> tuple[str | None, dict[str, Any] | None, float]:
    """The PSI reference: (partition name, per-head bins and counts, seconds to read them), or
    (None, None, 0) when there is none to judge against."""
    if not settings.scoring.qc.drift_check:
        return None, None, 0.0
    t = time.perf_counter()
    # Drift is judged against real runs only, never a trial run's scores.
    reference = qc.previous_partition(lake.scores(MODEL, as_of).parent, as_of)
    if reference is None:
        return None, None, 0.0
    ours = calibration.id if calibration else None
    if _calibration_id(read_manifest(reference)) != ours:
        # Scores on another calibration's scale differ by design, not by drift.
        log.warning("PSI reference %s was scored with calibration %s, this run with %s: no drift check",
                    reference.name, _calibration_id(read_manifest(reference)), ours)
        return None, None, 0.0
    scores = qc.read_scores(partition_files(reference))
    bins = {h: qc.psi_reference(scores[f"score_{h}"]) for h in HEADS}
    return reference.name, bins, round(time.perf_counter() - t, 3)


def _psi_edges(reference_bins: dict[str, Any] | None) -> dict[str, list[float]] | None:
    if reference_bins is None:
        return None
    # A head whose reference has no finite score: one bin, and PSI is NaN as in the full read.
    return {h: (list(map(float, b["edges"])) if b is not None else []) for h, b in reference_bins.items()}


def _merged_stats(records: list[dict[str, Any]], staging: RunStaging,
                  psi_edges: dict[str, list[float]] | None) -> dict[str, Any]:
    """Merge the fragments' score summaries; a fragment staged without one over these drift bins
    (resumed from a run that had another reference) is summarised again from its file."""
    expected = score_stats.of_scores(np.zeros((0, len(HEADS)), np.float32), psi_edges)["psi_edges"]
    summaries = []
    for r in records:
        stats = r.get("stats")
        if stats is None or stats["psi_edges"] != expected:
            scores = qc.read_scores([staging.path / fragment_name(r["fragment"])])
            stats = score_stats.of_scores(np.stack([scores[f"score_{h}"] for h in HEADS], axis=1), psi_edges)
        summaries.append(stats)
    return score_stats.merge(summaries)


def _screening_criteria(settings: Settings, calibration: Calibration | None) -> screening.Criteria | None:
    """The list's criteria, known before scoring, for the actors to keep each fragment's candidates;
    None when the thresholds are not usable (the list then reads every score and says why)."""
    try:
        return screening.criteria_of(settings, {"calibration": _calibration_summary(calibration)})
    except screening.ThresholdsNotUsable:
        return None


def _staged_candidates(records: list[dict[str, Any]], staging: RunStaging,
                       criteria: screening.Criteria | None) -> dict[int, tuple[pa.Table, dict[str, Any]] | None]:
    """Per fragment, the screening candidates and population counts its actor staged under these
    criteria; None for a fragment staged without them (a fact missing, or resumed from a run under
    other criteria), made again from the files by :func:`_candidates`."""
    if criteria is None:
        return {}
    ours = json.loads(json.dumps(criteria.to_dict()))
    out: dict[int, tuple[pa.Table, dict[str, Any]] | None] = {}
    for r in records:
        made = r.get("screening")
        ok = made is not None and made["criteria"] == ours
        out[r["fragment"]] = (staging.candidates(r["fragment"]), made["population"]) if ok else None
    return out


def _candidates(criteria: screening.Criteria | None, staged: dict[int, tuple[pa.Table, dict[str, Any]] | None],
                specs: list[FragmentSpec], scores_version: Path, as_of: str,
                timelines_name: str) -> screening.Candidates | None:
    """The merged screening candidates of every fragment: those its actor staged, else made from its
    committed scores file and its timelines rows (the same rule); None without criteria."""
    if criteria is None:
        return None
    parts = []
    for spec in specs:
        part = staged.get(spec.fragment)
        if part is None:
            scores = pq.read_table(scores_version / fragment_name(spec.fragment))
            rows = screening.read_facts(spec.path, criteria.exclude_prevalent, list(spec.row_groups), spec.num_rows)
            facts = screening.facts_of(scores.column("patient_key"), rows, timelines_name, as_of,
                                       criteria.exclude_prevalent)
            part = screening.fragment_candidates(criteria, scores, facts)
        parts.append(part)
    return screening.Candidates(criteria, *screening.merge_candidates(parts))


def _mark_fragments(markers: Iterable[pa.Table], pending: set[int], staging: RunStaging, fingerprint: str,
                    on_fragment_done: Callable[[int, int], None] | None) -> tuple[int, dict[str, float]]:
    """Drain the feed's fragment records (:meth:`inference.emr_feed.Feed.markers`); mark each fragment
    done once, in arrival order.

    The fragments' writers already wrote their files; a marker makes one count. A
    late duplicate (a retried actor task) is ignored: exactly-once by fragment.
    Returns (rows marked, driver timings).
    """
    done: set[int] = set()
    rows = 0
    wait_s = mark_s = actor_write_s = 0.0
    t = time.perf_counter()
    for block in markers:
        wait_s += time.perf_counter() - t
        t = time.perf_counter()
        for frag, engine, record in zip(block.column("fragment").to_pylist(),
                                        block.column("engine_fingerprint").to_pylist(),
                                        block.column("record").to_pylist()):
            if frag in done or frag not in pending:
                continue
            if engine != fingerprint:
                raise RuntimeError(f"an actor scored with engine {engine} while the run planned "
                                   f"{fingerprint}; the engine cache changed during the run — rerun")
            rec = json.loads(record)
            staging.mark_done(frag, rec)
            done.add(frag)
            rows += rec["rows_out"]
            actor_write_s += rec.get("write_s", 0.0)
            if on_fragment_done is not None:
                on_fragment_done(frag, len(done))
        mark_s += time.perf_counter() - t
        t = time.perf_counter()
    missing = sorted(pending - done)
    if missing:
        raise RuntimeError(f"the scoring pipeline ended with {len(missing)} fragment(s) incomplete "
                           f"(first: {missing[:5]}); rerun with the same run_id to resume")
    return rows, {"wait_s": round(wait_s, 3), "mark_s": round(mark_s, 3),
                  "actor_write_s": round(actor_write_s, 3)}


def _actor_startup(records: list[dict[str, Any]], started_at: float) -> dict[str, Any]:
    """Actor start-up of one attempt from its fragment records: the slowest engine load, and when the
    last actor was ready (seconds after the attempt started; Ray starts the pool's actors in parallel)."""
    actors = {(r["actor"]["id"], r["actor"]["incarnation"]): r["actor"] for r in records if r.get("actor")}
    if not actors:
        return {}
    out = {"actors": len(actors),
           "engine_load_s_max": max(a["engine_load_s"] for a in actors.values()),
           "actors_ready_s": round(max(a["ready_at"] for a in actors.values()) - started_at, 3)}
    # Of which: until the last actor's __init__ began (pipeline start, actor scheduling on a worker
    # process, imports, unpickling the engine source and sink); the rest is its engine load.
    last = max(actors.values(), key=lambda a: a["ready_at"])
    if last.get("init_started_at") is not None:
        out["actor_init_started_s"] = round(last["init_started_at"] - started_at, 3)
    # The inductor plan's compile-cache hits and misses, summed over the actors: misses mean the
    # actors compiled from scratch instead of from the plan's artefacts.
    counts: dict[str, int] = {}
    for actor in actors.values():
        for k, v in ((actor.get("engine_load") or {}).get("compile_cache") or {}).items():
            counts[k] = counts.get(k, 0) + int(v)
    if counts:
        out["engine_compile_cache"] = counts
    # Where the last actor's engine load went, where the engine says (the inductor plan: compile mode,
    # seconds per shape, the artefacts' load).
    detail = {k: v for k, v in (last.get("engine_load") or {}).items() if k != "compile_cache"}
    if detail:
        out["last_engine_load"] = detail
    return out


def _timed(timings: dict[str, float], name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``fn`` and add its wall time to ``timings[name]`` (the driver's post-scoring stages)."""
    t = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t, 3)


def _all_batches(attempt: Attempt) -> list[dict[str, Any]]:
    return [b for r in attempt.records for b in r["batches"]]


def _ledger(specs: list[FragmentSpec], attempt: Attempt, available: int) -> StageLedger:
    # Every timeline of the partition is accounted for; those past a --limit are ignored by that rule.
    selected = sum(s.num_rows for s in specs)
    ignored = {"beyond_limit": available - selected} if available > selected else {}
    ledger = StageLedger(STAGE, records_in=available, ignored=ignored, unit="timelines")
    for r in attempt.records:
        ledger.records_out += r["rows_out"]
        for reason, n in r["quarantined"].items():
            ledger.quarantined[reason] = ledger.quarantined.get(reason, 0) + n
    return ledger


def _write_run(run_dir: Path, manifest: dict[str, Any], summary: dict[str, Any],
               ledgers: list[StageLedger]) -> None:
    write_ledger(run_dir, *ledgers)
    write_json_atomic(run_dir / "metrics.json", summary)
    (run_dir / "report.html").write_text(report.render(summary))
    write_json_atomic(run_dir / "manifest.json", manifest)


def _calibration_summary(calibration: Calibration | None) -> dict[str, Any] | None:
    if calibration is None:
        return None
    return {"id": calibration.id, "method": calibration.method, "onnx_sha256": calibration.onnx_sha256}


def _calibration_id(manifest: dict[str, Any]) -> str | None:
    return (manifest.get("calibration") or {}).get("id")


def _reliability_against_labels(scores_dir: Path, timelines: Path) -> dict[str, Any] | None:
    """Per head, the reliability curve of the committed scores against the timelines' labels;
    None when the timelines carry no labels (nightly runs)."""
    import pyarrow.compute as pc

    files = partition_files(timelines)
    label_cols = [f"label_{h}" for h in HEADS]
    if not files or any(c not in pq.read_schema(files[0]).names for c in label_cols):
        return None
    labels = pa.concat_tables([pq.read_table(f, columns=["patient_key", *label_cols]) for f in files])
    scores = pa.concat_tables([pq.read_table(f, columns=["patient_key", *(f"score_{h}" for h in HEADS)])
                               for f in partition_files(scores_dir)])
    index = pc.index_in(scores.column("patient_key"), value_set=labels.column("patient_key"))
    out = {}
    for h in HEADS:
        y = labels.column(f"label_{h}").take(index).fill_null(-1).to_numpy(zero_copy_only=False)
        out[h] = reliability(scores.column(f"score_{h}").to_numpy(zero_copy_only=False), y)
    return out


def _vocab_sha256(manifest: dict[str, Any]) -> str | None:
    for value in (manifest.get("vocab_sha256"), (manifest.get("vocab") or {}).get("sha256"),
                  (manifest.get("vocabulary") or {}).get("sha256")):
        if value:
            return str(value)
    return None


def _vocab_size(metadata: dict[str, Any]) -> int | None:
    value = metadata.get("vocab_size") or (metadata.get("vocab") or {}).get("size")
    return int(value) if value else None


def _check_vocabulary(in_manifest: dict[str, Any], metadata: dict[str, Any], timelines: Path,
                      allow_unrecorded: bool = False) -> None:
    """Refuse timelines encoded with another vocabulary than the engine's model was trained on.

    An engine that records no vocabulary (an untrained placeholder export) is
    accepted only under ``--force-ungated``, which already means "unverified engine".
    """
    ours = _vocab_sha256(in_manifest)
    theirs = metadata.get("vocab_sha256") or (metadata.get("vocab") or {}).get("sha256")
    if not ours:
        raise VocabularyMismatch(f"timelines partition {timelines.name} records no vocabulary sha256 in its "
                                 "manifest; rebuild it with `medscreen emr features`")
    if not theirs and allow_unrecorded:
        log.warning("engine %s records no vocabulary sha256; scoring anyway (--force-ungated)",
                    metadata.get("fingerprint"))
        return
    if not theirs:
        raise VocabularyMismatch(f"engine {metadata.get('fingerprint')} records no vocabulary sha256; "
                                 "export the trained model (its card records the vocabulary) and rebuild "
                                 "with `medscreen engines ensure`, or pass --force-ungated")
    if ours != theirs:
        raise VocabularyMismatch(
            f"timelines {timelines.name} use vocabulary {ours[:12]} but engine {metadata.get('fingerprint')} "
            f"was trained on {theirs[:12]}; rebuild the timelines or the engine so they agree")


def _engine_summary(metadata: dict[str, Any], precision: str) -> dict[str, Any]:
    keys = ("model", "model_version", "fingerprint", "backend", "backend_version", "providers", "platform")
    out = {k: metadata.get(k) for k in keys if metadata.get(k) is not None}
    out["precision"] = precision
    gate = metadata.get("gate") or {}
    out["gate_passed"] = gate.get("passed")
    return out


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
