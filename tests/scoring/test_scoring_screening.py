"""The screening list keeps ineligible patients off (age range, minimum history, already diagnosed),
on real committed Parquet partitions: timelines (with prevalence flags) and the scores partition
that names them as its input. Expected lists are computed here from the timelines' rows and the
configured numbers, never by the screening code."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from inference import screening
from lake.commit import atomic_partition, read_manifest, read_partition
from lake.paths import LakePaths
from lake.schemas import HEADS, PREVALENT_COLUMNS, SCORES
from scoring_fixtures import commit_timelines, random_timelines

AS_OF = "2024-06-30"
N = 300


def _encounter_id() -> int:
    from preprocessing.vocabulary import default_vocabulary

    return default_vocabulary().id_of("encounter")


def _eligible_of(settings, timelines: pa.Table, scores: pa.Table) -> dict[str, set[str]]:
    """Per head, the scored patients in the head's age range (completed years) with an encounter."""
    enc = _encounter_id()
    rows = {r["patient_key"]: r for r in timelines.to_pylist()}
    out = {}
    for h in HEADS:
        rule = settings.scoring.eligibility[h]
        out[h] = set()
        for k in scores.column("patient_key").to_pylist():
            age = int(np.floor(rows[k]["age_years"]))
            in_range = age >= rule.min_age_years and (rule.max_age_years is None or age <= rule.max_age_years)
            if in_range and sum(t == enc for t in rows[k]["tokens"]) >= rule.min_encounters:
                out[h].add(k)
    return out


def commit_scores(lake_root, timelines: pa.Table, seed: int = 0, timelines_run_id: str = "test-features",
                  drop: int = 7) -> pa.Table:
    """A committed scores partition for all but the first ``drop`` timelines (as if quarantined),
    whose manifest names its input as EMR scoring's does."""
    rng = np.random.default_rng(seed)
    keys = timelines.column("patient_key").slice(drop)
    n = len(keys)
    scores = pa.table({
        "patient_key": keys, "as_of": pa.array([dt.date.fromisoformat(AS_OF)] * n, pa.date32()),
        "model": ["emr_risk"] * n, "model_version": ["test-1"] * n, "engine_fingerprint": ["onn-fp32-x"] * n,
        "precision": ["fp32"] * n, "run_id": ["score-run"] * n,
        **{f"score_{h}": pa.array(rng.random(n), pa.float32()) for h in HEADS}}, schema=SCORES)
    manifest = {"run_id": "score-run", "stage": "score_emr", "as_of": AS_OF, "limit": None,
                "input": {"partition": f"emr/timelines/as_of={AS_OF}", "run_id": timelines_run_id}}
    with atomic_partition(LakePaths(lake_root).scores("emr_risk", AS_OF), manifest) as staging:
        import pyarrow.parquet as pq

        pq.write_table(scores.slice(0, n // 2), staging / "part-00000.parquet")
        pq.write_table(scores.slice(n // 2), staging / "part-00001.parquet")
    return scores


def _prevalent_of(timelines: pa.Table, scores: pa.Table) -> dict[str, set[str]]:
    rows = {r["patient_key"]: r for r in timelines.to_pylist()}
    return {h: {k for k in scores.column("patient_key").to_pylist() if rows[k][f"prevalent_{h}"]} for h in HEADS}


def _by_head(flagged: pa.Table) -> dict[str, list[str]]:
    return {h: flagged.filter(pc.equal(flagged.column("head"), h)).column("patient_key").to_pylist() for h in HEADS}


@pytest.fixture
def scored(make_settings):
    settings = make_settings(**{"scoring.screening_thresholds": {"t2d": 0.6, "ckd": 0.7, "hf": 0.8}})
    timelines = random_timelines(N, seed=3, min_age_years=5)  # children too: never on a list
    commit_timelines(settings.lake.root, AS_OF, timelines)
    scores = commit_scores(settings.lake.root, timelines)
    return settings, timelines, scores


def test_only_eligible_patients_are_listed_and_the_ledger_accounts_for_every_scored_patient(scored):
    settings, timelines, scores = scored
    final, ledger = screening.build(settings, AS_OF, "run-x")
    flagged = read_partition(final)
    prevalent = _prevalent_of(timelines, scores)
    eligible = _eligible_of(settings, timelines, scores)
    ages = {r["patient_key"]: r["age_years"] for r in timelines.to_pylist()}
    thresholds = settings.scoring.screening_thresholds
    score = {h: dict(zip(scores.column("patient_key").to_pylist(), scores.column(f"score_{h}").to_pylist()))
             for h in HEADS}
    got = _by_head(flagged)
    would_flag = {}
    for h in HEADS:
        would_flag[h] = {k for k, s in score[h].items() if s >= thresholds[h]}
        assert all(prevalent[h]) and would_flag[h] & prevalent[h] & eligible[h], "the data must exercise the rule"
        assert would_flag[h] - eligible[h], "and the eligibility rule"
        # every eligible one not yet diagnosed, nobody else
        assert set(got[h]) == (would_flag[h] & eligible[h]) - prevalent[h]
        assert [score[h][k] for k in got[h]] == sorted((score[h][k] for k in got[h]), reverse=True)
        assert min(ages[k] for k in got[h]) >= settings.scoring.eligibility[h].min_age_years
    # Patients flagged on no head, each under the first reason that applies.
    out = set().union(*got.values())
    everyone = set(scores.column("patient_key").to_pylist())
    in_range = {h: {k for k in everyone if settings.scoring.eligibility[h].min_age_years <= int(np.floor(ages[k]))
                    and (settings.scoring.eligibility[h].max_age_years is None
                         or int(np.floor(ages[k])) <= settings.scoring.eligibility[h].max_age_years)}
                for h in HEADS}
    outside_age = everyone - out - set().union(*in_range.values())
    no_history = everyone - out - outside_age - set().union(*eligible.values())
    excluded = set().union(*(would_flag[h] & prevalent[h] & eligible[h] for h in HEADS)) - out
    assert ledger.balanced and ledger.unit == "patients" and ledger.records_in == scores.num_rows
    assert ledger.records_out == len(out) and ledger.quarantined == {}
    assert ledger.ignored == {"outside_age_range": len(outside_age), "no_encounter_in_lookback": len(no_history),
                              "excluded_prevalent": len(excluded),
                              "below_threshold": scores.num_rows - len(out) - len(excluded) - len(outside_age)
                              - len(no_history)}
    assert len(excluded) > 0 and len(outside_age) > 0 and len(no_history) > 0
    m = read_manifest(final)
    rule = m["exclude_prevalent"]
    assert rule["enabled"] and "end of the as-of day" in rule["rule"]
    # The heads are code groups of conf/code_groups.yaml (concept sets over every vocabulary).
    assert rule["groups"] == {"t2d": ["t2d"], "ckd": ["ckd"], "hf": ["heart_failure"]}
    assert rule["timelines"] == {"partition": f"emr/timelines/as_of={AS_OF}", "run_id": "test-features"}
    assert rule["excluded_per_head"] == {h: len(would_flag[h] & prevalent[h] & eligible[h]) for h in HEADS}
    assert rule["patients_excluded"] == len(excluded)
    assert m["ledger"]["balanced"] and m["per_head"] == {h: len(got[h]) for h in HEADS}
    # Per head, every scored patient under the first reason that keeps them off that head's list.
    for h in HEADS:
        c = m["eligibility"]["heads"][h]["counts"]
        assert c == {"eligible": len(eligible[h] - prevalent[h]),
                     "outside_age_range": len(everyone - in_range[h]),
                     "no_encounter_in_lookback": len(in_range[h] - eligible[h]),
                     "already_diagnosed": len(eligible[h] & prevalent[h])}
        assert sum(c.values()) == scores.num_rows
        assert "source" in m["eligibility"]["heads"][h] and m["eligibility"]["heads"][h]["source"]
        assert m["criterion"]["thresholds"][h]["source"].startswith("override")


def test_top_k_is_taken_from_the_patients_not_yet_diagnosed(scored):
    settings, timelines, scores = scored
    settings = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={"screening_top_k": 15})})
    final, ledger = screening.build(settings, AS_OF)
    got = _by_head(read_partition(final))
    prevalent = _prevalent_of(timelines, scores)
    keys = scores.column("patient_key").to_pylist()
    eligible = _eligible_of(settings, timelines, scores)
    would_have_been = set()  # already diagnosed, ranked ahead of the 15th patient taken on some head
    for h in HEADS:
        s = scores.column(f"score_{h}").to_pylist()
        ranked = [k for _, k in sorted(zip(s, keys), key=lambda x: (-x[0], x[1]))]
        assert got[h] == [k for k in ranked if k in eligible[h] and k not in prevalent[h]][:15]
        taken = 0
        for k in (k for k in ranked if k in eligible[h]):
            if k not in prevalent[h]:
                taken += 1
            elif taken < 15:
                would_have_been.add(k)
    assert ledger.balanced and set(ledger.ignored) == {"outside_top_k", "excluded_prevalent", "outside_age_range",
                                                       "no_encounter_in_lookback"}
    listed = {k for head_list in got.values() for k in head_list}
    assert ledger.ignored["excluded_prevalent"] == len(would_have_been - listed) > 0


def test_the_setting_turns_the_exclusion_off(scored):
    settings, timelines, scores = scored
    off = settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"screening_exclude_prevalent": False})})
    final, ledger = screening.build(off, AS_OF)
    got = _by_head(read_partition(final))
    eligible = _eligible_of(off, timelines, scores)
    for h in HEADS:
        # Age and history still apply; only the already-diagnosed rule is off.
        assert set(got[h]) == {k for k, s in zip(scores.column("patient_key").to_pylist(),
                                                  scores.column(f"score_{h}").to_pylist())
                               if s >= off.scoring.screening_thresholds[h] and k in eligible[h]}
    assert any(set(got[h]) & _prevalent_of(timelines, scores)[h] for h in HEADS)
    assert ledger.balanced and set(ledger.ignored) == {"below_threshold", "outside_age_range",
                                                       "no_encounter_in_lookback"}
    rule = read_manifest(final)["exclude_prevalent"]
    assert rule["enabled"] is False and "NOT left out" in rule["warning"]


def test_the_default_setting_excludes():
    from conf.settings import load_settings

    assert load_settings({}).scoring.screening_exclude_prevalent is True


THRESHOLDS = {"scoring.screening_thresholds": {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}}


def test_timelines_without_prevalence_columns_fail_with_the_fix(make_settings):
    settings = make_settings(**THRESHOLDS)
    old = random_timelines(40, seed=1).drop_columns(list(PREVALENT_COLUMNS))  # built before the columns existed
    commit_timelines(settings.lake.root, AS_OF, old, files=2)
    commit_scores(settings.lake.root, old, drop=0)
    with pytest.raises(screening.TimelinesNotUsable, match=r"predates the columns .*"
                       r"medscreen emr features --as-of 2024-06-30.*screening_exclude_prevalent: false"):
        screening.build(settings, AS_OF)
    assert not LakePaths(settings.lake.root).screening(AS_OF).exists()
    # With the exclusion turned off, the old partition screens (and the manifest says so).
    off = settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"screening_exclude_prevalent": False})})
    final, ledger = screening.build(off, AS_OF)
    assert ledger.balanced and read_manifest(final)["exclude_prevalent"]["enabled"] is False


def test_timelines_rebuilt_after_scoring_are_refused(make_settings):
    settings = make_settings(**THRESHOLDS)
    timelines = random_timelines(40, seed=2)
    commit_timelines(settings.lake.root, AS_OF, timelines)
    commit_scores(settings.lake.root, timelines, timelines_run_id="an-older-features-run")
    with pytest.raises(screening.TimelinesNotUsable, match="rebuilt since.*medscreen score emr"):
        screening.build(settings, AS_OF)


def test_screen_reports_the_pairs_it_left_out():
    scores = pa.table({"patient_key": ["a", "b", "c", "d"], "as_of": pa.array([dt.date(2024, 6, 30)] * 4),
                       "model": ["m"] * 4, "model_version": ["v"] * 4, "engine_fingerprint": ["f"] * 4,
                       "precision": ["fp32"] * 4, "run_id": ["r"] * 4,
                       **{f"score_{h}": pa.array([0.9, 0.8, 0.7, 0.1], pa.float32()) for h in HEADS}},
                      schema=SCORES)
    prevalent = {"t2d": np.array([True, False, False, True]), "ckd": np.zeros(4, bool), "hf": np.ones(4, bool)}
    flagged, excluded = screening.screen(scores, {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}, None, prevalent)
    assert _by_head(flagged) == {"t2d": ["b", "c"], "ckd": ["a", "b", "c"], "hf": []}
    assert {h: v.tolist() for h, v in excluded.items()} == {"t2d": [0], "ckd": [], "hf": [0, 1, 2]}
    flagged, excluded = screening.screen(scores, {}, 2, prevalent)
    assert _by_head(flagged) == {"t2d": ["b", "c"], "ckd": ["a", "b"], "hf": []}
    # d (0.1) would not be in a top 2 even with a, b, c left out ahead of it? It would: nobody eligible
    # ranks ahead of it on hf, so it counts as left out for being diagnosed.
    assert {h: v.tolist() for h, v in excluded.items()} == {"t2d": [0], "ckd": [], "hf": [0, 1, 2, 3]}


def test_scoring_refuses_timelines_without_prevalence_columns_before_it_starts(make_settings):
    """The check runs before Ray and the engine: nothing is scored, staged or committed."""
    from inference import emr

    settings = make_settings()
    old = random_timelines(30, seed=4).drop_columns(list(PREVALENT_COLUMNS))
    commit_timelines(settings.lake.root, AS_OF, old, files=1)
    lake = LakePaths(settings.lake.root)
    with pytest.raises(screening.TimelinesNotUsable, match=r"predates the columns .*medscreen emr features"):
        emr.score(settings, AS_OF)
    model_dir = lake.scores("emr_risk", AS_OF).parent
    assert not model_dir.exists() or list(model_dir.iterdir()) == []
