"""Point-in-time timelines and incident-disease labels for one patient.

These pure functions define the features; the Spark job (jobs/emr_features)
computes the same thing with DataFrame expressions and the tests and the
benchmark's pandas baseline check the two agree row for row.

Time rules (all UTC; ``as_of`` is a calendar date). Every event has a
clinical time (``event_time``) and a known time (``known_time``: when the
record said it; the clinical time where the source has nothing better). An
event is *available* on D when both are before ``D + 1 day 00:00``: a
condition recorded in 2018 with an onset in 2005 is not known in 2010.

* The timeline for ``as_of`` = D holds available events with
  ``D - lookback_days 00:00 <= event_time`` — everything known by the end of
  the as-of day, nothing after it.
* Events are ordered oldest → newest by (event_time, token id) so ties are
  deterministic; only the most recent ``max_tokens`` are kept.
* ``days_before`` = D − the UTC calendar date of the event (0 … lookback_days).
* ``age_years`` = (D − birth_date) in days / 365.25, as float32.
* A patient with no usable events in the window still gets a row with
  ``length`` 0: the screening population is the patient table, and a model can
  still score age and sex.

Prevalence, per head (:data:`LABEL_GROUPS`: t2d → group ``t2d``, ckd →
``ckd``, hf → ``heart_failure`` of conf/code_groups.yaml, whatever the
vocabulary: a diagnosis is in a group when its ``code_groups`` says so, as
``preprocessing.code_groups.groups_for`` decided at ingest; kind ``dx`` or
``dx_text``; :func:`prevalence`, columns ``prevalent_<head>``, always
computed, never null):

* True when an affirmed or history diagnosis of the group (or a coded one with
  no assertion) was available at any time up to the end of the as-of day —
  negated, family, possible and hypothetical ones do not count. The lookback window
  does *not* apply: a diagnosis of a chronic disease six years ago is still a
  diagnosis, and the window only bounds what the model sees. Nothing after the
  as-of day counts, so the flag is point-in-time like the timeline.
* Screening uses it to leave already diagnosed patients out of an
  incident-risk outreach list; the labels use the same rule.

Label rules, per group (same groups):

* NULL if *prevalent* (above). A prevalent case is not an incident one.
* 1 if an affirmed (or assertion-less coded, or a coded ``dx`` with history
  status: a resolved chronic disease was diagnosed all the same) diagnosis of
  the group became available in (D, D + horizon_days] — i.e.
  ``D + 1 day 00:00 <= max(event_time, known_time) < D + horizon_days + 1 day 00:00``:
  not known on D, known by the end of the horizon. A note's "history of"
  mention says the onset was earlier and is no incident case.
* 0 if not, provided the patient was still observed at the end of the horizon:
  any event at or after ``D + horizon_days 00:00``.
* NULL otherwise (lost to follow-up: we cannot tell a negative from a gap).

The as-of population (:func:`population_status`): a timeline exists only for a
patient alive, registered and under observation on D, from the patients table
(``death_date``) and the observation periods (start/end dates, inclusive; end
NULL = open):

* ``deceased`` — a death date on or before D;
* ``not_yet_registered`` — no observation period starts on or before D (for
  FHIR, whose periods start at the first record known: no record yet);
* ``not_under_observation`` — periods started, but none covers D.

Censoring of labels (:func:`censor_date`): follow-up ends at the earlier of
the death date and the end of the observation period covering D (an open
period does not censor). With censor day C:

* 1 only if the incident diagnosis falls on or before C (events after death or
  outside observation are not evidence);
* 0 only if C is on or after D + horizon_days (observed through the whole
  horizon) and the follow-up rule above holds;
* NULL otherwise: a patient who died or left observation inside the horizon
  without a diagnosis is censored, never a negative.
"""
from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from preprocessing.eligibility import ENCOUNTER_ID
from preprocessing.vocabulary import DX_KINDS, TOKEN_ASSERTIONS

if TYPE_CHECKING:
    import pyarrow as pa

    from preprocessing.vocabulary import Vocabulary

US_PER_DAY = 86_400_000_000
_EPOCH = dt.date(1970, 1, 1)
DAYS_PER_YEAR = 365.25
_NAT = np.iinfo(np.int64).min  # a missing event_time (NaT) as int64 µs

# Label heads → the code groups (conf/code_groups.yaml) that define them.
LABEL_GROUPS: dict[str, tuple[str, ...]] = {"t2d": ("t2d",), "ckd": ("ckd",), "hf": ("heart_failure",)}
SEXES = ("F", "M", "U")


@dataclass(frozen=True)
class Timeline:
    """One patient's point-in-time features as of a date."""

    tokens: list[int]
    days_before: list[int]
    length: int
    age_years: float
    sex: str


def epoch_day(d: dt.date) -> int:
    """Days since 1970-01-01 (UTC calendar)."""
    return (d - _EPOCH).days


def window_us(as_of: dt.date, lookback_days: int) -> tuple[int, int]:
    """[start, end) of the feature window in µs since the epoch, UTC."""
    end_day = epoch_day(as_of) + 1
    return (end_day - 1 - lookback_days) * US_PER_DAY, end_day * US_PER_DAY


def to_epoch_us(times: Sequence[object] | np.ndarray) -> np.ndarray:
    """Event times (datetime64, tz-aware datetimes or int µs since the epoch) → int64 µs."""
    arr = np.asarray(times)
    if arr.dtype.kind == "M":
        return arr.astype("datetime64[us]").astype(np.int64)
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    out = np.empty(len(arr), dtype=np.int64)
    for i, t in enumerate(arr):
        if not isinstance(t, dt.datetime) or t.tzinfo is None:
            raise ValueError(f"event_time {t!r} is not a timezone-aware datetime; "
                             "event times must be UTC instants")
        out[i] = (t - dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)) // dt.timedelta(microseconds=1)
    return out


def normalise_sex(sex: str | None) -> str:
    """F, M or U (anything else, including missing, is U)."""
    s = (sex or "").strip(" ").upper()
    return s if s in SEXES else "U"


def age_years(birth_date: dt.date, as_of: dt.date) -> float:
    """Age at the as-of date in years (days / 365.25), rounded to float32."""
    return float(np.float32((as_of - birth_date).days / DAYS_PER_YEAR))


Period = tuple[dt.date, dt.date | None]  # (start, end) inclusive; end None = open


def population_status(death_date: dt.date | None, periods: Sequence[Period], as_of: dt.date) -> str | None:
    """None when the patient is in the as-of population; else the reason (module docstring)."""
    if death_date is not None and death_date <= as_of:
        return "deceased"
    started = [p for p in periods if p[0] is not None and p[0] <= as_of]
    if not started:
        return "not_yet_registered"
    if not any(end is None or end >= as_of for _, end in started):
        return "not_under_observation"
    return None


def censor_date(death_date: dt.date | None, periods: Sequence[Period], as_of: dt.date) -> dt.date | None:
    """Last day of follow-up for labels: the earlier of death and the end of the period
    covering ``as_of``; None when neither ends it (module docstring)."""
    covering = [end for start, end in periods
                if start is not None and start <= as_of and (end is None or end >= as_of)]
    period_end = None if not covering or any(e is None for e in covering) else max(covering)
    ends = [d for d in (death_date, period_end) if d is not None]
    return min(ends) if ends else None


def build_timeline(event_time_us: Sequence[int] | np.ndarray, token_ids: Sequence[int] | np.ndarray,
                   birth_date: dt.date, sex: str | None, as_of: dt.date, lookback_days: int,
                   max_tokens: int, known_time_us: Sequence[int] | np.ndarray | None = None) -> Timeline:
    """One patient's timeline as of ``as_of`` (see the module docstring for the rules).

    ``token_ids`` are vocabulary ids, negative for events that yield no token
    (:data:`preprocessing.vocabulary.DROPPED`); they are left out. An event
    whose ``known_time_us`` (default: its clinical time) is after the as-of
    day is left out too.
    """
    if max_tokens < 1 or lookback_days < 0:
        raise ValueError(f"max_tokens must be ≥ 1 and lookback_days ≥ 0 (got {max_tokens}, {lookback_days})")
    t = to_epoch_us(event_time_us)
    tok = np.asarray(token_ids, dtype=np.int64)
    if t.shape != tok.shape:
        raise ValueError(f"event_time_us ({t.shape}) and token_ids ({tok.shape}) differ in length")
    known = t if known_time_us is None else to_epoch_us(known_time_us)
    if known.shape != t.shape:
        raise ValueError(f"known_time_us ({known.shape}) and event_time_us ({t.shape}) differ in length")
    start, end = window_us(as_of, lookback_days)
    keep = (t >= start) & (t < end) & (known < end) & (tok >= 0)
    t, tok = t[keep], tok[keep]
    order = np.lexsort((tok, t))[-max_tokens:]
    t, tok = t[order], tok[order]
    days = epoch_day(as_of) - np.floor_divide(t, US_PER_DAY)
    return Timeline(tokens=[int(x) for x in tok], days_before=[int(x) for x in days], length=int(len(tok)),
                    age_years=age_years(birth_date, as_of), sex=normalise_sex(sex))


def _available_us(t: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    """When each event was available: the later of its clinical and known times (NaT stays NaT)."""
    if known is None:
        return t
    k = np.where(known == _NAT, t, known)
    return np.where(t == _NAT, _NAT, np.maximum(t, k))


def _in_group(kind: str | None, groups: Sequence[str] | None, names: tuple[str, ...]) -> bool:
    return kind in DX_KINDS and bool(groups) and any(g in names for g in groups or ())


def _diagnosed_by(avail_us: int, kind: str | None, groups: Sequence[str] | None, assertion: str | None,
                  end_us: int, names: tuple[str, ...]) -> bool:
    """The event is a diagnosis of the group available before ``end_us``: affirmed, history or
    assertion-less. The one definition of "already diagnosed" (labels and prevalence flags)."""
    return (avail_us != _NAT and avail_us < end_us and (assertion is None or assertion in TOKEN_ASSERTIONS)
            and _in_group(kind, groups, names))


def _incident_assertion(kind: str | None, assertion: str | None) -> bool:
    """Assertions that make a diagnosis in the horizon a positive label (module docstring)."""
    return assertion is None or assertion == "affirmed" or (kind == "dx" and assertion == "history")


def prevalence(event_time_us: Sequence[int] | np.ndarray, kinds: Sequence[str | None],
               code_groups: Sequence[Sequence[str] | None], assertions: Sequence[str | None],
               as_of: dt.date, groups: dict[str, tuple[str, ...]] | None = None,
               known_time_us: Sequence[int] | np.ndarray | None = None) -> dict[str, bool]:
    """``{head: already diagnosed}`` at the end of the as-of day (see the module docstring).

    ``code_groups`` are the events' groups (the events table's column). Any time
    up to the end of the as-of day counts, not only the feature window; an event
    known (``known_time_us``) only after the as-of day does not.
    """
    groups = LABEL_GROUPS if groups is None else groups
    t = _available_us(to_epoch_us(event_time_us), None if known_time_us is None else to_epoch_us(known_time_us))
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    events = list(zip(t, kinds, code_groups, assertions))
    return {head: any(_diagnosed_by(ti, k, g, a, end, names) for ti, k, g, a in events)
            for head, names in groups.items()}


def compute_labels(event_time_us: Sequence[int] | np.ndarray, kinds: Sequence[str | None],
                   code_groups: Sequence[Sequence[str] | None], assertions: Sequence[str | None],
                   as_of: dt.date, horizon_days: int, groups: dict[str, tuple[str, ...]] | None = None,
                   known_time_us: Sequence[int] | np.ndarray | None = None,
                   censor: dt.date | None = None) -> dict[str, int | None]:
    """``{head: 1 | 0 | None}`` for each label group (see the module docstring for the rules).

    ``censor``: the last day of follow-up (:func:`censor_date`), None for none.
    """
    groups = LABEL_GROUPS if groups is None else groups
    t = to_epoch_us(event_time_us)
    known = None if known_time_us is None else to_epoch_us(known_time_us)
    avail = _available_us(t, known)
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    horizon_end = end + horizon_days * US_PER_DAY
    censor_end = None if censor is None else (epoch_day(censor) + 1) * US_PER_DAY
    positive_end = horizon_end if censor_end is None else min(horizon_end, censor_end)
    followed = bool(np.any(t >= horizon_end - US_PER_DAY)) and (censor_end is None or censor_end >= horizon_end)
    prevalent = prevalence(t, kinds, code_groups, assertions, as_of, groups, known)
    labels: dict[str, int | None] = {}
    for head, names in groups.items():
        positive = any(ai != _NAT and end <= ai < positive_end and _incident_assertion(k, a)
                       and _in_group(k, g, names)
                       for ai, k, g, a in zip(avail, kinds, code_groups, assertions))
        labels[head] = None if prevalent[head] else 1 if positive else 0 if followed else None
    return labels


def timelines_table(events: "pa.Table", patients: "pa.Table", as_of: dt.date, lookback_days: int,
                    max_tokens: int, horizon_days: int | None = None,
                    vocab: "Vocabulary | None" = None, *, periods: "pa.Table") -> "pa.Table":
    """Single-process timelines for whole EVENTS, PATIENTS and OBSERVATION_PERIODS tables
    (the Spark job's reference).

    Same rows as jobs/emr_features writes (sorted by patient_key): one per
    usable patient row in the as-of population — rows without a key or birth
    date, keys on more than one row, patients born after ``as_of`` and
    patients outside the population (:func:`population_status`) are left out,
    as the job does (it counts them in its ledger). Label columns, censored
    at death and end of observation, are added when ``horizon_days`` is given.
    """
    import pyarrow as pa

    from lake.schemas import LABEL_COLUMNS, PREVALENT_COLUMNS, TIMELINES, TIMELINES_WITH_LABELS
    from preprocessing.vocabulary import default_vocabulary

    vocab = vocab or default_vocabulary()
    ev = {c: events.column(c).to_pylist()
          for c in ("kind", "code_system", "code", "value", "unit", "assertion", "code_groups")}
    tokens = np.fromiter((vocab.encode(k, s, c, v, a, u, g) for k, s, c, v, u, a, g in
                          zip(ev["kind"], ev["code_system"], ev["code"], ev["value"], ev["unit"], ev["assertion"],
                              ev["code_groups"])),
                         dtype=np.int64, count=events.num_rows)
    times = events.column("event_time").cast(pa.int64()).fill_null(_NAT).to_numpy()
    # A missing known time is the clinical time (the events contract's default).
    known = (events.column("known_time").cast(pa.int64()).fill_null(_NAT).to_numpy()
             if "known_time" in events.column_names else times.copy())
    known = np.where(known == _NAT, times, known)
    keys = events.column("patient_key").combine_chunks().dictionary_encode()
    key_index = keys.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    order = np.argsort(key_index, kind="stable")
    bounds = np.searchsorted(key_index[order], np.arange(len(keys.dictionary) + 1))
    slot = {k: i for i, k in enumerate(keys.dictionary.to_pylist())}

    spans: dict[str, list[Period]] = {}
    for k, start, end in zip(periods.column("patient_key").to_pylist(), periods.column("start_date").to_pylist(),
                             periods.column("end_date").to_pylist()):
        spans.setdefault(k, []).append((start, end))
    deaths = dict(zip(patients.column("patient_key").to_pylist(), patients.column("death_date").to_pylist()))

    pk = patients.column("patient_key").to_pylist()
    counts: dict[str | None, int] = {}
    for k in pk:
        counts[k] = counts.get(k, 0) + 1
    rows = []
    for k, birth, sex in sorted(zip(pk, patients.column("birth_date").to_pylist(),
                                    patients.column("sex").to_pylist()), key=lambda r: str(r[0])):
        if k is None or counts[k] > 1 or birth is None or birth > as_of:
            continue
        if population_status(deaths[k], spans.get(k, []), as_of) is not None:
            continue
        idx = order[bounds[slot[k]]:bounds[slot[k] + 1]] if k in slot else np.empty(0, dtype=np.int64)
        tl = build_timeline(times[idx], tokens[idx], birth, sex, as_of, lookback_days, max_tokens, known[idx])
        row = {"patient_key": k, "as_of": as_of, "length": tl.length, "tokens": tl.tokens,
               "days_before": tl.days_before, "age_years": tl.age_years, "sex": tl.sex,
               "encounters": int(np.count_nonzero(np.asarray(tl.tokens) == ENCOUNTER_ID))}
        sel = idx.tolist()
        dx = (times[idx], [ev["kind"][i] for i in sel], [ev["code_groups"][i] for i in sel],
              [ev["assertion"][i] for i in sel], as_of)
        prevalent = prevalence(*dx, known_time_us=known[idx])
        row.update({col: prevalent[head] for head, col in zip(LABEL_GROUPS, PREVALENT_COLUMNS)})
        if horizon_days is not None:
            labels = compute_labels(*dx, horizon_days, known_time_us=known[idx],
                                    censor=censor_date(deaths[k], spans.get(k, []), as_of))
            row.update({col: labels[head] for head, col in zip(LABEL_GROUPS, LABEL_COLUMNS)})
        rows.append(row)
    schema = TIMELINES if horizon_days is None else TIMELINES_WITH_LABELS
    return pa.Table.from_pylist(rows, schema=schema)
