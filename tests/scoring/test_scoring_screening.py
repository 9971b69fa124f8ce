"""The screening list leaves already-diagnosed patients out, on real committed Parquet partitions:
timelines (with prevalence flags) and the scores partition that names them as its input."""
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
    timelines = random_timelines(N, seed=3)
    commit_timelines(settings.lake.root, AS_OF, timelines)
    scores = commit_scores(settings.lake.root, timelines)
    return settings, timelines, scores


def test_prevalent_patients_are_left_out_and_the_ledger_accounts_for_every_scored_patient(scored):
    settings, timelines, scores = scored
    final, ledger = screening.build(settings, AS_OF, "run-x")
    flagged = read_partition(final)
    prevalent = _prevalent_of(timelines, scores)
    thresholds = settings.scoring.screening_thresholds
    score = {h: dict(zip(scores.column("patient_key").to_pylist(), scores.column(f"score_{h}").to_pylist()))
             for h in HEADS}
    got = _by_head(flagged)
    would_flag = {}
    for h in HEADS:
        would_flag[h] = {k for k, s in score[h].items() if s >= thresholds[h]}
        assert all(prevalent[h]) and would_flag[h] & prevalent[h], "the data must exercise the rule"
        assert set(got[h]) == would_flag[h] - prevalent[h]  # every non-prevalent one, no prevalent one
        assert [score[h][k] for k in got[h]] == sorted((score[h][k] for k in got[h]), reverse=True)
    # Patients: flagged on some head / left out only for being diagnosed / below every threshold.
    out = set().union(*got.values())
    excluded = set().union(*(would_flag[h] & prevalent[h] for h in HEADS)) - out
    assert ledger.balanced and ledger.unit == "patients" and ledger.records_in == scores.num_rows
    assert ledger.records_out == len(out) and ledger.quarantined == {}
    assert ledger.ignored == {"excluded_prevalent": len(excluded),
                              "below_threshold": scores.num_rows - len(out) - len(excluded)}
    assert len(excluded) > 0
    m = read_manifest(final)
    rule = m["exclude_prevalent"]
    assert rule["enabled"] and "end of the as-of day" in rule["rule"]
    # The heads are code groups of conf/code_groups.yaml (concept sets over every vocabulary).
    assert rule["groups"] == {"t2d": ["t2d"], "ckd": ["ckd"], "hf": ["heart_failure"]}
    assert rule["timelines"] == {"partition": f"emr/timelines/as_of={AS_OF}", "run_id": "test-features"}
    assert rule["excluded_per_head"] == {h: len(would_flag[h] & prevalent[h]) for h in HEADS}
    assert rule["patients_excluded"] == len(excluded)
    assert m["ledger"]["balanced"] and m["per_head"] == {h: len(got[h]) for h in HEADS}


def test_top_k_is_taken_from_the_patients_not_yet_diagnosed(scored):
    settings, timelines, scores = scored
    settings = settings.model_copy(update={"scoring": settings.scoring.model_copy(update={"screening_top_k": 15})})
    final, ledger = screening.build(settings, AS_OF)
    got = _by_head(read_partition(final))
    prevalent = _prevalent_of(timelines, scores)
    keys = scores.column("patient_key").to_pylist()
    for h in HEADS:
        s = scores.column(f"score_{h}").to_pylist()
        ranked = [k for _, k in sorted(zip(s, keys), key=lambda x: (-x[0], x[1]))]
        assert got[h] == [k for k in ranked if k not in prevalent[h]][:15]
    assert ledger.balanced and set(ledger.ignored) == {"outside_top_k", "excluded_prevalent"}
    assert ledger.ignored["excluded_prevalent"] > 0


def test_the_setting_turns_the_exclusion_off(scored):
    settings, timelines, scores = scored
    off = settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"screening_exclude_prevalent": False})})
    final, ledger = screening.build(off, AS_OF)
    flagged = read_partition(final)
    assert flagged.equals(screening.select(scores, off.scoring.screening_thresholds, None))
    assert any(set(_by_head(flagged)[h]) & _prevalent_of(timelines, scores)[h] for h in HEADS)
    assert ledger.balanced and set(ledger.ignored) == {"below_threshold"}
    rule = read_manifest(final)["exclude_prevalent"]
    assert rule["enabled"] is False and "NOT left out" in rule["warning"]


def test_the_default_setting_excludes():
    from conf.settings import load_settings

    assert load_settings({}).scoring.screening_exclude_prevalent is True


def test_timelines_without_prevalence_columns_fail_with_the_fix(make_settings):
    settings = make_settings()
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
    settings = make_settings()
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
