"""The screening list: patients flagged for follow-up from a committed scores partition.

An outreach list for *incident* risk. Per head, a patient may be on the list
only when ELIGIBLE (preprocessing.eligibility, rules in
``scoring.eligibility`` with their cited sources): age in the head's range,
at least one encounter in the lookback (an empty timeline never qualifies),
and not already diagnosed with the head's disease (``prevalent_<head>`` in the
timelines partition the scores came from; ``scoring.screening_exclude_prevalent``
false turns only this last part off). Of the eligible, a patient is flagged
when the (calibrated) score reaches the head's threshold — the model card's
operating point, or ``scoring.screening_thresholds[head]`` as a recorded
override — or, when ``scoring.screening_top_k`` is set, when the score is among
the head's top k eligible (ties broken by patient_key so the list is
deterministic). One row per (patient, head) with the score and full
provenance. Written atomically to LAKE/screening/as_of=D/, whose manifest
records the rules, the thresholds and where each came from.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from conf.settings import Settings
from lake.commit import (atomic_partition, partition_files, read_manifest, read_partition, reading,
                         resolve_partition)
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.locks import partition_lock, store_dir
from lake.ledger import StageLedger
from lake.paths import TRIAL, LakePaths, as_of_str
from lake.schemas import HEADS, PREVALENT_COLUMNS, SCORES, SCREENING
from preprocessing import eligibility as elig

MODEL = "emr_risk"
PROVENANCE = ("model", "model_version", "engine_fingerprint", "precision", "run_id")
# Ledger reasons of the patient-level stage, for patients flagged on no head (first that applies):
# outside every head's age range; in some head's range but without the minimum history there;
# would have been flagged on a head where eligible but for being already diagnosed.
OUTSIDE_AGE_RANGE = "outside_age_range"
NO_ENCOUNTER = "no_encounter_in_lookback"
EXCLUDED_PREVALENT = "excluded_prevalent"
log = logging.getLogger(__name__)


class TimelinesNotUsable(ValueError):
    """The timelines partition the scores came from cannot say who is already diagnosed."""


class ThresholdsNotUsable(ValueError):
    """No usable threshold for a head: the card has no operating point for these scores."""


def _qualifying(scores: pa.Table, thresholds: dict[str, float], top_k: int | None,
                prevalent: dict[str, np.ndarray] | None, eligible: dict[str, np.ndarray] | None
                ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]]:
    """Per head: (rows that qualify, in rank order; of those, the already diagnosed; the head's
    scores; criterion). The one ranking rule of :func:`screen` and of :func:`fragment_candidates`."""
    unknown = set(thresholds) - set(HEADS)
    if unknown:
        raise ValueError(f"scoring.screening_thresholds names unknown heads {sorted(unknown)}; "
                         f"heads are {list(HEADS)}")
    # Patients in key order (Arrow sorts strings in C++); a stable sort by score over that order
    # breaks ties by patient_key. Top k orders everybody, once; a threshold orders only the rows
    # at or above it, per head (the same order, a fraction of the rows).
    keys = scores.column("patient_key")
    by_key = pc.sort_indices(keys).to_numpy() if top_k is not None else None
    out_heads = {}
    for head in HEADS:
        if top_k is None and head not in thresholds:
            continue
        s = scores.column(f"score_{head}").to_numpy().astype(np.float32)
        # Highest score first; NaN never qualifies; ties by patient_key.
        if by_key is not None:
            keyed = by_key[np.isfinite(s)[by_key]]
        else:
            rows = np.flatnonzero(np.isfinite(s) & (s >= thresholds[head]))
            keyed = rows[pc.sort_indices(keys.take(pa.array(rows))).to_numpy()]
        order = keyed[np.argsort(-s[keyed], kind="stable")]
        if eligible is not None:
            order = order[eligible[head][order]]
        out = prevalent[head][order] if prevalent is not None else np.zeros(len(order), bool)
        if top_k is not None:
            # Within the top k: fewer than k patients who may be flagged rank ahead.
            may_flag = (~out).astype(np.int64)
            qualifies = np.cumsum(may_flag) - may_flag < top_k
            criterion = f"top_k={top_k}"
        else:
            qualifies = s[order] >= thresholds[head]
            criterion = f"threshold>={thresholds[head]:g}"
        out_heads[head] = (order[qualifies], out[qualifies], s, criterion)
    return out_heads


def screen(scores: pa.Table, thresholds: dict[str, float], top_k: int | None,
           prevalent: dict[str, np.ndarray] | None = None,
           eligible: dict[str, np.ndarray] | None = None) -> tuple[pa.Table, dict[str, np.ndarray]]:
    """Flagged (patient, head) rows of a scores table, schema :data:`SCREENING`, sorted by head then
    rank, and per head the row indices of ``scores`` left out as already diagnosed.

    ``eligible`` maps a head to a boolean per scores row: age in range and minimum history
    (None: everyone); a patient not eligible is never flagged and never competes for the top k.
    ``prevalent`` maps a head to a boolean per scores row (None: nobody is left out). A prevalent
    patient is never flagged for that head; with top k the k are taken from the others. The
    indices returned are those eligible prevalent patients who would otherwise have been flagged.
    """
    scores = scores.combine_chunks()  # one chunk per column: gathers below are plain array takes
    parts, excluded = [], {}
    for head, (qualified, out, s, criterion) in _qualifying(scores, thresholds, top_k, prevalent,
                                                           eligible).items():
        chosen = qualified[~out]
        excluded[head] = qualified[out]
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
            **{c: scores.column(c).take(take) for c in PROVENANCE},
        }, schema=SCREENING))
    return (pa.concat_tables(parts) if parts else SCREENING.empty_table()), excluded


def select(scores: pa.Table, thresholds: dict[str, float], top_k: int | None,
           prevalent: dict[str, np.ndarray] | None = None,
           eligible: dict[str, np.ndarray] | None = None) -> pa.Table:
    """The flagged rows of :func:`screen`."""
    return screen(scores, thresholds, top_k, prevalent, eligible)[0]


def _rebuild_hint(as_of: str) -> str:
    return (f"rebuild the features for that date (`medscreen emr features --as-of {as_of}`) and score "
            f"again (`medscreen score emr --as-of {as_of}`)")


def require_prevalence_columns(timelines: Path, as_of: str, manifest: dict[str, Any] | None = None) -> None:
    """Raise :class:`TimelinesNotUsable` when a timelines partition predates ``prevalent_<head>``.

    Scoring calls this before it starts, so an old partition fails in seconds
    rather than after a full scoring run whose list could not be screened.
    ``manifest`` (the partition's, when the caller holds it) names the features run in the error.
    """
    for f in partition_files(timelines):
        missing = [c for c in PREVALENT_COLUMNS if c not in pq.read_schema(f).names]
        if missing:
            run_id = (manifest if manifest is not None else read_manifest(timelines)).get("run_id")
            raise TimelinesNotUsable(
                f"timelines partition {timelines.name} (features run {run_id}) predates the "
                f"columns {missing} that screening needs to leave already-diagnosed patients out of the "
                f"outreach list; {_rebuild_hint(as_of)} — or set "
                "scoring.screening_exclude_prevalent: false to screen without leaving them out")


def read_facts(path: str | Path, with_prevalence: bool = True, row_groups: list[int] | None = None,
               num_rows: int | None = None) -> pa.Table:
    """Eligibility facts of one timelines file (or of ``row_groups`` of it, first ``num_rows`` rows):
    ``patient_key``, ``age_years``, ``prevalent_<head>`` (``with_prevalence``) and ``encounters``
    (int64; the features job's column, or for older partitions the encounter tokens counted)."""
    f = pq.ParquetFile(path)
    flag_cols = list(PREVALENT_COLUMNS) if with_prevalence else []
    counted = "encounters" in f.schema_arrow.names
    columns = ["patient_key", "age_years", *flag_cols, "encounters" if counted else "tokens"]
    t = f.read(columns=columns) if row_groups is None else f.read_row_groups(row_groups, columns=columns)
    if num_rows is not None:
        t = t.slice(0, num_rows)
    encounters = elig.encounters_of(t)
    return t.drop_columns(["encounters" if counted else "tokens"]).append_column("encounters", encounters)


def facts_of(keys: pa.ChunkedArray | pa.Array, table: pa.Table, timelines_name: str, as_of: str,
             with_prevalence: bool = True) -> dict[str, np.ndarray]:
    """The facts (:func:`read_facts` rows) of each of ``keys``, in their order; raises
    :class:`TimelinesNotUsable` when a key has no row or a needed fact is null."""
    rebuild = _rebuild_hint(as_of)
    index = pc.index_in(keys, value_set=table.column("patient_key"))
    if index.null_count:
        raise TimelinesNotUsable(f"{index.null_count} scored patients have no row in timelines partition "
                                 f"{timelines_name}; {rebuild}")
    encounters = table.column("encounters").take(index)
    if encounters.null_count:
        raise TimelinesNotUsable(f"timelines partition {timelines_name} has {encounters.null_count} null "
                                 f"encounters values among the scored patients; {rebuild}")
    facts = {"age_years": table.column("age_years").take(index).to_numpy(zero_copy_only=False).astype(np.float64),
             "encounters": encounters.to_numpy(zero_copy_only=False)}
    for head, col in zip(HEADS, PREVALENT_COLUMNS):
        if not with_prevalence:
            break
        values = table.column(col).take(index)
        if values.null_count:
            raise TimelinesNotUsable(f"timelines partition {timelines_name} has {values.null_count} null "
                                     f"{col} values among the scored patients; {rebuild}")
        facts[col] = np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)
    return facts


def timeline_facts(scores: pa.Table, timelines: Path, expected_run_id: str | None, as_of: str,
                   with_prevalence: bool = True, manifest: dict[str, Any] | None = None
                   ) -> tuple[dict[str, np.ndarray], str | None]:
    """What eligibility needs of every scored patient, in scores row order, from the timelines
    partition the scores came from: ``age_years``, ``encounters`` (encounter tokens in the
    timeline) and, ``with_prevalence``, ``prevalent_<head>`` per head; and that partition's
    features run id.

    Raises :class:`TimelinesNotUsable` when the partition was rebuilt since scoring, predates
    the prevalence columns, or lacks a scored patient: the fix is to rebuild and rescore.
    ``manifest`` is the partition's manifest when the caller already holds it (else it is read).
    """
    manifest = manifest if manifest is not None else read_manifest(timelines)
    if expected_run_id and manifest.get("run_id") != expected_run_id:
        raise TimelinesNotUsable(
            f"timelines partition {timelines.name} is from features run {manifest.get('run_id')}, but the "
            f"scores were computed from run {expected_run_id}: it was rebuilt since; "
            f"score again (`medscreen score emr --as-of {as_of}`)")
    if with_prevalence:
        require_prevalence_columns(timelines, as_of, manifest)
    flag_cols = list(PREVALENT_COLUMNS) if with_prevalence else []
    # File by file, so older partitions' token lists are reduced to a count before the next is read.
    parts = [read_facts(f, with_prevalence) for f in partition_files(timelines)]
    table = pa.concat_tables(parts) if parts else pa.table(
        {"patient_key": pa.array([], pa.string()), "age_years": pa.array([], pa.float32()),
         **{c: pa.array([], pa.bool_()) for c in flag_cols}, "encounters": pa.array([], pa.int64())})
    return (facts_of(scores.column("patient_key"), table, timelines.name, as_of, with_prevalence),
            manifest.get("run_id"))


@dataclass(frozen=True)
class Criteria:
    """What decides the list, fixed before scoring starts: per head its eligibility rule, and its
    threshold (resolved from the card or settings) or the top k; and whether the already
    diagnosed are left out. Scoring hands it to the engine actors, which keep per fragment only
    the rows that can reach the list (:func:`fragment_candidates`)."""

    rules: dict[str, elig.HeadRule]
    thresholds: dict[str, float]
    top_k: int | None
    exclude_prevalent: bool

    def to_dict(self) -> dict[str, Any]:
        return {"rules": {h: asdict(r) for h, r in self.rules.items()}, "thresholds": dict(self.thresholds),
                "top_k": self.top_k, "exclude_prevalent": self.exclude_prevalent}


def criteria_of(settings: Settings, scores_manifest: dict[str, Any]) -> Criteria:
    """The list's :class:`Criteria` under ``settings`` for scores with this manifest's calibration
    (raises :class:`ThresholdsNotUsable` as :func:`resolve_thresholds` does)."""
    cfg = settings.scoring
    thresholds = {} if cfg.screening_top_k is not None else resolve_thresholds(settings, scores_manifest)[0]
    return Criteria(head_rules(settings), thresholds, cfg.screening_top_k, cfg.screening_exclude_prevalent)


def fragment_candidates(criteria: Criteria, scores: pa.Table, facts: dict[str, np.ndarray]
                        ) -> tuple[pa.Table, dict[str, Any]]:
    """The rows of ``scores`` (SCORES columns) that can reach the list, with each head's eligibility
    code (``code_<head>``, preprocessing.eligibility), and the counts of all of its rows that the
    list's ledger and manifest need (:func:`merge_candidates` adds them up).

    A row is a candidate when it qualifies on some head within ``scores`` alone: at or above the
    head's threshold and eligible, or, with top k, ranked (eligible) ahead of the k-th patient
    not yet diagnosed. Whoever qualifies among all patients qualifies within their own part, so
    :func:`screen` over the merged candidates of all parts gives the list of all patients.
    """
    n = scores.num_rows
    prevalent = ({h: facts[c] for h, c in zip(HEADS, PREVALENT_COLUMNS)} if criteria.exclude_prevalent
                 else None)
    codes = {h: elig.reasons(criteria.rules[h], facts["age_years"], facts["encounters"],
                             prevalent[h] if prevalent is not None else None) for h in HEADS}
    keep = np.zeros(n, bool)
    for qualified, *_ in _qualifying(scores, criteria.thresholds, criteria.top_k, *_eligibility(codes,
                                     criteria.exclude_prevalent)).values():
        keep[qualified] = True
    in_some_range = np.zeros(n, bool)
    eligible_somewhere = np.zeros(n, bool)
    for h in HEADS:
        in_some_range |= codes[h] != elig.OUTSIDE_AGE_RANGE
        eligible_somewhere |= (codes[h] == elig.ELIGIBLE) | (codes[h] == elig.ALREADY_DIAGNOSED)
    rows = pa.array(np.flatnonzero(keep))
    table = scores.take(rows)
    for h in HEADS:
        table = table.append_column(f"code_{h}", pa.array(codes[h][keep], pa.int8()))
    population = {"scored": n, "heads": {h: elig.counts(codes[h]) for h in HEADS},
                  OUTSIDE_AGE_RANGE: int((~in_some_range).sum()),
                  NO_ENCOUNTER: int((in_some_range & ~eligible_somewhere).sum()),
                  "prevalent": {h: int(v.sum()) for h, v in prevalent.items()} if prevalent is not None else None}
    return table, population


def _eligibility(codes: dict[str, np.ndarray], exclude_prevalent: bool
                 ) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray]]:
    """(already diagnosed, eligible by age and history) per head from eligibility codes: the
    prevalence rule stays in screen(), which reports whom it left out."""
    eligible = {h: (c == elig.ELIGIBLE) | (c == elig.ALREADY_DIAGNOSED) for h, c in codes.items()}
    prevalent = {h: c == elig.ALREADY_DIAGNOSED for h, c in codes.items()} if exclude_prevalent else None
    return prevalent, eligible


def merge_candidates(parts: list[tuple[pa.Table, dict[str, Any]]]) -> tuple[pa.Table, dict[str, Any]]:
    """One candidate set and one population count of many parts' (:func:`fragment_candidates`)."""
    tables = [t for t, _ in parts]
    merged: dict[str, Any] = {"scored": 0, "heads": {h: {} for h in HEADS}, OUTSIDE_AGE_RANGE: 0, NO_ENCOUNTER: 0,
                              "prevalent": None}
    for _, pop in parts:
        merged["scored"] += pop["scored"]
        merged[OUTSIDE_AGE_RANGE] += pop[OUTSIDE_AGE_RANGE]
        merged[NO_ENCOUNTER] += pop[NO_ENCOUNTER]
        for h in HEADS:
            for reason, c in pop["heads"][h].items():
                merged["heads"][h][reason] = merged["heads"][h].get(reason, 0) + c
        if pop["prevalent"] is not None:
            merged["prevalent"] = {h: (merged["prevalent"] or {}).get(h, 0) + c for h, c in pop["prevalent"].items()}
    if not parts:
        merged["heads"] = {h: elig.counts(np.zeros(0, np.int8)) for h in HEADS}
    return (pa.concat_tables(tables) if tables else _empty_candidates()), merged


def _empty_candidates() -> pa.Table:
    return pa.schema([*SCORES, *[(f"code_{h}", pa.int8()) for h in HEADS]]).empty_table()


def head_rules(settings: Settings) -> dict[str, elig.HeadRule]:
    """Each head's eligibility rule from ``scoring.eligibility``; every head needs one."""
    rules = settings.scoring.eligibility
    unknown, missing = set(rules) - set(HEADS), [h for h in HEADS if h not in rules]
    if unknown or missing:
        raise ValueError(f"scoring.eligibility must name exactly the heads {list(HEADS)}; "
                         f"unknown {sorted(unknown)}, missing {missing}")
    return {h: elig.HeadRule(r.min_age_years, r.max_age_years, r.min_encounters) for h, r in rules.items()}


def resolve_thresholds(settings: Settings, scores_manifest: dict[str, Any]
                       ) -> tuple[dict[str, float], dict[str, Any]]:
    """Each head's threshold and where it came from: the model card's operating point, or a
    ``scoring.screening_thresholds`` override (recorded with the card's value beside it).

    The card's thresholds are on the scale of its calibration: scores calibrated otherwise
    (or not at all) cannot use them. Raises :class:`ThresholdsNotUsable` naming the fix.
    """
    from engines.model_card import load_card
    from engines.operating_points import thresholds_from_card

    overrides = dict(settings.scoring.screening_thresholds)
    unknown = set(overrides) - set(HEADS)
    if unknown:
        raise ValueError(f"scoring.screening_thresholds names unknown heads {sorted(unknown)}; "
                         f"heads are {list(HEADS)}")
    card = load_card(settings, MODEL, verify=False) if set(overrides) != set(HEADS) else {}
    card_points = thresholds_from_card(card) if card else {}
    points = (card.get("operating_points") or {}) if card else {}
    scored_with = (scores_manifest.get("calibration") or {}).get("id")
    thresholds, record = {}, {}
    for head in HEADS:
        if head in overrides:
            thresholds[head] = float(overrides[head])
            record[head] = {"threshold": thresholds[head], "source": "override (scoring.screening_thresholds)",
                            "card_threshold": card_points.get(head)}
            log.warning("screening: %s threshold %g is a configuration override (card: %s)", head,
                        thresholds[head], card_points.get(head))
            continue
        fix = (f"recalibrate the model (python -m models.emr_risk.train --calibrate-only) and score again, "
               f"or set scoring.screening_thresholds.{head}")
        if head not in card_points:
            raise ThresholdsNotUsable(f"model card {card.get('card_file')} has no operating point for head "
                                      f"{head!r}; {fix}")
        if points.get("calibration_id") != scored_with:
            raise ThresholdsNotUsable(
                f"the card's operating points are for calibration {points.get('calibration_id')}, but these "
                f"scores were calibrated with {scored_with} (scores run {scores_manifest.get('run_id')}); {fix}")
        thresholds[head] = card_points[head]
        record[head] = {"threshold": thresholds[head],
                        "source": f"model card {card.get('name')} {card.get('version')} operating point",
                        "rule": points.get("rule"), "calibration_id": points.get("calibration_id"),
                        "holdout": (points.get("heads") or {}).get(head, {}).get("holdout")}
    return thresholds, record


def build(settings: Settings, as_of: str, run_id: str | None = None, *, lake: LakePaths | None = None,
          scores: Path | None = None, scores_manifest: dict[str, Any] | None = None,
          timelines: Path | None = None, timelines_manifest: dict[str, Any] | None = None,
          trial: bool = False, candidates: Candidates | None = None) -> tuple[Path, StageLedger]:
    """Write LAKE/screening/as_of=D/ from emr_risk scores; return it and its ledger.

    ``scores`` is the exact scores version to screen (scoring passes the one it
    just committed, with its manifest); without it, the version committed now is
    resolved once and used throughout. The list's manifest records that version.
    ``timelines`` is the timelines version the scores were computed from, when
    the caller holds it (scoring passes its leased version and manifest); else
    the version the scores' manifest names is found. ``lake`` is the caller's
    LakePaths (default: the configured lake). A list from limited or
    forced-ungated scores is written under the trial namespace.

    ``candidates`` (scoring passes them, with the timelines it holds) are the
    merged per-fragment candidates its engine actors made under the same
    :class:`Criteria`: the list is then built from them without reading every
    score and timeline; without them, or under other criteria, every score is read.

    Ledger unit is patients: in = scored patients, out = patients flagged on
    any head; each of the rest is ignored by the first rule that applies:
    ``outside_age_range`` (outside every head's range), ``no_encounter_in_lookback``
    (in some head's range, without the minimum history on every such head),
    ``excluded_prevalent`` (would have been flagged on a head where eligible but
    for being already diagnosed), else ``below_threshold`` / ``outside_top_k``.
    The manifest's ``eligibility`` also counts, per head, every scored patient
    by the first reason that keeps them off that head's list.
    """
    as_of = as_of_str(as_of)
    lake = lake or LakePaths(settings.lake.root)
    with contextlib.ExitStack() as held:
        scores_dir = held.enter_context(reading(scores if scores is not None else lake.scores(MODEL, as_of)))
        if scores is None or scores_manifest is None:
            scores_manifest = read_manifest(scores_dir)
        final = lake.screening(as_of, trial=trial)
        held.enter_context(partition_lock(final, run_id or f"screening-{as_of}"))
        return _build(settings, lake, as_of, run_id, scores_dir, scores_manifest, final,
                      timelines, timelines_manifest, candidates)


@dataclass
class Candidates:
    """Every scored patient who can reach the list (:func:`fragment_candidates`, merged), the
    population counts of all scored patients, and the :class:`Criteria` they were made under."""

    criteria: Criteria
    table: pa.Table
    population: dict[str, Any]


def _build(settings: Settings, lake: LakePaths, as_of: str, run_id: str | None, scores_dir: Path,
           scores_manifest: dict[str, Any], final: Path, handed_timelines: Path | None,
           timelines_manifest: dict[str, Any] | None, candidates: Candidates | None = None
           ) -> tuple[Path, StageLedger]:
    key_fp = stage_key_fingerprint(settings.pseudonym, lake.root,
                                   {f"scores version {scores_dir.name}": scores_manifest})
    if scores_manifest.get("trial") and not final.is_relative_to(lake.root / TRIAL):
        raise ValueError(f"scores version {scores_dir.name} of as-of {as_of} come from a limited or "
                         "forced-ungated run; their list belongs under the trial namespace, never the "
                         "outreach list")
    cfg = settings.scoring
    source = scores_manifest.get("input") or {}
    logical = lake.root / source.get("partition", lake.timelines(as_of).relative_to(lake.root).as_posix())
    if candidates is not None and handed_timelines is not None and timelines_manifest is not None:
        timelines, timelines_run_id = handed_timelines, timelines_manifest.get("run_id")
        thresholds, threshold_record = ({}, {}) if cfg.screening_top_k is not None else \
            resolve_thresholds(settings, scores_manifest)
        if candidates.criteria != Criteria(head_rules(settings), thresholds, cfg.screening_top_k,
                                           cfg.screening_exclude_prevalent):
            candidates = None
    else:
        candidates = None
    built_from = "fragment candidates"
    if candidates is None:
        built_from = "every score"
        # Every score and every scored patient's facts: a list built from the committed scores alone.
        # Provenance columns hold one value per run: read them dictionary-encoded (the list's rows
        # are cast back to plain strings by its schema), which is most of what reading them costs.
        scores = read_partition(scores_dir, read_dictionary=list(PROVENANCE))
        if handed_timelines is not None:
            timelines = handed_timelines
        else:
            # The exact version that was scored where it is still kept, else the current one (resolved
            # once; timeline_facts refuses it when it was rebuilt since scoring).
            timelines_manifest = None
            timelines = resolve_partition(logical)
            if source.get("version") and (store_dir(logical) / source["version"]).is_dir():
                timelines = store_dir(logical) / source["version"]
        facts, timelines_run_id = timeline_facts(scores, timelines, source.get("run_id"), as_of,
                                                 with_prevalence=cfg.screening_exclude_prevalent,
                                                 manifest=timelines_manifest)
        thresholds, threshold_record = ({}, {}) if cfg.screening_top_k is not None else \
            resolve_thresholds(settings, scores_manifest)
        criteria = Criteria(head_rules(settings), thresholds, cfg.screening_top_k, cfg.screening_exclude_prevalent)
        candidates = Candidates(criteria, *fragment_candidates(criteria, scores, facts))
    if not cfg.screening_exclude_prevalent:
        log.warning("screening %s: scoring.screening_exclude_prevalent is false — patients already "
                    "diagnosed are NOT left out of the list", as_of)
    table, population = candidates.table, candidates.population
    codes = {h: table.column(f"code_{h}").to_numpy(zero_copy_only=False) for h in HEADS}
    prevalent, eligible = _eligibility(codes, cfg.screening_exclude_prevalent)
    flagged, excluded = screen(table, thresholds, cfg.screening_top_k, prevalent, eligible)

    is_flagged = np.zeros(table.num_rows, bool)
    if flagged.num_rows:
        is_flagged[pc.index_in(flagged.column("patient_key"), value_set=table.column("patient_key"))
                   .to_numpy(zero_copy_only=False).astype(np.int64)] = True
    is_excluded = np.zeros(table.num_rows, bool)
    for rows in excluded.values():
        is_excluded[rows] = True
    # Left out on some head where eligible (hence in range, with history), flagged on none.
    excluded_prevalent = is_excluded & ~is_flagged
    rule = "outside_top_k" if cfg.screening_top_k is not None else "below_threshold"
    n_flagged = int(is_flagged.sum())
    ignored = {OUTSIDE_AGE_RANGE: population[OUTSIDE_AGE_RANGE], NO_ENCOUNTER: population[NO_ENCOUNTER]}
    if prevalent is not None:
        ignored[EXCLUDED_PREVALENT] = int(excluded_prevalent.sum())
    ignored[rule] = population["scored"] - n_flagged - sum(ignored.values())
    ledger = StageLedger("screening", records_in=population["scored"], records_out=n_flagged,
                         ignored=ignored, unit="patients")
    ledger.check()
    n_excluded = ignored.get(EXCLUDED_PREVALENT, 0)
    if prevalent is not None:
        # Here, not at module level: the engine actors import this module for fragment_candidates.
        from preprocessing.timelines import LABEL_GROUPS

        exclusion: dict[str, Any] = {
            "enabled": True,
            "rule": ("per head, patients with prevalent_<head> in the timelines partition are left out: an "
                     "affirmed, history or assertion-less diagnosis (dx or dx_text, any vocabulary) of the head's "
                     "code group, clinically dated and recorded up to the end of the as-of day, UTC (no lookback "
                     "limit)"),
            "groups": {h: list(p) for h, p in LABEL_GROUPS.items()},
            "timelines": {"partition": logical.relative_to(lake.root).as_posix(),
                          "run_id": timelines_run_id},
            "timelines_version": timelines.name if timelines != logical else None,
            "prevalent_scored": dict(population["prevalent"]),
            "excluded_per_head": {h: int(len(excluded.get(h, ()))) for h in HEADS},
            "patients_excluded": n_excluded,
        }
    else:
        exclusion = {"enabled": False,
                     "warning": "scoring.screening_exclude_prevalent is false: patients already diagnosed "
                                "are NOT left out of this list"}
    per_head = {h: int(pc.sum(pc.equal(flagged.column("head"), h)).as_py() or 0) for h in HEADS}
    eligibility = {
        "rule": ("per head: age in completed years on the as-of day within [min_age_years, max_age_years], "
                 "at least min_encounters encounter tokens in the timeline, and not already diagnosed; "
                 "each patient counted under the first reason that keeps them off"),
        "heads": {h: {**cfg.eligibility[h].model_dump(), "counts": dict(population["heads"][h]),
                      "flagged": per_head[h],
                      "flagged_per_1000_eligible": (round(1000 * per_head[h] / population["heads"][h]["eligible"], 1)
                                                    if population["heads"][h]["eligible"] else None)}
                  for h in HEADS},
    }
    manifest: dict[str, Any] = {
        "as_of": as_of, "run_id": run_id or scores_manifest.get("run_id"), "model": MODEL,
        "scores_run_id": scores_manifest.get("run_id"),
        "scores_version": scores_manifest.get("version"),
        "trial": bool(scores_manifest.get("trial")),
        "force_ungated": bool(scores_manifest.get("force_ungated")),
        "qc_passed": scores_manifest.get("qc_passed"),
        # From a --limit smoke run: a list of the first N timelines only, never the outreach list.
        "limit": scores_manifest.get("limit"),
        "calibration": scores_manifest.get("calibration"),
        "criterion": {"top_k": cfg.screening_top_k} if cfg.screening_top_k is not None
        else {"thresholds": threshold_record},
        "eligibility": eligibility,
        "exclude_prevalent": exclusion,
        "rows": flagged.num_rows, "patients": n_flagged,
        "per_head": per_head,
        # How the list was made: from the scoring actors' per-fragment candidates, or every score read.
        "built_from": {"source": built_from, "candidate_rows": table.num_rows},
        "ledger": ledger.to_dict(),
        KEY_FIELD: key_fp,
    }
    with atomic_partition(final, manifest, run_id=run_id) as staging:
        pq.write_table(flagged, staging / "part-00000.parquet", compression="zstd")
    return final, ledger
