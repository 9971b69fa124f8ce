"""Eligibility per head: the pure rule on hand-made patients, the shipped defaults (nobody under 18,
never an empty timeline, a source for every head), and screening end to end on committed partitions
where the only way onto a list would be an empty timeline or a child's score."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest
import yaml

from conf.settings import DEFAULTS_FILE, ConfigError, load_settings
from inference import screening
from lake.commit import atomic_partition, read_manifest, read_partition
from lake.paths import LakePaths
from lake.schemas import HEADS, SCORES, TIMELINES
from preprocessing import eligibility as elig
from preprocessing.vocabulary import default_vocabulary
from scoring_fixtures import commit_timelines

AS_OF = "2024-06-30"


def test_reasons_follow_the_age_range_then_history_then_diagnosis():
    rule = elig.HeadRule(min_age_years=35, max_age_years=70, min_encounters=1)
    age = np.array([34.99, 35.0, 70.99, 71.0, np.nan, 50, 50, 50])
    encounters = np.array([5, 5, 5, 5, 5, 0, 1, 0])
    prevalent = np.array([True, False, True, False, False, True, True, False])
    codes = elig.reasons(rule, age, encounters, prevalent)
    assert codes.tolist() == [elig.OUTSIDE_AGE_RANGE, elig.ELIGIBLE, elig.ALREADY_DIAGNOSED,
                              elig.OUTSIDE_AGE_RANGE, elig.OUTSIDE_AGE_RANGE, elig.NO_ENCOUNTER,
                              elig.ALREADY_DIAGNOSED, elig.NO_ENCOUNTER]
    assert elig.counts(codes) == {"eligible": 1, "outside_age_range": 3, "no_encounter_in_lookback": 2,
                                  "already_diagnosed": 2}
    open_ended = elig.HeadRule(min_age_years=40, max_age_years=None, min_encounters=2)
    assert elig.reasons(open_ended, np.array([104.5, 39.9, 60]), np.array([2, 2, 1])).tolist() == [
        elig.ELIGIBLE, elig.OUTSIDE_AGE_RANGE, elig.NO_ENCOUNTER]
    with pytest.raises(ValueError, match="min_encounters must be at least 1"):
        elig.HeadRule(18, None, 0)


def test_encounters_are_counted_from_the_vocabularys_encounter_token():
    enc = default_vocabulary().id_of("encounter")
    other = enc + 5
    lists = [[enc, other, enc], [], [other], [enc]]
    arrow = pa.chunked_array([pa.array(lists[:2], pa.list_(pa.int32())), pa.array(lists[2:], pa.list_(pa.int32()))])
    assert elig.encounter_counts(arrow).tolist() == [2, 0, 0, 1]
    padded = np.array([[enc, other, enc], [0, 0, 0], [other, 0, 0], [enc, 0, 0]])
    assert elig.encounter_counts(padded).tolist() == [2, 0, 0, 1]


def test_screening_reads_the_encounter_column_and_counts_tokens_only_for_older_partitions(make_settings, tmp_path):
    """The features job's ``encounters`` column is what eligibility uses; a partition written before
    it existed (no such column) gives the same facts from its token lists."""
    enc = default_vocabulary().id_of("encounter")
    n = 30
    rng = np.random.default_rng(4)
    tokens = [[enc if rng.random() < 0.3 else enc + 3 for _ in range(int(k))] for k in rng.integers(0, 9, n)]
    rows = [{"patient_key": f"{i:032x}", "as_of": dt.date(2024, 6, 30), "length": len(t), "tokens": t,
             "days_before": list(range(len(t), 0, -1)), "age_years": 40.0 + i, "sex": "M",
             "encounters": sum(1 for x in t if x == enc),
             "prevalent_t2d": i % 3 == 0, "prevalent_ckd": False, "prevalent_hf": i % 5 == 0}
            for i, t in enumerate(tokens)]
    table = pa.Table.from_pylist(rows, schema=TIMELINES)
    scores = pa.table({"patient_key": [r["patient_key"] for r in reversed(rows)]})
    facts = {}
    for name, t in (("with_column", table), ("older", table.drop_columns(["encounters"]))):
        settings = make_settings(**{"lake.root": str(tmp_path / name)})
        commit_timelines(settings.lake.root, AS_OF, t, files=2, vocab_sha256="v")
        facts[name], _ = screening.timeline_facts(scores, LakePaths(settings.lake.root).timelines(AS_OF), None, AS_OF)
    assert facts["with_column"]["encounters"].tolist() == [r["encounters"] for r in reversed(rows)]
    assert {k: v.tolist() for k, v in facts["with_column"].items()} == {k: v.tolist() for k, v in facts["older"].items()}
    # A column that is there but empty is a broken partition, not a zero.
    settings = make_settings(**{"lake.root": str(tmp_path / "nulls")})
    broken = table.set_column(table.schema.get_field_index("encounters"), "encounters", pa.nulls(n, pa.int32()))
    commit_timelines(settings.lake.root, AS_OF, broken, files=1, vocab_sha256="v")
    with pytest.raises(screening.TimelinesNotUsable, match="null encounters"):
        screening.timeline_facts(scores, LakePaths(settings.lake.root).timelines(AS_OF), None, AS_OF)


def test_the_shipped_defaults_keep_children_and_empty_timelines_off_every_list():
    settings = load_settings({})
    assert set(settings.scoring.eligibility) == set(HEADS)
    for head, rule in settings.scoring.eligibility.items():
        assert rule.min_age_years >= 18 and rule.min_encounters >= 1, head
        assert len(rule.source) > 40, head
    t2d = settings.scoring.eligibility["t2d"]
    assert (t2d.min_age_years, t2d.max_age_years) == (35, 70) and "USPSTF" in t2d.source
    # conf/defaults.yaml says the same as the settings model's own defaults.
    yaml_rules = yaml.safe_load(DEFAULTS_FILE.read_text())["scoring"]["eligibility"]
    from conf.settings import DEFAULT_ELIGIBILITY
    assert {h: {**r, "source": " ".join(r["source"].split())} for h, r in yaml_rules.items()} == \
        {h: {**r, "source": " ".join(r["source"].split())} for h, r in DEFAULT_ELIGIBILITY.items()}
    with pytest.raises(ConfigError, match="min_encounters"):
        load_settings({"scoring.eligibility.ckd.min_encounters": 0})
    with pytest.raises(ConfigError, match="max_age_years 30 is below min_age_years 35"):
        load_settings({"scoring.eligibility.t2d.max_age_years": 30})


def _lake_where_only_the_ineligible_score_high(settings) -> pa.Table:
    """Adults with encounters score 0.1; a child and empty timelines score 0.99 on every head."""
    enc = default_vocabulary().id_of("encounter")
    rows = []
    for i in range(40):
        child, empty = i < 5, 5 <= i < 15
        rows.append({"patient_key": f"{i:032x}", "as_of": dt.date(2024, 6, 30),
                     "length": 0 if empty else 2, "tokens": [] if empty else [enc, enc + 7],
                     "days_before": [] if empty else [30, 10],
                     "age_years": 9.5 if child else 55.0, "sex": "F", "encounters": 0 if empty else 1,
                     "prevalent_t2d": False, "prevalent_ckd": False, "prevalent_hf": False})
    timelines = pa.Table.from_pylist(rows, schema=TIMELINES)
    commit_timelines(settings.lake.root, AS_OF, timelines, files=2, vocab_sha256="v")
    n = len(rows)
    high = [0.99 if i < 15 else 0.1 for i in range(n)]
    scores = pa.table({"patient_key": [r["patient_key"] for r in rows],
                       "as_of": pa.array([dt.date(2024, 6, 30)] * n, pa.date32()),
                       "model": ["emr_risk"] * n, "model_version": ["1.0.0"] * n,
                       "engine_fingerprint": ["onn-fp32-x"] * n, "precision": ["fp32"] * n, "run_id": ["r"] * n,
                       **{f"score_{h}": pa.array(high, pa.float32()) for h in HEADS}}, schema=SCORES)
    manifest = {"run_id": "r", "input": {"partition": f"emr/timelines/as_of={AS_OF}", "run_id": "test-features"},
                "calibration": {"id": "cal-1", "method": "platt"}}
    with atomic_partition(LakePaths(settings.lake.root).scores("emr_risk", AS_OF), manifest) as staging:
        import pyarrow.parquet as pq
        pq.write_table(scores, staging / "part-00000.parquet")
    return scores


@pytest.mark.parametrize("criterion", [{"scoring.screening_thresholds": {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}},
                                       {"scoring.screening_top_k": 40}])
def test_an_empty_timeline_or_a_child_is_never_listed_whatever_the_score(make_settings, criterion):
    settings = make_settings(**criterion)
    _lake_where_only_the_ineligible_score_high(settings)
    final, ledger = screening.build(settings, AS_OF)
    listed = read_partition(final)
    keys = set(listed.column("patient_key").to_pylist())
    assert not keys & {f"{i:032x}" for i in range(15)}
    # With thresholds nobody eligible reaches 0.5; with top 40 every eligible adult (by head's age range) is in.
    expected = set() if "scoring.screening_thresholds" in criterion else {f"{i:032x}" for i in range(15, 40)}
    assert keys == expected
    assert ledger.balanced and ledger.ignored["outside_age_range"] == 5
    assert ledger.ignored["no_encounter_in_lookback"] == 10


def _card_with_operating_points(tmp_path, calibration_id: str) -> str:
    from scoring_fixtures import build_model, write_card

    card_file = write_card(build_model(tmp_path / "m.onnx"), tmp_path / "emr_risk.yaml")
    card = yaml.safe_load(card_file.read_text())
    card["operating_points"] = {"calibration_id": calibration_id,
                                "rule": {"name": "list_size_per_1000", "target": 100},
                                "heads": {h: {"threshold": 0.05, "holdout": {"sensitivity": 0.5, "ppv": 0.3}}
                                          for h in HEADS}}
    card_file.write_text(yaml.safe_dump(card))
    return str(card_file)


def test_thresholds_come_from_the_card_unless_overridden_and_the_manifest_says_which(make_settings, tmp_path):
    card = _card_with_operating_points(tmp_path, "cal-1")
    settings = make_settings(**{"models": {"emr_risk": card}})
    _lake_where_only_the_ineligible_score_high(settings)
    final, _ = screening.build(settings, AS_OF)
    # Card threshold 0.05: every eligible adult (0.1) is listed on every head whose age range holds 55.
    assert read_partition(final).num_rows == 25 * 3
    m = read_manifest(final)
    for h in HEADS:
        t = m["criterion"]["thresholds"][h]
        assert t["threshold"] == 0.05 and t["source"].startswith("model card") and t["calibration_id"] == "cal-1"
        assert t["holdout"] == {"sensitivity": 0.5, "ppv": 0.3}
    override = make_settings(**{"models": {"emr_risk": card}, "scoring.screening_thresholds": {"ckd": 0.5}})
    final, _ = screening.build(override, AS_OF)
    m = read_manifest(final)
    assert m["criterion"]["thresholds"]["ckd"] == {"threshold": 0.5, "source": "override (scoring.screening_thresholds)",
                                                    "card_threshold": 0.05}
    assert m["per_head"] == {"t2d": 25, "ckd": 0, "hf": 25}


def test_card_thresholds_for_another_calibration_are_refused(make_settings, tmp_path):
    settings = make_settings(**{"models": {"emr_risk": _card_with_operating_points(tmp_path, "cal-2")}})
    _lake_where_only_the_ineligible_score_high(settings)
    with pytest.raises(screening.ThresholdsNotUsable, match="calibration cal-2.*calibrated with cal-1"):
        screening.build(settings, AS_OF)
    assert not LakePaths(settings.lake.root).screening(AS_OF).exists()
