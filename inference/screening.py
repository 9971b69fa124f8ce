"""The screening list: patients flagged for follow-up from a committed scores partition.

An outreach list for *incident* risk. Per head, patients already diagnosed with
the head's disease at the as-of date (``prevalent_<head>`` in the timelines
partition the scores came from: the labels' "already diagnosed" rule, see
preprocessing.timelines) are left out first, unless
``scoring.screening_exclude_prevalent`` is false. Of the rest, a patient is
flagged when the score reaches ``scoring.screening_thresholds[head]``, or, when
``scoring.screening_top_k`` is set, when the score is among the head's top k
(ties broken by patient_key so the list is deterministic). One row per
(patient, head) with the score and full provenance. Written atomically to
LAKE/screening/as_of=D/, whose manifest records the rule.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conf.settings import Settings
from lake.commit import (atomic_partition, partition_files, read_manifest, read_partition, reading,
                         resolve_partition)
from lake.locks import partition_lock, store_dir
from lake.ledger import StageLedger
from lake.paths import TRIAL, LakePaths, as_of_str
from lake.schemas import HEADS, PREVALENT_COLUMNS
from preprocessing.timelines import LABEL_GROUPS

MODEL = "emr_risk"
# Ledger reason: not flagged on any head, but would have been on one where already diagnosed.
EXCLUDED_PREVALENT = "excluded_prevalent"
log = logging.getLogger(__name__)


class TimelinesNotUsable(ValueError):
    """The timelines partition the scores came from cannot say who is already diagnosed."""


SCREENING = pa.schema([
    ("patient_key", pa.string()),
    ("as_of", pa.date32()),
    ("head", pa.string()),            # t2d | ckd | hf
    ("score", pa.float32()),
    ("rank", pa.int32()),             # 1 = highest score within the head
    ("criterion", pa.string()),       # "threshold>=0.5" or "top_k=100"
    ("model", pa.string()),
    ("model_version", pa.string()),
    ("engine_fingerprint", pa.string()),
    ("precision", pa.string()),
    ("run_id", pa.string()),
])


def screen(scores: pa.Table, thresholds: dict[str, float], top_k: int | None,
           prevalent: dict[str, np.ndarray] | None = None) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Flagged (patient, head) rows of a scores table, schema :data:`SCREENING`, sorted by head then
    rank, and per head the row indices of ``scores`` left out as already diagnosed.

    ``prevalent`` maps a head to a boolean per scores row (None: nobody is left out). A prevalent
    patient is never flagged for that head; with top k the k are taken from the others. The
    indices returned are those prevalent patients who would otherwise have been flagged.
    """
    unknown = set(thresholds) - set(HEADS)
    if unknown:
        raise ValueError(f"scoring.screening_thresholds names unknown heads {sorted(unknown)}; "
                         f"heads are {list(HEADS)}")
    scores = scores.combine_chunks()  # one chunk per column: gathers below are plain array takes
    # Patients in key order once (Arrow sorts strings in C++); a stable sort by score over that
    # order breaks ties by patient_key without comparing strings again for every head.
    by_key = pc.sort_indices(scores.column("patient_key")).to_numpy()
    parts, excluded = [], {}
    for head in HEADS:
        if top_k is None and head not in thresholds:
            continue
        s = scores.column(f"score_{head}").to_numpy().astype(np.float32)
        # Highest score first; NaN never qualifies; ties by patient_key.
        finite = np.isfinite(s)
        order = by_key[np.argsort(-np.where(finite, s, -np.inf)[by_key], kind="stable")]
        order = order[finite[order]]
        out = prevalent[head][order] if prevalent is not None else np.zeros(len(order), bool)
        if top_k is not None:
            # Within the top k: fewer than k patients who may be flagged rank ahead.
            eligible = (~out).astype(np.int64)
            qualifies = np.cumsum(eligible) - eligible < top_k
            criterion = f"top_k={top_k}"
        else:
            qualifies = s[order] >= thresholds[head]
            criterion = f"threshold>={thresholds[head]:g}"
        chosen = order[qualifies & ~out]
        excluded[head] = order[qualifies & out]
        if not len(chosen):
            continue
        take = pa.array(chosen)
        n = len(chosen)
        parts.append(pa.table({
            "patient_key": scores.column("patient_key").take(take),
            "as_of": scores.column("as_of").take(take),
            "head": pa.repeat(pa.scalar(head, pa.string()), n),
            "score": pa.array(s[chosen], pa.float32()),
            "rank": pa.array(np.arange(1, n + 1, dtype=np.int32)),
            "criterion": pa.repeat(pa.scalar(criterion, pa.string()), n),
            **{c: scores.column(c).take(take) for c in
               ("model", "model_version", "engine_fingerprint", "precision", "run_id")},
        }, schema=SCREENING))
    return (pa.concat_tables(parts) if parts else SCREENING.empty_table()), excluded


def select(scores: pa.Table, thresholds: dict[str, float], top_k: int | None,
           prevalent: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The flagged rows of :func:`screen`."""
    return screen(scores, thresholds, top_k, prevalent)[0]


def _rebuild_hint(as_of: str) -> str:
    return (f"rebuild the features for that date (`medscreen emr features --as-of {as_of}`) and score "
            f"again (`medscreen score emr --as-of {as_of}`)")


def require_prevalence_columns(timelines: Path, as_of: str) -> None:
    """Raise :class:`TimelinesNotUsable` when a timelines partition predates ``prevalent_<head>``.

    Scoring calls this before it starts, so an old partition fails in seconds
    rather than after a full scoring run whose list could not be screened.
    """
    run_id = read_manifest(timelines).get("run_id")
    for f in partition_files(timelines):
        missing = [c for c in PREVALENT_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            raise TimelinesNotUsable(
                f"timelines partition {timelines.name} (features run {run_id}) predates the "
                f"columns {missing} that screening needs to leave already-diagnosed patients out of the "
                f"outreach list; {_rebuild_hint(as_of)} — or set "
                "scoring.screening_exclude_prevalent: false to screen without leaving them out")


def prevalence_for(scores: pa.Table, timelines: Path, expected_run_id: str | None,
                   as_of: str) -> tuple[dict[str, np.ndarray], str | None]:
    """``prevalent_<head>`` of every scored patient, from the timelines partition the scores came
    from, and that partition's features run id.

    Raises :class:`TimelinesNotUsable` when the partition was rebuilt since scoring, predates
    the prevalence columns, or lacks a scored patient: the fix is to rebuild and rescore.
    """
    rebuild = _rebuild_hint(as_of)
    manifest = read_manifest(timelines)
    if expected_run_id and manifest.get("run_id") != expected_run_id:
        raise TimelinesNotUsable(
            f"timelines partition {timelines.name} is from features run {manifest.get('run_id')}, but the "
            f"scores were computed from run {expected_run_id}: it was rebuilt since; "
            f"score again (`medscreen score emr --as-of {as_of}`)")
    require_prevalence_columns(timelines, as_of)
    table = read_partition(timelines, columns=["patient_key", *PREVALENT_COLUMNS])
    index = pc.index_in(scores.column("patient_key"), value_set=table.column("patient_key"))
    if index.null_count:
        raise TimelinesNotUsable(f"{index.null_count} scored patients have no row in timelines partition "
                                 f"{timelines.name}; {rebuild}")
    flags = {}
    for head, col in zip(HEADS, PREVALENT_COLUMNS):
        values = table.column(col).take(index)
        if values.null_count:
            raise TimelinesNotUsable(f"timelines partition {timelines.name} has {values.null_count} null "
                                     f"{col} values among the scored patients; {rebuild}")
        flags[head] = np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)
    return flags, manifest.get("run_id")


def build(settings: Settings, as_of: str, run_id: str | None = None, *, scores: Path | None = None,
          trial: bool = False) -> tuple[Path, StageLedger]:
    """Write LAKE/screening/as_of=D/ from emr_risk scores; return it and its ledger.

    ``scores`` is the exact scores version to screen (scoring passes the one it
    just committed); without it, the version committed now is resolved once and
    used throughout. The list's manifest records that version. A list from
    limited or forced-ungated scores is written under the trial namespace.

    Ledger unit is patients: in = scored patients, out = patients flagged on
    any head; of the rest, those who would have been flagged on a head but
    for being already diagnosed are ignored as ``excluded_prevalent``, the
    others by rule ``below_threshold`` / ``outside_top_k``.
    """
    as_of = as_of_str(as_of)
    lake = LakePaths(settings.lake.root)
    with contextlib.ExitStack() as held:
        scores_dir = held.enter_context(reading(scores if scores is not None else lake.scores(MODEL, as_of)))
        final = lake.screening(as_of, trial=trial)
        held.enter_context(partition_lock(final, run_id or f"screening-{as_of}"))
        return _build(settings, lake, as_of, run_id, scores_dir, final)


def _build(settings: Settings, lake: LakePaths, as_of: str, run_id: str | None, scores_dir: Path,
           final: Path) -> tuple[Path, StageLedger]:
    scores_manifest = read_manifest(scores_dir)
    if scores_manifest.get("trial") and not final.is_relative_to(lake.root / TRIAL):
        raise ValueError(f"scores version {scores_dir.name} of as-of {as_of} come from a limited or "
                         "forced-ungated run; their list belongs under the trial namespace, never the "
                         "outreach list")
    scores = read_partition(scores_dir)
    cfg = settings.scoring
    source = scores_manifest.get("input") or {}
    logical = lake.root / source.get("partition", lake.timelines(as_of).relative_to(lake.root).as_posix())
    # The exact version that was scored where it is still kept, else the current one (resolved once;
    # prevalence_for refuses it when it was rebuilt since scoring).
    timelines = resolve_partition(logical)
    if source.get("version") and (store_dir(logical) / source["version"]).is_dir():
        timelines = store_dir(logical) / source["version"]
    prevalent = timelines_run_id = None
    if cfg.screening_exclude_prevalent:
        prevalent, timelines_run_id = prevalence_for(scores, timelines, source.get("run_id"), as_of)
    else:
        log.warning("screening %s: scoring.screening_exclude_prevalent is false — patients already "
                    "diagnosed are NOT left out of the list", as_of)
    flagged, excluded = screen(scores, cfg.screening_thresholds, cfg.screening_top_k, prevalent)

    is_flagged = np.zeros(scores.num_rows, bool)
    if flagged.num_rows:
        is_flagged[pc.index_in(flagged.column("patient_key"), value_set=scores.column("patient_key"))
                   .to_numpy(zero_copy_only=False).astype(np.int64)] = True
    is_excluded = np.zeros(scores.num_rows, bool)
    for rows in excluded.values():
        is_excluded[rows] = True
    is_excluded &= ~is_flagged
    n_flagged, n_excluded = int(is_flagged.sum()), int(is_excluded.sum())
    rule = "outside_top_k" if cfg.screening_top_k is not None else "below_threshold"
    ignored = {rule: scores.num_rows - n_flagged - n_excluded}
    if prevalent is not None:
        ignored[EXCLUDED_PREVALENT] = n_excluded
    ledger = StageLedger("screening", records_in=scores.num_rows, records_out=n_flagged,
                         ignored=ignored, unit="patients")
    ledger.check()
    if prevalent is not None:
        exclusion: dict[str, Any] = {
            "enabled": True,
            "rule": ("per head, patients with prevalent_<head> in the timelines partition are left out: an "
                     "affirmed, history or assertion-less ICD-10-CM diagnosis (dx or dx_text) of the head's "
                     "group at any time up to the end of the as-of day, UTC (no lookback limit)"),
            "groups": {h: list(p) for h, p in LABEL_GROUPS.items()},
            "timelines": {"partition": logical.relative_to(lake.root).as_posix(),
                          "run_id": timelines_run_id},
            "timelines_version": timelines.name if timelines != logical else None,
            "prevalent_scored": {h: int(v.sum()) for h, v in prevalent.items()},
            "excluded_per_head": {h: int(len(excluded.get(h, ()))) for h in HEADS},
            "patients_excluded": n_excluded,
        }
    else:
        exclusion = {"enabled": False,
                     "warning": "scoring.screening_exclude_prevalent is false: patients already diagnosed "
                                "are NOT left out of this list"}
    manifest: dict[str, Any] = {
        "as_of": as_of, "run_id": run_id or scores_manifest.get("run_id"), "model": MODEL,
        "scores_run_id": scores_manifest.get("run_id"),
        "scores_version": scores_manifest.get("version"),
        "trial": bool(scores_manifest.get("trial")),
        "force_ungated": bool(scores_manifest.get("force_ungated")),
        "qc_passed": scores_manifest.get("qc_passed"),
        # From a --limit smoke run: a list of the first N timelines only, never the outreach list.
        "limit": scores_manifest.get("limit"),
        "criterion": {"top_k": cfg.screening_top_k} if cfg.screening_top_k is not None
        else {"thresholds": dict(cfg.screening_thresholds)},
        "exclude_prevalent": exclusion,
        "rows": flagged.num_rows, "patients": n_flagged,
        "per_head": {h: int(pc.sum(pc.equal(flagged.column("head"), h)).as_py() or 0) for h in HEADS},
        "ledger": ledger.to_dict(),
    }
    with atomic_partition(final, manifest, run_id=run_id) as staging:
        pq.write_table(flagged, staging / "part-00000.parquet", compression="zstd")
    return final, ledger
