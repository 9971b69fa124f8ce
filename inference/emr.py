"""EMR risk scoring with Ray Data: committed timelines in, committed scores + screening list out.

The pipeline, top to bottom (:func:`build_pipeline`)::

    fragments of LAKE/emr/timelines/as_of=D          (plan from Parquet footers)
      → pack_fragments    CPU tasks: read, validate, length-sort, pad to buckets,
                          cut by token budget; one row per pre-padded batch
      → ScoreActor        actor pool, one engine per actor (ray.actors_per_gpu actors share a GPU,
                          else fractional CPUs); __call__ only runs infer
      → driver            per-fragment Parquet + _DONE marker in run staging
      → QC gate           (FP32 safe mode on a low-precision trip)
      → commit            LAKE/scores/model=emr_risk/as_of=D, then screening list

Speed comes from what the actor does NOT do: no per-row Python, no padding,
no pandas; it gets big numpy views of batches CPU tasks already padded, and
Ray prefetches its next blocks while it computes.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from conf.settings import Settings
from inference import metrics as run_metrics
from inference import qc, report, screening
from inference.actors import (CachedEngine, EngineSource, FragmentSpec, ScoreActor, engine_actor_pool,
                              pack_fragments)
from inference.batching import validate_buckets
from inference.fragments import DEFAULT_FRAGMENT_ROWS, RunStaging, plan_fragments, spec_dicts
from lake.commit import (STALE_STAGING_AGE_S, clean_stale_staging, commit, is_committed, partition_files,
                         read_manifest, reading)
from lake.locks import partition_lock, store_dir
from lake.ledger import StageLedger, write_ledger
from lake.paths import LakePaths, as_of_str, is_trial_run
from lake.runs import new_run_id, write_json
from lake.schemas import HEADS, SCORES

MODEL = "emr_risk"
STAGE = "score_emr"
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
    # Driver time: waiting on Ray Data for scored blocks vs. collecting and writing fragments.
    driver: dict[str, float] = field(default_factory=dict)
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)


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
        return _score(settings, as_of, force_ungated, run_id, limit=limit, engine_source=engine_source,
                      actor_cls=actor_cls, fragment_rows=fragment_rows, on_fragment_done=on_fragment_done,
                      timelines=timelines_version, final=final, trial=trial)


def _score(settings: Settings, as_of: str, force_ungated: bool, run_id: str, *, limit: int | None,
           engine_source: EngineSource | None, actor_cls: type, fragment_rows: int,
           on_fragment_done: Callable[[int, int], None] | None, timelines: Path, final: Path,
           trial: bool) -> Path:
    lake = LakePaths(settings.lake.root)
    in_manifest = read_manifest(timelines)
    validate_buckets(settings.scoring.length_buckets, settings.scoring.token_budget)
    run_dir = lake.run(run_id)
    source = engine_source or CachedEngine(settings, MODEL, settings.engines.backend, force_ungated)
    specs = plan_fragments(timelines, fragment_rows)
    available = sum(s.num_rows for s in specs)
    if limit is not None:
        specs = plan_fragments(timelines, fragment_rows, limit)
    started = time.time()
    log.info("score_emr run %s: %d fragments, %d of %d rows%s", run_id, len(specs),
             sum(s.num_rows for s in specs), available, f" (--limit {limit})" if limit is not None else "")

    started_ray = _ensure_ray(settings)
    try:
        attempts = [_attempt(settings, source, settings.engines.precision, specs, in_manifest, timelines,
                             final, run_id, actor_cls, on_fragment_done)]
        first = attempts[0]
        if (not first.qc["passed"] and first.precision != "fp32"
                and settings.scoring.qc.fallback_to_fp32):
            log.warning("QC failed for the %s engine (%s); re-scoring in FP32 safe mode",
                        first.precision, "; ".join(first.qc["reasons"]))
            first.staging.discard()
            attempts.append(_attempt(settings, source, "fp32", specs, in_manifest, timelines, final,
                                     run_id, actor_cls, on_fragment_done))
    except BaseException as exc:
        # Finished fragments stay staged: the same run_id picks up where this one stopped.
        exc.add_note(f"score_emr run {run_id} stopped; finished fragments are kept — resume with "
                     f"`medscreen score emr --as-of {as_of} --run-id {run_id}` "
                     f"(inference.emr.score(..., run_id={run_id!r}))")
        raise
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    chosen = attempts[-1]
    ledger = _ledger(specs, chosen, available)
    quarantine = chosen.staging.quarantine()
    summary = run_metrics.summarise(_all_batches(chosen), chosen.wall_s, chosen.rows_this_attempt,
                                    chosen.batches_this_attempt, chosen.started_at)
    summary.update({
        "fragments": len(specs), "fragments_resumed": chosen.resumed_fragments,
        "fragments_scored_this_attempt": len(specs) - chosen.resumed_fragments,
        "driver": chosen.driver,
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
        "histograms": run_metrics.score_histograms(chosen.scores),
        "ledger": ledger.to_dict(),
        "settings": {"token_budget": settings.scoring.token_budget,
                     "length_buckets": list(settings.scoring.length_buckets),
                     "actor_num_cpus": settings.ray.actor_num_cpus, "fragment_rows": fragment_rows},
        "started_at": _iso(started), "finished_at": _iso(time.time()),
    }
    if settings.scoring.prometheus_port:
        run_metrics.exporter_for(settings.scoring.prometheus_port).publish(
            MODEL, chosen.precision, summary, _all_batches(chosen), chosen.qc["passed"])

    run_dir.mkdir(parents=True, exist_ok=True)
    if quarantine is not None:
        import pyarrow.parquet as pq

        pq.write_table(quarantine, run_dir / "quarantine.parquet")
    manifest: dict[str, Any] = {
        "run_id": run_id, "stage": STAGE, "model": MODEL, "as_of": as_of,
        "input": {"partition": f"emr/timelines/as_of={as_of}", "run_id": in_manifest.get("run_id"),
                  "version": in_manifest.get("version"), "vocab_sha256": _vocab_sha256(in_manifest)},
        "engine": run_summary["engine"], "fp32_safe_mode": safe_mode,
        "qc_passed": chosen.qc["passed"], "rows": ledger.records_out,
        "quarantined": ledger.quarantined, "started_at": run_summary["started_at"],
        # A smoke run says so: the limit and how many timelines a full run would have scored.
        "limit": limit, "rows_available": available,
        # Never published: a limited or forced-ungated run (its partitions live under trial/).
        "trial": trial, "force_ungated": bool(force_ungated),
    }
    if not chosen.qc["passed"]:
        chosen.staging.discard()
        manifest["status"] = "failed_qc"
        _write_run(run_dir, manifest, run_summary, [ledger])
        qc.raise_if_failed(chosen.qc, f"{MODEL} as-of {as_of} (run {run_id}; see {run_dir / 'report.html'})")

    ledger.check()
    files = [p.name for p in chosen.staging.part_files()]
    scores_manifest = {**manifest, "files": files}
    commit(chosen.staging.seal(), final, scores_manifest, run_id=run_id)
    scores_version = store_dir(final) / scores_manifest["version"]
    screening_dir, screening_ledger = screening.build(settings, as_of, run_id, scores=scores_version,
                                                      trial=trial)
    manifest.update({"status": "ok", "outputs": {
        "scores": final.relative_to(lake.root).as_posix(), "scores_version": scores_manifest["version"],
        "screening": screening_dir.relative_to(lake.root).as_posix()},
                     "finished_at": _iso(time.time())})
    run_summary["ledger_screening"] = screening_ledger.to_dict()
    _write_run(run_dir, manifest, run_summary, [ledger, screening_ledger])
    log.info("score_emr run %s committed %d rows (%s records/s)", run_id, ledger.records_out,
             summary.get("records_per_s"))
    return run_dir


def build_pipeline(specs: Sequence[FragmentSpec], settings: Settings, source: EngineSource, precision: str,
                   actor_cls: type = ScoreActor, vocab_size: int | None = None):
    """The Ray Data pipeline: fragment specs → padded batches (CPU tasks) → engine actors.

    Returns a ``ray.data.Dataset`` whose rows are scored batches (see ScoreActor).
    """
    import ray

    items = spec_dicts(list(specs))
    # One fragment per block: a pack task = one fragment, so fragments prepare in parallel.
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(pack_fragments, batch_size=None, batch_format="pyarrow",
                        fn_kwargs={"length_buckets": list(settings.scoring.length_buckets),
                                   "token_budget": settings.scoring.token_budget, "vocab_size": vocab_size})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    size, resources = engine_actor_pool(settings, gpus)
    # Several blocks in flight per actor: Ray fetches the next batches while the engine runs.
    compute = ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=4)
    # Each row is already one padded engine batch. Ray Data insists on an explicit
    # batch_size for GPU stages; one row per call keeps a call = one engine batch
    # (the calls of a block still run inside one actor task).
    return ds.map_batches(actor_cls, fn_constructor_kwargs={"source": source, "precision": precision},
                          batch_size=1 if gpus else None, batch_format="pyarrow", zero_copy_batch=True,
                          compute=compute, **resources)


def _attempt(settings: Settings, source: EngineSource, precision: str, specs: list[FragmentSpec],
             in_manifest: dict[str, Any], timelines: Path, final: Path, run_id: str, actor_cls: type,
             on_fragment_done: Callable[[int, int], None] | None) -> Attempt:
    runner, metadata = source.load(precision)  # metadata only; actors activate their own runner
    del runner
    _check_vocabulary(in_manifest, metadata, timelines,
                      allow_unrecorded=bool(getattr(source, "force_ungated", False)))
    staging = RunStaging(final, run_id, precision)
    plan = {"input": str(timelines), "input_run_id": in_manifest.get("run_id"),
            "fragments": spec_dicts(specs), "engine_fingerprint": metadata.get("fingerprint"),
            "precision": precision, "token_budget": settings.scoring.token_budget,
            "length_buckets": list(settings.scoring.length_buckets)}
    done = staging.open(plan)
    attempt = Attempt(precision=precision, metadata=metadata, staging=staging, resumed_fragments=len(done))
    pending = [s for s in specs if s.fragment not in done]
    attempt.started_at = time.time()
    attempt_id = uuid.uuid4().hex[:8]
    if pending:
        ds = build_pipeline(pending, settings, source, precision, actor_cls, _vocab_size(metadata))
        writer = _FragmentWriter(pending, staging, metadata, precision, run_id, final, attempt_id,
                                 on_fragment_done)
        wait_s, t = 0.0, time.perf_counter()
        try:
            for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                wait_s += time.perf_counter() - t
                writer.add(block)
                t = time.perf_counter()
            writer.finish()
        finally:
            writer.close()
        attempt.rows_this_attempt = writer.rows_written
        attempt.driver = {"wait_s": round(wait_s, 3), "collect_s": round(writer.collect_s, 3),
                          "write_s": round(writer.write_s, 3)}
    attempt.wall_s = time.time() - attempt.started_at
    attempt.records = staging.records()
    attempt.batches_this_attempt = [b for r in attempt.records if r["attempt_id"] == attempt_id
                                    for b in r["batches"]]
    attempt.scores = qc.read_scores(staging.part_files())
    # Drift is judged against real runs only, never a trial run's scores.
    published = LakePaths(settings.lake.root).scores(MODEL, final.name.split("=", 1)[1])
    reference = (qc.previous_partition(published.parent, final.name.split("=", 1)[1])
                 if settings.scoring.qc.drift_check else None)
    attempt.qc = qc.evaluate(attempt.scores, settings.scoring.qc,
                             qc.read_scores(partition_files(reference)) if reference else None,
                             reference.name if reference else None)
    return attempt


class _FragmentWriter:
    """Collects scored batches per fragment; writes a fragment once all its batches are in.

    Fragment files are built and written on a few threads (Parquet encoding and
    compression release the GIL), so the driver keeps draining scored blocks and
    the actors' output never waits on the disk. Markers are written on the driver
    thread, in the order writes finish, each followed by ``on_fragment_done``: a
    driver that stops leaves exactly the fragments it reported done, as before.
    """

    WRITE_THREADS = 2

    def __init__(self, pending: list[FragmentSpec], staging: RunStaging, metadata: dict[str, Any],
                 precision: str, run_id: str, final: Path, attempt_id: str,
                 on_fragment_done: Callable[[int, int], None] | None):
        self.specs = {s.fragment: s for s in pending}
        self.staging = staging
        self.metadata = metadata
        self.precision = precision
        self.run_id = run_id
        self.as_of = dt.date.fromisoformat(final.name.split("=", 1)[1])
        self.attempt_id = attempt_id
        self.callback = on_fragment_done
        self.open: dict[int, dict[str, Any]] = {}
        self.done: set[int] = set()
        self.writing: dict[int, Future] = {}
        self.pool = ThreadPoolExecutor(self.WRITE_THREADS, thread_name_prefix="medscreen-fragment-writer")
        self.rows_written = 0
        self.collect_s = 0.0  # driver: decoding blocks into per-fragment parts
        self.write_s = 0.0    # writer threads: building and writing fragment files

    def add(self, block: pa.Table) -> None:
        t0 = time.perf_counter()
        cols = {c: block.column(c).to_pylist() for c in (
            "fragment", "batch_index", "n_batches", "n_rows", "seq_len", "real_tokens", "prep_s",
            "host_s", "device_s", "done_at", "actor_id", "incarnation", "key_width", "qkey_width",
            "qreason_width", "engine_fingerprint")}
        for i in range(block.num_rows):
            frag = cols["fragment"][i]
            if frag in self.done or frag in self.writing or frag not in self.specs:
                continue  # a late duplicate of an already written fragment: exactly-once by key
            if cols["engine_fingerprint"][i] != str(self.metadata.get("fingerprint")):
                raise RuntimeError(f"an actor scored with engine {cols['engine_fingerprint'][i]} while the "
                                   f"run planned {self.metadata.get('fingerprint')}; the engine cache "
                                   "changed during the run — rerun")
            state = self.open.setdefault(frag, {"n_batches": cols["n_batches"][i], "parts": {}})
            b = cols["batch_index"][i]
            if b in state["parts"]:
                continue
            n = cols["n_rows"][i]
            keys = _view(block, "keys", i, f"S{cols['key_width'][i]}")
            probs = _view(block, "probs", i, np.float32).reshape(n, 3) if n else np.zeros((0, 3), np.float32)
            qkeys = _view(block, "quarantine_keys", i, f"S{cols['qkey_width'][i]}")
            qreasons = _view(block, "quarantine_reasons", i, f"S{cols['qreason_width'][i]}")
            record = {k: cols[k][i] for k in ("batch_index", "n_rows", "seq_len", "real_tokens", "prep_s",
                                               "host_s", "device_s", "done_at", "actor_id", "incarnation")}
            # Copies: the block's buffers are released when the iterator moves on.
            state["parts"][b] = (keys.copy(), probs.copy(), qkeys.copy(), qreasons.copy(), record)
            if len(state["parts"]) == state["n_batches"]:
                self.writing[frag] = self.pool.submit(self._write, frag, self.open.pop(frag))
        self.collect_s += time.perf_counter() - t0
        # Bounded: a driver far ahead of the disk waits here rather than holding every fragment.
        self._harvest(wait=len(self.writing) > 2 * self.WRITE_THREADS)

    def _harvest(self, wait: bool) -> None:
        """Account for finished fragment writes (all of them when ``wait``); re-raise a failed write."""
        for frag, future in list(self.writing.items()):
            if not (wait or future.done()):
                continue
            rows, seconds, record = future.result()
            del self.writing[frag]
            self.staging.mark_done(frag, record)
            self.done.add(frag)
            self.rows_written += rows
            self.write_s += seconds
            if self.callback is not None:
                self.callback(frag, len(self.done))

    def _write(self, frag: int, state: dict[str, Any]) -> tuple[int, float, dict[str, Any]]:
        """Build and write one fragment's files (on a writer thread); returns (rows, seconds, marker record)."""
        t0 = time.perf_counter()
        parts = [state["parts"][b] for b in sorted(state["parts"])]
        keys = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, "S1")
        probs = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 3), np.float32)
        # UTF-8 bytes sort in code-point order, as the decoded strings would: no decode to sort.
        order = np.argsort(keys, kind="stable")
        n = len(order)
        meta = self.metadata

        def const(value: Any, typ: pa.DataType) -> pa.Array:
            return pa.repeat(pa.scalar(value, typ), n)

        table = pa.table({
            "patient_key": _utf8(keys[order]),
            "as_of": const(self.as_of, pa.date32()),
            "model": const(str(meta.get("model", MODEL)), pa.string()),
            "model_version": const(str(meta.get("model_version")), pa.string()),
            "engine_fingerprint": const(str(meta.get("fingerprint")), pa.string()),
            "precision": const(self.precision, pa.string()),
            "run_id": const(self.run_id, pa.string()),
            **{f"score_{h}": pa.array(probs[order, j], pa.float32()) for j, h in enumerate(HEADS)},
        }, schema=SCORES)
        qkeys = np.concatenate([p[2] for p in parts])
        qreasons = np.concatenate([p[3] for p in parts])
        quarantine = pa.table({"patient_key": _utf8(qkeys), "reason": _utf8(qreasons)})
        reasons, counts = np.unique(qreasons, return_counts=True) if len(qreasons) else ([], [])
        spec = self.specs[frag]
        record = {"fragment": frag, "rows_in": spec.num_rows, "rows_out": n,
                  "quarantined": {r.decode(): int(c) for r, c in zip(reasons, counts)},
                  "attempt_id": self.attempt_id, "batches": [p[4] for p in parts]}
        self.staging.write_parts(frag, table, quarantine)
        return n, time.perf_counter() - t0, record

    def finish(self) -> None:
        self._harvest(wait=True)
        missing = sorted(set(self.specs) - self.done)
        if missing:
            raise RuntimeError(f"the scoring pipeline ended with {len(missing)} fragment(s) incomplete "
                               f"(first: {missing[:5]}); rerun with the same run_id to resume")

    def close(self) -> None:
        """Stop the writer threads; files of fragments never marked done are removed (a resume redoes them)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for frag in list(self.writing):
            self.staging.drop_parts(frag)
        self.writing.clear()


def _view(block: pa.Table, name: str, i: int, dtype: Any) -> np.ndarray:
    buf = block.column(name)[i].as_buffer()
    return np.frombuffer(buf, dtype=dtype) if buf is not None and buf.size else np.zeros(0, dtype=dtype)


def _utf8(values: np.ndarray) -> pa.Array:
    """Fixed-width UTF-8 bytes (numpy S) as an Arrow string array, without a Python-level decode."""
    return pa.array(values if len(values) else [], pa.string())


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
    write_json(run_dir / "metrics.json", summary)
    (run_dir / "report.html").write_text(report.render(summary))
    write_json(run_dir / "manifest.json", manifest)


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


def _ensure_ray(settings: Settings) -> bool:
    """Connect to settings.ray.address, or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    # Local Ray on a laptop/CI has no auth; a cluster address brings its own.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if settings.ray.address:
        ray.init(address=settings.ray.address, configure_logging=False)
    else:
        ray.init(include_dashboard=False, configure_logging=False)
    return True


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc).isoformat(timespec="seconds")
