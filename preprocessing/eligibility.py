"""Who may be on a head's screening list: the pure eligibility rule, one definition for scoring and training.

A patient is eligible for a head's outreach list when, on the as-of day,

1. their age in completed years lies in the head's range (``min_age_years`` ≤
   ⌊age⌋ ≤ ``max_age_years``; no upper bound when it is None),
2. their timeline holds at least ``min_encounters`` encounter tokens (the
   minimum history: an encounter in the lookback window; an empty timeline
   never qualifies), and
3. they are not already diagnosed with the head's disease (``prevalent_<head>``),
   where that exclusion is on.

Each patient not eligible gets the FIRST reason that applies, in that order, so
per-head counts add up: ``outside_age_range``, ``no_encounter_in_lookback``,
``already_diagnosed``. The rules per head (with the source each is taken from)
are settings (``scoring.eligibility``); this module only applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from preprocessing.vocabulary import ENCOUNTER, SPECIAL_TOKENS

# Token id of ``encounter``: special tokens come first, in a fixed order (vocabulary.py).
ENCOUNTER_ID = SPECIAL_TOKENS.index(ENCOUNTER)

ELIGIBLE = 0
OUTSIDE_AGE_RANGE = 1
NO_ENCOUNTER = 2
ALREADY_DIAGNOSED = 3
# Reason names by code, in the order they are checked.
REASONS = {OUTSIDE_AGE_RANGE: "outside_age_range", NO_ENCOUNTER: "no_encounter_in_lookback",
           ALREADY_DIAGNOSED: "already_diagnosed"}


@dataclass(frozen=True)
class HeadRule:
    """One head's eligibility: an inclusive age range in completed years and a minimum history."""

    min_age_years: int
    max_age_years: int | None
    min_encounters: int

    def __post_init__(self) -> None:
        if self.min_encounters < 1:
            # The rule that keeps an empty timeline off every list.
            raise ValueError(f"min_encounters must be at least 1, got {self.min_encounters}")
        if self.max_age_years is not None and self.max_age_years < self.min_age_years:
            raise ValueError(f"max_age_years {self.max_age_years} is below min_age_years {self.min_age_years}")


def encounter_counts(tokens: pa.Array | pa.ChunkedArray | np.ndarray) -> np.ndarray:
    """Encounter tokens per timeline: from the timelines' ``tokens`` list column, or a padded id matrix."""
    if isinstance(tokens, np.ndarray):
        return (tokens == ENCOUNTER_ID).sum(axis=1).astype(np.int64)
    if isinstance(tokens, pa.ChunkedArray):
        tokens = tokens.combine_chunks()
    n = len(tokens)
    flat = pc.list_flatten(tokens)
    parents = pc.list_parent_indices(tokens).to_numpy(zero_copy_only=False)
    hit = pc.equal(flat, ENCOUNTER_ID).to_numpy(zero_copy_only=False).astype(bool)
    return np.bincount(parents[hit], minlength=n).astype(np.int64)


def encounters_of(table: pa.Table) -> pa.ChunkedArray | pa.Array:
    """Encounter tokens per timeline row (int64): the features job's ``encounters`` column, or, for
    a partition written before the job counted them, its ``tokens`` counted."""
    if "encounters" in table.column_names:
        return table.column("encounters").cast(pa.int64())
    return pa.array(encounter_counts(table.column("tokens")), pa.int64())


def reasons(rule: HeadRule, age_years: np.ndarray, encounters: np.ndarray,
            prevalent: np.ndarray | None = None) -> np.ndarray:
    """Per patient, :data:`ELIGIBLE` or the first reason (code) that keeps them off the head's list.

    A missing age (NaN) is outside every range. ``prevalent`` None: nobody is left out as
    already diagnosed.
    """
    age = np.asarray(age_years, dtype=np.float64)
    completed = np.floor(np.where(np.isfinite(age), age, -1.0))
    in_range = np.isfinite(age) & (completed >= rule.min_age_years)
    if rule.max_age_years is not None:
        in_range &= completed <= rule.max_age_years
    out = np.full(len(age), ELIGIBLE, np.int8)
    out[~in_range] = OUTSIDE_AGE_RANGE
    out[in_range & (np.asarray(encounters) < rule.min_encounters)] = NO_ENCOUNTER
    if prevalent is not None:
        out[(out == ELIGIBLE) & np.asarray(prevalent, dtype=bool)] = ALREADY_DIAGNOSED
    return out


def counts(codes: np.ndarray) -> dict[str, int]:
    """Patients per reason (every reason listed, zeros included), plus ``eligible``."""
    out = {"eligible": int((codes == ELIGIBLE).sum())}
    out.update({name: int((codes == code).sum()) for code, name in REASONS.items()})
    return out
