"""Point-in-time rules of the pure timeline and label functions."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from preprocessing.timelines import (LABEL_GROUPS, US_PER_DAY, build_timeline, compute_labels, epoch_day,
                                    prevalence, to_epoch_us)

UTC = dt.timezone.utc
AS_OF = dt.date(2024, 6, 30)
END_US = (epoch_day(AS_OF) + 1) * US_PER_DAY  # first instant after the as-of day
AFTER = 10_000  # token ids at or above this mark events after the as-of day
_NAT = np.iinfo(np.int64).min  # a missing event_time


@st.composite
def patient_events(draw):
    as_of = draw(st.dates(min_value=dt.date(1960, 1, 1), max_value=dt.date(2030, 12, 31)))
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    lookback = draw(st.integers(0, 3000))
    near = st.integers(end - 4000 * US_PER_DAY, end + 400 * US_PER_DAY)
    edges = st.sampled_from([end - 1, end, end - (lookback + 1) * US_PER_DAY, end - (lookback + 1) * US_PER_DAY - 1])
    times = draw(st.lists(st.one_of(near, edges), max_size=60))
    tokens = [draw(st.integers(-1, 50)) for _ in times]
    # Tag every after-as-of event with a token id no in-window event can have.
    tokens = [AFTER + i if t >= end else tok for i, (t, tok) in enumerate(zip(times, tokens))]
    max_tokens = draw(st.integers(1, 20))
    return as_of, lookback, max_tokens, np.array(times, dtype=np.int64), np.array(tokens, dtype=np.int64)


@settings(max_examples=300, deadline=None)
@given(patient_events())
def test_timeline_is_point_in_time(case) -> None:
    as_of, lookback, max_tokens, times, tokens = case
    tl = build_timeline(times, tokens, dt.date(1950, 1, 1), "F", as_of, lookback, max_tokens)
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    start = end - (lookback + 1) * US_PER_DAY
    # Nothing from after the end of the as-of day, nothing dropped, window and budget respected.
    assert all(0 <= t < AFTER for t in tl.tokens)
    assert all(0 <= d <= lookback for d in tl.days_before)
    assert tl.length == len(tl.tokens) == len(tl.days_before) <= max_tokens
    assert tl.days_before == sorted(tl.days_before, reverse=True)  # oldest → newest
    # Exactly the most recent max_tokens eligible events (ties broken by token id).
    eligible = sorted((int(t), int(k)) for t, k in zip(times, tokens) if start <= t < end and k >= 0)
    kept = eligible[-max_tokens:]
    assert tl.tokens == [k for _, k in kept]
    assert tl.days_before == [epoch_day(as_of) - t // US_PER_DAY for t, _ in kept]


def test_as_of_day_boundaries() -> None:
    times = [END_US - 1, END_US, END_US - 366 * US_PER_DAY, END_US - 366 * US_PER_DAY - 1]
    tl = build_timeline(times, [5, 6, 7, 8], dt.date(1980, 6, 30), "m", AS_OF, 365, 10)
    assert tl.tokens == [7, 5] and tl.days_before == [365, 0]
    assert tl.sex == "M" and tl.age_years == pytest.approx(44 * 365.25 / 365.25, abs=0.01)


def test_patient_without_events_gets_an_empty_timeline() -> None:
    tl = build_timeline([], [], dt.date(2000, 1, 1), None, AS_OF, 365, 8)
    assert (tl.tokens, tl.days_before, tl.length, tl.sex) == ([], [], 0, "U")


def test_times_may_be_datetimes_or_datetime64() -> None:
    t = dt.datetime(2024, 6, 30, 23, 59, 59, 999999, tzinfo=UTC)
    assert to_epoch_us([t]).tolist() == [END_US - 1]
    assert to_epoch_us(np.array(["2024-07-01T00:00:00"], dtype="datetime64[us]")).tolist() == [END_US]
    with pytest.raises(ValueError, match="timezone-aware"):
        to_epoch_us([dt.datetime(2024, 6, 30)])


def _groups(system, code):
    from preprocessing.code_groups import groups_for

    return groups_for(system, code)


def _labels(events, horizon=365, system="icd10cm"):
    times = [END_US + offset for offset, *_ in events]
    kinds = [e[1] for e in events]
    groups = [_groups(system, e[2]) for e in events]
    assertions = [e[3] for e in events]
    return compute_labels(times, kinds, groups, assertions, AS_OF, horizon)


DAY = US_PER_DAY
FOLLOW_UP = (400 * DAY, "encounter", None, None)  # seen after the horizon


def test_labels_come_only_from_the_horizon() -> None:
    # First instant after the as-of day and last instant of the horizon are inside; next day is not.
    assert _labels([(0, "dx", "E11.9", "affirmed"), FOLLOW_UP])["t2d"] == 1
    assert _labels([(365 * DAY - 1, "dx", "N18.3", "affirmed"), FOLLOW_UP])["ckd"] == 1
    assert _labels([(365 * DAY, "dx", "I50.9", "affirmed"), FOLLOW_UP])["hf"] == 0
    assert _labels([(3 * DAY, "dx_text", "E11.9", "affirmed"), FOLLOW_UP])["t2d"] == 1
    assert _labels([(3 * DAY, "dx_text", "E11.9", "negated"), FOLLOW_UP])["t2d"] == 0
    assert _labels([(3 * DAY, "dx_text", "E11.9", "history"), FOLLOW_UP])["t2d"] == 0


def test_prevalent_cases_are_not_labelled() -> None:
    # Diagnosed in the last microsecond of the as-of day: prevalent, not incident.
    assert _labels([(-1, "dx", "E11.9", "affirmed"), (5 * DAY, "dx", "E11.9", "affirmed"), FOLLOW_UP])["t2d"] is None
    assert _labels([(-900 * DAY, "dx_text", "E11.9", "history"), FOLLOW_UP])["t2d"] is None
    # Negated or family mentions before as-of are not prevalence.
    assert _labels([(-9 * DAY, "dx_text", "E11.9", "negated"), (-9 * DAY, "dx_text", "E11.9", "family"),
                    FOLLOW_UP])["t2d"] == 0


def test_negatives_need_follow_up_to_the_horizon() -> None:
    assert _labels([(10 * DAY, "encounter", None, None)])["hf"] is None  # lost to follow-up
    assert _labels([(364 * DAY, "encounter", None, None)])["hf"] == 0  # seen on the horizon's last day
    assert _labels([(363 * DAY, "encounter", None, None)])["hf"] is None


@st.composite
def diagnosis_events(draw):
    """Diagnosis-like events around an as-of date: group codes, other codes, every assertion, NaT."""
    as_of = draw(st.dates(min_value=dt.date(1960, 1, 1), max_value=dt.date(2030, 12, 31)))
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    n = draw(st.integers(0, 25))
    times = draw(st.lists(st.one_of(st.integers(end - 5000 * US_PER_DAY, end + 800 * US_PER_DAY),
                                    st.sampled_from([end - 1, end, _NAT])), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from(["dx", "dx_text", "obs", "encounter", None]), min_size=n, max_size=n))
    pairs = draw(st.lists(st.sampled_from([
        ("icd10cm", "E11.9"), ("icd10cm", "e11"), ("icd10cm", "N18.3"), ("icd10cm", "I50.21"), ("icd10cm", "I11.0"),
        ("icd10cm", "I10"), ("icd10cm", "E10.9"), ("icd10cm", ""), ("icd10cm", None), ("icd9cm", "250.00"),
        ("icd9cm", "428.0"), ("icd9cm", "585.3"), ("snomed", "44054006"), ("snomed", "431857002"),
        ("snomed", "88805009"), ("snomed", "195662009"), ("omop", "201826"), ("omop", "316139"), (None, None)]),
        min_size=n, max_size=n))
    assertions = draw(st.lists(st.sampled_from(["affirmed", "history", "negated", "family", "possible",
                                                "hypothetical", None]), min_size=n, max_size=n))
    # Late recording: known at the clinical time, hours later, or years later (or before it).
    delays = draw(st.lists(st.one_of(st.just(0), st.integers(0, US_PER_DAY), st.integers(0, 4000 * US_PER_DAY),
                                     st.integers(-30 * US_PER_DAY, 0)), min_size=n, max_size=n))
    known = np.array([t if t == _NAT else t + d for t, d in zip(times, delays)], dtype=np.int64)
    systems = [p[0] for p in pairs]
    codes = [p[1] for p in pairs]
    return as_of, np.array(times, dtype=np.int64), kinds, systems, codes, assertions, known



@settings(max_examples=300, deadline=None)
@given(diagnosis_events(), st.integers(1, 800))
def test_prevalence_is_point_in_time_and_is_the_labels_rule(case, horizon) -> None:
    as_of, times, kinds, systems, codes, assertions, known = case
    groups = [_groups(s, c) for s, c in zip(systems, codes)]
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    flags = prevalence(times, kinds, groups, assertions, as_of, known_time_us=known)
    assert set(flags) == set(LABEL_GROUPS) and all(isinstance(v, bool) for v in flags.values())
    # Only events both clinically dated and recorded by the end of the as-of day matter:
    # dropping every other one changes nothing.
    before = [i for i, t in enumerate(times) if t != _NAT and t < end and known[i] < end]
    sub = [[x[i] for i in before] for x in (kinds, groups, assertions)]
    assert prevalence(times[before], *sub, as_of, known_time_us=known[before]) == flags
    # Whatever their age (no lookback) and vocabulary: the flag is "some affirmed/history/
    # assertion-less diagnosis of the head's disease known before D+1". Expected membership
    # written out here from the concept sets, not from the evaluator.
    disease = {"t2d": {("icd10cm", "E11.9"), ("icd10cm", "e11"), ("icd9cm", "250.00"), ("snomed", "44054006"),
                       ("omop", "201826")},
               "ckd": {("icd10cm", "N18.3"), ("icd9cm", "585.3"), ("snomed", "431857002")},
               "hf": {("icd10cm", "I50.21"), ("icd10cm", "I11.0"), ("icd9cm", "428.0"), ("snomed", "88805009"),
                      ("omop", "316139")}}
    for head in LABEL_GROUPS:
        expected = any(kinds[i] in ("dx", "dx_text") and (systems[i], codes[i]) in disease[head]
                       and assertions[i] in ("affirmed", "history", None) for i in before)
        assert flags[head] == expected
    # The labels' "already diagnosed" is the same rule.
    labels = compute_labels(times, kinds, groups, assertions, as_of, horizon, known_time_us=known)
    assert all(labels[h] is None for h, prevalent in flags.items() if prevalent)


@settings(max_examples=300, deadline=None)
@given(diagnosis_events(), st.integers(1, 800), st.integers(0, 3000), st.integers(1, 40))
def test_nothing_recorded_after_the_as_of_day_reaches_a_timeline_flag_or_label(case, horizon, lookback,
                                                                              max_tokens) -> None:
    """Late recording, every vocabulary: moving an event's record to the day after D (or later)
    changes neither the timeline nor the flags, nor whether a label is NULL for prevalence."""
    as_of, times, kinds, systems, codes, assertions, known = case
    groups = [_groups(s, c) for s, c in zip(systems, codes)]
    end = (epoch_day(as_of) + 1) * US_PER_DAY
    late = np.array([t != _NAT and t < end and k >= end for t, k in zip(times, known)], dtype=bool)
    tokens = np.where(late, AFTER + np.arange(len(times)), np.arange(len(times)) % 50)
    tl = build_timeline(times, tokens, dt.date(1900, 1, 1), "F", as_of, lookback, max_tokens, known)
    assert all(t < AFTER for t in tl.tokens)
    # Flags and the prevalence side of the labels are those of the data without the late records.
    keep = ~late
    flags = prevalence(times, kinds, groups, assertions, as_of, known_time_us=known)
    sub = [[x[i] for i in np.flatnonzero(keep)] for x in (kinds, groups, assertions)]
    assert flags == prevalence(times[keep], *sub, as_of, known_time_us=known[keep])
    labels = compute_labels(times, kinds, groups, assertions, as_of, horizon, known_time_us=known)
    for head, prevalent in flags.items():
        assert (labels[head] is None) if prevalent else True


def test_a_condition_recorded_in_2018_with_onset_2005_is_not_prevalent_in_2010() -> None:
    onset = (epoch_day(dt.date(2005, 3, 1))) * US_PER_DAY
    recorded = (epoch_day(dt.date(2018, 7, 1))) * US_PER_DAY
    args = ([onset], ["dx"], [_groups("snomed", "44054006")], ["affirmed"])
    assert prevalence(*args, dt.date(2010, 1, 1), known_time_us=[recorded])["t2d"] is False
    assert prevalence(*args, dt.date(2018, 7, 1), known_time_us=[recorded])["t2d"] is True
    # Without the recorded time (the old rule) it would have been prevalent in 2010.
    assert prevalence(*args, dt.date(2010, 1, 1))["t2d"] is True
    # It became known in 2018: incident in a horizon that covers 2018, not in one that ends before.
    assert compute_labels([onset, recorded + 400 * US_PER_DAY], ["dx", "encounter"],
                          [args[2][0], []], ["affirmed", None], dt.date(2017, 12, 31), 365,
                          known_time_us=[recorded, recorded + 400 * US_PER_DAY])["t2d"] == 1
    tl = build_timeline([onset], [7], dt.date(1950, 1, 1), "F", dt.date(2010, 1, 1), 10_000, 8, [recorded])
    assert tl.tokens == []


def test_snomed_omop_and_icd9_diagnoses_make_a_patient_prevalent() -> None:
    day = END_US - 100 * US_PER_DAY
    for system, code, head in [("snomed", "44054006", "t2d"), ("snomed", "431857002", "ckd"),
                               ("snomed", "88805009", "hf"), ("omop", "201826", "t2d"), ("omop", "316139", "hf"),
                               ("icd9cm", "250.00", "t2d"), ("icd9cm", "585.3", "ckd"), ("icd9cm", "428.0", "hf")]:
        flags = prevalence([day], ["dx"], [_groups(system, code)], ["affirmed"], AS_OF)
        assert flags == {h: h == head for h in ("t2d", "ckd", "hf")}, (system, code)
    # A SNOMED diagnosis in no group (viral pharyngitis) and possible / refuted ones make no one prevalent.
    assert not any(prevalence([day], ["dx"], [_groups("snomed", "195662009")], ["affirmed"], AS_OF).values())
    for assertion in ("possible", "negated", "hypothetical", "family"):
        assert not any(prevalence([day], ["dx"], [_groups("snomed", "44054006")], [assertion], AS_OF).values())


def test_a_resolved_coded_diagnosis_in_the_horizon_is_incident_but_a_history_mention_is_not() -> None:
    assert _labels([(3 * DAY, "dx", "431857002", "history"), FOLLOW_UP], system="snomed")["ckd"] == 1
    assert _labels([(3 * DAY, "dx_text", "431857002", "history"), FOLLOW_UP], system="snomed")["ckd"] == 0
    assert _labels([(3 * DAY, "dx", "431857002", "possible"), FOLLOW_UP], system="snomed")["ckd"] == 0


def test_prevalence_ignores_the_lookback_and_the_future() -> None:
    six_years = END_US - 6 * 365 * US_PER_DAY
    assert prevalence([six_years], ["dx"], [_groups("icd10cm", "E11.9")], ["affirmed"], AS_OF) == \
        {"t2d": True, "ckd": False, "hf": False}
    assert prevalence([END_US - 1, END_US], ["dx", "dx"], [_groups("icd10cm", "I50.9"), _groups("icd10cm", "N18.3")],
                      [None, "affirmed"], AS_OF) == {"t2d": False, "ckd": False, "hf": True}
    assert prevalence([], [], [], [], AS_OF) == {"t2d": False, "ckd": False, "hf": False}
    # Heart failure is one definition: hypertensive heart disease with heart failure (I11.0) counts
    # for the flag exactly as it does for the cohort's heart_failure group.
    assert prevalence([six_years], ["dx"], [_groups("icd10cm", "I11.0")], ["affirmed"], AS_OF)["hf"] is True
