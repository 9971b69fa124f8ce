"""The Spark features job on tiny real Parquet: agrees with the pure rules on every row,
balances its ledgers, reruns identically, replaces rather than appends, refuses uncommitted input."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from emr_features_data import (AS_OF, HORIZON_DAYS, LOOKBACK_DAYS, MAX_TOKENS, always_observed, features_settings,
                               key, write_committed)

from jobs import emr_features
from lake.commit import is_committed, read_manifest
from lake.paths import LakePaths
from lake.schemas import EVENTS, PREVALENT_COLUMNS, QUARANTINE, SCORES, TIMELINES, TIMELINES_WITH_LABELS
from preprocessing.timelines import timelines_table
from preprocessing.vocabulary import default_vocabulary


def read_partition(path: Path) -> list[dict]:
    """Rows of a committed partition sorted by key (files are hash-partitioned, each sorted)."""
    assert is_committed(path)
    rows = pa.concat_tables([pq.read_table(f) for f in sorted(path.glob("*.parquet"))]).to_pylist()
    return sorted(rows, key=lambda r: r["patient_key"])


@pytest.fixture(scope="module")
def first_run(spark, emr_lake):
    root, events, patients, facts = emr_lake
    summary = emr_features.run(features_settings(root), AS_OF.isoformat(), with_labels=True, run_id="run-1")
    return summary, read_partition(Path(summary["output"]))


def test_spark_rows_equal_the_pure_function_on_every_row(first_run, emr_lake) -> None:
    root, events, patients, facts = emr_lake
    summary, rows = first_run
    expected = timelines_table(events, patients, AS_OF, LOOKBACK_DAYS, MAX_TOKENS, HORIZON_DAYS,
                               periods=always_observed(patients)).to_pylist()
    assert len(rows) == len(expected) > 30
    assert rows == expected
    assert any(r["length"] == MAX_TOKENS for r in rows) and any(r["length"] == 0 for r in rows)
    assert {r["label_t2d"] for r in rows} == {0, 1, None}


def test_prevalence_flags_are_computed_by_spark_as_by_the_pure_rules(first_run, emr_lake) -> None:
    summary, rows = first_run
    by_key = {r["patient_key"]: r for r in rows}
    for col in PREVALENT_COLUMNS:
        assert {r[col] for r in rows} == {True, False}  # never null, both values present
    # Six years before the as-of date: outside the lookback window, still a diagnosis.
    long_ago = by_key[key("long_ago")]
    assert long_ago["prevalent_t2d"] and long_ago["length"] == 0 and long_ago["label_t2d"] is None
    last_us = by_key[key("last_us")]  # HF coded in the as-of day's last µs; CKD only a family mention
    assert (last_us["prevalent_hf"], last_us["prevalent_ckd"], last_us["prevalent_t2d"]) == (True, False, False)
    assert not by_key[key("incident")]["prevalent_t2d"]  # negated before, diagnosed after: incident
    # Synthea-style SNOMED CT diagnoses count: T2D and CKD stage 4 (resolved: history) years ago.
    synthea = by_key[key("synthea")]
    assert (synthea["prevalent_t2d"], synthea["prevalent_ckd"], synthea["prevalent_hf"]) == (True, True, False)
    assert synthea["label_t2d"] is None and synthea["label_ckd"] is None
    # Onset six years back but recorded after the as-of day: not known on D, so not prevalent,
    # and it became known in the horizon: incident. So did a (resolved) OMOP heart failure.
    late = by_key[key("late")]
    assert (late["prevalent_t2d"], late["label_t2d"], late["prevalent_hf"], late["label_hf"]) == (False, 1, False, 1)
    assert late["length"] == 0  # nothing of it reached the timeline
    # The label's "already diagnosed" and the flag are one rule.
    for head in ("t2d", "ckd", "hf"):
        assert all(r[f"label_{head}"] is None for r in rows if r[f"prevalent_{head}"])
        assert summary["prevalent"][f"prevalent_{head}"] == sum(r[f"prevalent_{head}"] for r in rows)


def test_output_schema_manifest_and_vocabulary_file(first_run, emr_lake) -> None:
    root = emr_lake[0]
    summary, rows = first_run
    out = Path(summary["output"])
    assert out == LakePaths(root).timelines(AS_OF)
    for f in out.glob("*.parquet"):
        assert pq.read_table(f).cast(TIMELINES_WITH_LABELS).schema.names == TIMELINES_WITH_LABELS.names
    m = read_manifest(out)
    vocab = default_vocabulary()
    assert m["vocabulary"]["sha256"] == vocab.sha256 and m["vocabulary"]["version"] == vocab.version
    assert json.loads((root / m["vocabulary"]["file"]).read_text())["sha256"] == vocab.sha256
    assert (m["run_id"], m["as_of"], m["lookback_days"], m["max_tokens"]) == ("run-1", "2024-06-30",
                                                                             LOOKBACK_DAYS, MAX_TOKENS)
    lengths = sorted(r["length"] for r in rows)
    assert m["rows"] == len(rows) and m["length"]["max"] == lengths[-1]
    assert lengths[0] <= m["length"]["p50"] <= m["length"]["p95"] <= m["length"]["p99"] <= lengths[-1]
    t2d = m["labels"]["label_t2d"]
    assert t2d["positive"] == sum(r["label_t2d"] == 1 for r in rows)
    assert t2d["null"] == sum(r["label_t2d"] is None for r in rows)


def test_ledgers_balance_and_account_for_every_record(first_run, emr_lake) -> None:
    root, events, patients, facts = emr_lake
    summary, rows = first_run
    ledger = json.loads((Path(summary["run_dir"]) / "ledger.json").read_text())
    assert ledger["balanced"]
    p = ledger["stages"]["emr_features"]
    assert p["records_in"] == patients.num_rows and p["records_out"] == len(rows)
    assert p["quarantined"] == {"no_birth_date": facts["no_birth_date"], "no_patient_key": 1,
                                "duplicate_patient_key": facts["duplicate_rows"]}
    assert p["ignored"] == {"born_after_as_of": facts["born_after"]}
    e = ledger["stages"]["emr_features.events"]
    assert e["records_in"] == events.num_rows and e["records_out"] == sum(r["length"] for r in rows)
    assert e["ignored"]["unknown_patient"] == facts["unknown_patient_events"]
    assert e["quarantined"]["no_patient_key"] == facts["null_key_events"]
    assert e["ignored"]["truncated_max_tokens"] > 0 and e["ignored"]["after_as_of"] > 0
    # Clinical time on or before D but recorded after it: counted apart, never in a timeline.
    end_us = (AS_OF.toordinal() - 719162 + 1) * 86_400_000_000
    t_us = events.column("event_time").cast(pa.int64()).to_pylist()
    k_us = events.column("known_time").cast(pa.int64()).to_pylist()
    known_after = sum(1 for t, k, pk in zip(t_us, k_us, events.column("patient_key").to_pylist())
                      if t is not None and t < end_us and k is not None and k >= end_us
                      and pk in {r["patient_key"] for r in rows})
    assert known_after > 0 and e["ignored"]["known_after_as_of"] == known_after
    assert e["balanced"] and p["balanced"]
    q = pq.read_table(next((Path(summary["run_dir"]) / "quarantine" / "emr_features").glob("*.parquet")))
    assert q.schema.names == QUARANTINE.names
    assert sorted(q.column("reason").to_pylist()) == ["duplicate_patient_key", "no_birth_date", "no_patient_key"]


def test_rerun_through_the_cli_replaces_the_partition_with_identical_rows(first_run, emr_lake, monkeypatch,
                                                                          capsys) -> None:
    root = emr_lake[0]
    summary, rows = first_run
    out = Path(summary["output"])
    (out / "part-99999.parquet").write_bytes(b"left over from an older run")
    files_before = sorted(p.name for p in out.glob("*.parquet") if p.name != "part-99999.parquet")
    # The spark-submit entry point reads the same settings from the environment.
    for k, v in {"LOOKBACK_DAYS": LOOKBACK_DAYS, "MAX_TOKENS": MAX_TOKENS, "HORIZON_DAYS": HORIZON_DAYS}.items():
        monkeypatch.setenv(f"MEDSCREEN_FEATURES__{k}", str(v))
    monkeypatch.setenv("MEDSCREEN_SPARK__SHUFFLE_PARTITIONS", "2")
    rc = emr_features.main(["--lake", str(root), "--as-of", AS_OF.isoformat(), "--with-labels", "--run-id", "run-2"])
    assert rc == 0
    again = json.loads(capsys.readouterr().out)
    assert again["output"] == summary["output"] and again["rows"] == len(rows)
    assert not (out / "part-99999.parquet").exists()  # replaced whole, not appended to
    assert sorted(p.name for p in out.glob("*.parquet")) == files_before
    assert read_partition(out) == rows
    assert read_manifest(out)["run_id"] == "run-2"
    # No staging or half-switched link left; beside the partitions only their version store.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".") and p.name != ".versions"]


def test_nightly_run_without_labels(spark, emr_lake) -> None:
    root, events, patients, facts = emr_lake
    as_of = AS_OF.replace(year=2023, month=12, day=31)
    summary = emr_features.run(features_settings(root, **{"features.max_tokens": 16}), as_of.isoformat(),
                               run_id="run-nightly")
    out = Path(summary["output"])
    assert out.name == "as_of=2023-12-31" and is_committed(LakePaths(root).timelines(AS_OF))
    rows = read_partition(out)
    assert rows == timelines_table(events, patients, as_of, LOOKBACK_DAYS, 16,
                                   periods=always_observed(patients)).to_pylist()
    assert set(rows[0]) == set(TIMELINES.names) and summary["labels"] == {}
    # Without labels the prevalence flags are still there, point in time: HF coded on
    # 2024-06-30 is not prevalent as of 2023-12-31.
    assert {r["prevalent_t2d"] for r in rows} == {True, False}
    assert not next(r for r in rows if r["patient_key"] == key("last_us"))["prevalent_hf"]
    assert read_manifest(out)["prevalent"] == summary["prevalent"]


def test_uncommitted_input_is_refused(tmp_path) -> None:
    paths = LakePaths(tmp_path)
    write_committed(paths.events, pa.Table.from_pylist([], schema=EVENTS))
    (paths.patients).mkdir(parents=True)  # written but never committed (ingest crashed)
    with pytest.raises(emr_features.InputNotCommitted, match="patients partition .* not committed"):
        emr_features.run(features_settings(tmp_path), AS_OF.isoformat())
    assert not paths.timelines(AS_OF).exists()
    assert emr_features.main(["--lake", str(tmp_path), "--as-of", AS_OF.isoformat()]) == 2


def test_screening_leaves_out_the_patients_spark_flagged_as_prevalent(first_run, emr_lake) -> None:
    """Spark-built timelines → a scores partition naming them → the screening list and its ledger."""
    from inference import screening

    root, events, patients, _ = emr_lake
    timelines = LakePaths(root).timelines(AS_OF)
    rows = read_partition(timelines)  # as the partition is now (an earlier test may have rerun it)
    keys = [r["patient_key"] for r in rows]
    n = len(keys)
    scores = pa.table({"patient_key": keys, "as_of": [AS_OF] * n, "model": ["emr_risk"] * n,
                       "model_version": ["t"] * n, "engine_fingerprint": ["onn-fp32-t"] * n,
                       "precision": ["fp32"] * n, "run_id": ["score-run"] * n,
                       **{f"score_{h}": [0.9] * n for h in ("t2d", "ckd", "hf")}}, schema=SCORES)
    manifest = {"run_id": "score-run", "input": {"partition": f"emr/timelines/as_of={AS_OF}",
                                                 "run_id": read_manifest(timelines)["run_id"]}}
    write_committed(LakePaths(root).scores("emr_risk", AS_OF), scores, n_files=1, manifest=manifest)
    everyone_listed = {"scoring.screening_thresholds": {"t2d": 0.5, "ckd": 0.5, "hf": 0.5}}
    settings = features_settings(root, **everyone_listed)
    final, ledger = screening.build(settings, AS_OF.isoformat())
    flagged = pq.read_table(final / "part-00000.parquet").to_pylist()
    # Everyone scores above the threshold: the list is exactly the patients eligible for the head (age
    # range, an encounter in the timeline) and not yet diagnosed, by the pure rules' rows and flags.
    pure = {r["patient_key"]: r
            for r in timelines_table(events, patients, AS_OF, LOOKBACK_DAYS, MAX_TOKENS,
                                     periods=always_observed(patients)).to_pylist()}
    encounter = default_vocabulary().id_of("encounter")

    def eligible(k: str, head: str) -> bool:
        rule, r = settings.scoring.eligibility[head], pure[k]
        age = int(r["age_years"] // 1)
        return (rule.min_age_years <= age and (rule.max_age_years is None or age <= rule.max_age_years)
                and r["tokens"].count(encounter) >= rule.min_encounters)

    heads = ("t2d", "ckd", "hf")
    for head in heads:
        assert {r["patient_key"] for r in flagged if r["head"] == head} == \
            {k for k in keys if eligible(k, head) and not pure[k][f"prevalent_{head}"]}
    listed = {k for k in keys if any(eligible(k, h) and not pure[k][f"prevalent_{h}"] for h in heads)}
    excluded = {k for k in keys if k not in listed and any(eligible(k, h) for h in heads)}
    assert excluded, "a patient eligible but diagnosed everywhere they are eligible"
    assert ledger.balanced and ledger.records_in == n == len(pure) and ledger.records_out == len(listed)
    assert ledger.ignored["below_threshold"] == 0 and ledger.ignored["excluded_prevalent"] == len(excluded)
    assert sum(ledger.ignored.values()) == n - len(listed)
    assert read_manifest(final)["exclude_prevalent"]["timelines"]["run_id"] == read_manifest(timelines)["run_id"]
    # A T2D-only list (no score reaches the other heads' thresholds): every patient eligible for T2D but
    # already diagnosed with it is accounted for as excluded.
    t2d_only = features_settings(root, **{"scoring.screening_thresholds": {"t2d": 0.5, "ckd": 2.0, "hf": 2.0}})
    _, ledger = screening.build(t2d_only, AS_OF.isoformat())
    t2d_listed = {k for k in keys if eligible(k, "t2d") and not pure[k]["prevalent_t2d"]}
    t2d_excluded = {k for k in keys if eligible(k, "t2d") and pure[k]["prevalent_t2d"]}
    assert ledger.balanced and t2d_excluded and ledger.records_out == len(t2d_listed)
    assert ledger.ignored["excluded_prevalent"] == len(t2d_excluded)
