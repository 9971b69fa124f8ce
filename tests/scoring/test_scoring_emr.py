"""End to end on real local Ray + real ONNX Runtime + real Parquet: scoring, reruns, failures, QC."""
from __future__ import annotations

import datetime as dt
import json
import socket
import time
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.settings import Settings
from inference import emr, emr_feed
from inference.batching import pack_fragment
from engines.source import CachedEngine
from inference.qc import QCFailed
from lake.commit import atomic_partition, is_committed, read_manifest
from lake.paths import LakePaths
from lake.schemas import HEADS, SCORES
from scoring_fixtures import (BrokenLowPrecision, SlowEngine, commit_timelines, crash_once_actor,
                              crash_while_armed_actor, marked_parts,
                              random_timelines, reference_scores, same_verdict)

AS_OF = "2024-06-30"
N = 400


def _scores(settings: Settings, as_of: str = AS_OF) -> pa.Table:
    part = LakePaths(settings.lake.root).scores("emr_risk", as_of)
    return pa.concat_tables([pq.read_table(f) for f in sorted(part.glob("*.parquet"))])


def _assert_matches_engine_alone(scores: pa.Table, expected: dict[str, np.ndarray]) -> None:
    keys = scores.column("patient_key").to_pylist()
    assert len(keys) == len(set(keys)) == len(expected), "every scoreable row exactly once"
    got = np.stack([scores.column(f"score_{h}").to_numpy() for h in ("t2d", "ckd", "hf")], axis=1)
    want = np.stack([expected[k] for k in keys])
    # padding to buckets and batching must not change any patient's scores
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.fixture
def timelines(scoring_settings):
    settings = scoring_settings()
    table = random_timelines(N, seed=11, bad_rows=True)
    commit_timelines(settings.lake.root, AS_OF, table)
    return settings, table


def _would_be_in_top_k_but_diagnosed(table: pa.Table, scores: pa.Table, settings: Settings, k: int) -> set[str]:
    from preprocessing.vocabulary import default_vocabulary

    enc = default_vocabulary().id_of("encounter")
    rows = {r["patient_key"]: r for r in table.to_pylist()}
    out = set()
    for h in HEADS:
        rule = settings.scoring.eligibility[h]
        ranked = sorted(zip(scores.column(f"score_{h}").to_pylist(), scores.column("patient_key").to_pylist()),
                        key=lambda x: (-x[0], x[1]))
        taken = 0
        for _, key in ranked:
            r = rows[key]
            age = int(np.floor(r["age_years"]))
            if not (rule.min_age_years <= age and (rule.max_age_years is None or age <= rule.max_age_years)
                    and r["tokens"].count(enc) >= rule.min_encounters):
                continue
            if taken == k:
                break
            if r[f"prevalent_{h}"]:
                out.add(key)
            else:
                taken += 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_scoring_scores_commits_reports_and_reruns_identically(timelines, scoring_models):
    settings, table = timelines
    settings = settings.model_copy(update={"scoring": settings.scoring.model_copy(
        update={"prometheus_port": _free_port(), "screening_top_k": 10})})
    run_dir = emr.score(settings, AS_OF, fragment_rows=64)

    lake = LakePaths(settings.lake.root)
    final = lake.scores("emr_risk", AS_OF)
    assert is_committed(final) and read_manifest(final)["run_id"] == run_dir.name
    first = _scores(settings)
    valid = table.filter(pa.compute.is_in(table.column("patient_key"), first.column("patient_key")))
    _assert_matches_engine_alone(first, reference_scores(scoring_models["good"], valid))
    assert set(first.column("precision").to_pylist()) == {"fp32"}
    assert first.column("engine_fingerprint")[0].as_py().startswith("onn-fp32-")

    for name in ("manifest.json", "ledger.json", "metrics.json", "report.html", "quarantine.parquet"):
        assert (run_dir / name).is_file(), name
    ledger = json.loads((run_dir / "ledger.json").read_text())
    assert ledger["balanced"] and ledger["stages"]["score_emr"]["records_in"] == N
    assert ledger["stages"]["score_emr"]["records_out"] == N - 4
    assert ledger["stages"]["score_emr"]["quarantined"] == {
        "invalid_sex": 1, "length_exceeds_max_bucket": 1, "length_mismatch": 1, "missing_age": 1}
    quarantine = pq.read_table(run_dir / "quarantine.parquet")
    assert sorted(quarantine.column("patient_key").to_pylist()) == sorted(table.column("patient_key").to_pylist()[1:5])
    m = json.loads((run_dir / "metrics.json").read_text())
    t = m["throughput"]
    for key in ("records_per_s", "padding_efficiency", "actor_restarts", "rows_scored", "batches"):
        assert key in t, key
    for part in ("host", "device", "total"):
        assert set(t["latency"][part]) == {"p50_ms", "p95_ms", "p99_ms", "max_ms"}
    assert 0.3 < t["padding_efficiency"] <= 1.0 and t["rows_scored"] == N - 4
    assert m["qc"]["passed"] and not m["fp32_safe_mode"] and m["throughput_over_time"]
    assert set(m["histograms"]) == {"t2d", "ckd", "hf"}
    html = (run_dir / "report.html").read_text()
    assert html.count("<svg") >= 4 and "QC gate" in html and "Ledger" in html and "http" not in \
        html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert not any(k in html for k in table.column("patient_key").to_pylist())  # no patient keys

    screening = pq.read_table(lake.screening(AS_OF) / "part-00000.parquet")
    assert screening.num_rows == 30 and set(screening.column("run_id").to_pylist()) == {run_dir.name}
    # Patients already diagnosed are not on their head's outreach list; the screening ledger balances.
    prevalent = {(h, r["patient_key"]) for r in table.to_pylist() for h in HEADS if r[f"prevalent_{h}"]}
    assert prevalent and not prevalent & set(zip(screening.column("head").to_pylist(),
                                                 screening.column("patient_key").to_pylist()))
    assert ledger["stages"]["screening"]["balanced"]
    # Exactly the patients on no list who, on a head they are eligible for (age, an encounter), would be
    # in its top 10 but for being already diagnosed: counted here from the timelines' flags and the scores.
    would_have_been = _would_be_in_top_k_but_diagnosed(table, first, settings, 10)
    listed = set(screening.column("patient_key").to_pylist())
    assert would_have_been - listed, "the data must exercise the rule"
    assert ledger["stages"]["screening"]["ignored"]["excluded_prevalent"] == len(would_have_been - listed)
    metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{settings.scoring.prometheus_port}/metrics",
                                          timeout=5).read().decode()
    assert "medscreen_emr_records_per_second" in metrics_text
    assert "medscreen_emr_batch_latency_seconds_bucket" in metrics_text

    # Same input, same engine: the same rows in the same files (only run_id differs).
    files_before = sorted(p.name for p in final.glob("*.parquet"))
    run2 = emr.score(settings, AS_OF, fragment_rows=64)
    assert run2 != run_dir
    second = _scores(settings)
    assert sorted(p.name for p in final.glob("*.parquet")) == files_before
    assert first.drop_columns(["run_id"]).equals(second.drop_columns(["run_id"]))


def test_scoring_refuses_vocabulary_mismatch(scoring_settings):
    settings = scoring_settings()
    commit_timelines(settings.lake.root, AS_OF, random_timelines(20, seed=2), vocab_sha256="0" * 64)
    with pytest.raises(emr.VocabularyMismatch, match="rebuild"):
        emr.score(settings, AS_OF)
    assert not LakePaths(settings.lake.root).scores("emr_risk", AS_OF).exists()


def test_scoring_refuses_uncommitted_timelines(scoring_settings):
    settings = scoring_settings()
    with pytest.raises(FileNotFoundError, match="emr features"):
        emr.score(settings, AS_OF)


def test_a_threaded_actor_overlaps_its_calls_and_runs_the_engine_one_call_at_a_time(scoring_settings,
                                                                                    scoring_models):
    """ray.actor_threads = 2: while one call holds the device another decodes or writes its fragment; the
    engine (30 ms a batch here) is never entered twice at once (SlowRunner raises if it is), so calls
    queue for it, and the scores are the engine's own."""
    settings = scoring_settings(**{"ray.actor_threads": 2, "ray.num_actors": 1})
    table = random_timelines(N, seed=12)
    commit_timelines(settings.lake.root, AS_OF, table)
    run_dir = emr.score(settings, AS_OF, fragment_rows=40, engine_source=SlowEngine(CachedEngine(settings)))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["throughput"]["actors"] == 1 and m["settings"]["actor_threads"] == 2
    # Calls queued for the device: only a second call running beside the one inside can wait 10+ ms.
    assert m["throughput"]["device_wait_s_total"] > 0.01
    scores = _scores(settings)
    _assert_matches_engine_alone(scores, reference_scores(scoring_models["good"], table))


def test_writer_tasks_write_what_the_actor_would_have_written(scoring_settings, scoring_models):
    """ray.fragment_writers: tasks hands each scored fragment to a CPU task that writes
    it: the same scores, quarantine, screening list and balanced ledgers as the actor writing itself,
    with the writer's timings and the actor's start-up still in every fragment's record."""
    table = random_timelines(N, seed=13, bad_rows=True)
    runs = {}
    for writers in ("actor", "tasks"):
        settings = scoring_settings(**{"ray.fragment_writers": writers, "scoring.screening_top_k": 10})
        commit_timelines(settings.lake.root, AS_OF, table)
        run_dir = emr.score(settings, AS_OF, fragment_rows=64)
        lake = LakePaths(settings.lake.root)
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["settings"]["fragment_writers"] == writers
        assert m["throughput"]["driver"]["actor_write_s"] > 0 and m["throughput"]["startup"]["actors"] >= 1
        ledger = json.loads((run_dir / "ledger.json").read_text())
        assert ledger["balanced"] and ledger["stages"]["screening"]["balanced"]
        runs[writers] = {"scores": _scores(settings).drop_columns(["run_id"]),
                         "quarantine": pq.read_table(run_dir / "quarantine.parquet").sort_by("patient_key"),
                         "screening": pq.read_table(lake.screening(AS_OF) / "part-00000.parquet").drop_columns(["run_id"]),
                         "ledger": ledger["stages"]["score_emr"]}
    assert runs["tasks"]["scores"].num_rows == N - 4
    _assert_matches_engine_alone(runs["tasks"]["scores"], reference_scores(
        scoring_models["good"], table.filter(pa.compute.is_in(table.column("patient_key"),
                                                               runs["tasks"]["scores"].column("patient_key")))))
    for part in ("scores", "quarantine", "screening", "ledger"):
        assert runs["tasks"][part] == runs["actor"][part], part


def test_an_unset_token_budget_is_resolved_once_for_the_clusters_devices(scoring_settings):
    """scoring.token_budget unset on a Ray cluster without GPUs: 65 536, in the batches the packers cut
    and in what the run records (with GPUs it would be 262 144: conf.settings.DEFAULT_TOKEN_BUDGET)."""
    settings = scoring_settings(**{"scoring.token_budget": None})
    assert settings.scoring.token_budget is None
    table = random_timelines(N, seed=14)
    commit_timelines(settings.lake.root, AS_OF, table, files=1)
    run_dir = emr.score(settings, AS_OF, fragment_rows=N)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["settings"]["token_budget"] == 65_536 and m["throughput"]["fragments"] == 1
    # The packers cut the batches the resolved budget makes (the fixture's 2 048 would make many more).
    buckets = settings.scoring.length_buckets
    assert m["throughput"]["batches"] == len([b for b in pack_fragment(table, 0, buckets, 65_536) if b.n_rows]) \
        < len([b for b in pack_fragment(table, 0, buckets, 2_048) if b.n_rows])


def test_scoring_survives_an_actor_killed_mid_run(timelines, scoring_models, tmp_path):
    settings, table = timelines
    marker = tmp_path / "crashed"
    run_dir = emr.score(settings, AS_OF, fragment_rows=64, actor_cls=crash_once_actor(marker, 2))
    assert marker.exists(), "the actor process really died"
    scores = _scores(settings)
    valid = table.filter(pa.compute.is_in(table.column("patient_key"), scores.column("patient_key")))
    assert valid.num_rows == N - 4
    _assert_matches_engine_alone(scores, reference_scores(scoring_models["good"], valid))
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["throughput"]["actor_restarts"] >= 1
    assert json.loads((run_dir / "ledger.json").read_text())["balanced"]


def test_an_actor_that_keeps_dying_fails_the_run_with_its_fix_and_the_rerun_resumes(timelines, scoring_models,
                                                                                     tmp_path):
    """Past emr_feed.ACTOR_RESTARTS restarts the run stops with EngineActorLost (what to do: rerun with
    the same run id), publishes nothing, and that rerun scores every patient once."""
    settings, table = timelines
    armed = tmp_path / "armed"
    armed.touch()
    with pytest.raises(emr_feed.EngineActorLost, match="rerun with the same run_id"):
        emr.score(settings, AS_OF, run_id="run-dying", fragment_rows=64, actor_cls=crash_while_armed_actor(armed))
    assert not LakePaths(settings.lake.root).scores("emr_risk", AS_OF).exists()
    armed.unlink()
    run_dir = emr.score(settings, AS_OF, run_id="run-dying", fragment_rows=64)
    scores = _scores(settings)
    valid = table.filter(pa.compute.is_in(table.column("patient_key"), scores.column("patient_key")))
    assert valid.num_rows == scores.num_rows == N - 4
    _assert_matches_engine_alone(scores, reference_scores(scoring_models["good"], valid))
    assert json.loads((run_dir / "ledger.json").read_text())["balanced"]


def test_scoring_resumes_a_crashed_driver_rescoring_only_unfinished_fragments(timelines, scoring_models):
    settings, table = timelines

    def crash_after_two(fragment: int, done: int) -> None:
        if done == 2:
            raise KeyboardInterrupt("simulated driver crash")

    with pytest.raises(KeyboardInterrupt):
        emr.score(settings, AS_OF, run_id="run-crashy", fragment_rows=64, on_fragment_done=crash_after_two)
    final = LakePaths(settings.lake.root).scores("emr_risk", AS_OF)
    assert not final.exists()
    staged = marked_parts(final)
    assert len(staged) == 2

    run_dir = emr.score(settings, AS_OF, run_id="run-crashy", fragment_rows=64)
    m = json.loads((run_dir / "metrics.json").read_text())["throughput"]
    assert m["fragments_resumed"] == 2
    assert m["fragments_scored_this_attempt"] == m["fragments"] - 2
    staged_rows = sum(pq.read_metadata(final / name).num_rows for name in staged)
    assert m["rows_scored_this_attempt"] == N - 4 - staged_rows
    for name, mtime in staged.items():
        assert (final / name).stat().st_mtime_ns == mtime, "finished fragments are not rewritten"
    scores = _scores(settings)
    valid = table.filter(pa.compute.is_in(table.column("patient_key"), scores.column("patient_key")))
    _assert_matches_engine_alone(scores, reference_scores(scoring_models["good"], valid))
    assert not list(final.parent.glob(".staging-*"))


def test_scoring_fp32_safe_mode_when_low_precision_fails_qc(timelines, scoring_models, ray_local):
    settings, table = timelines
    settings = settings.model_copy(update={"engines": settings.engines.model_copy(update={"precision": "fp16"})})
    source = BrokenLowPrecision(CachedEngine(settings), str(scoring_models["nan"]))
    run_dir = emr.score(settings, AS_OF, engine_source=source, fragment_rows=200)
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["fp32_safe_mode"] and [a["precision"] for a in m["attempts"]] == ["fp16", "fp32"]
    assert not m["attempts"][0]["qc"]["passed"] and m["qc"]["passed"]
    assert any("NaN" in r for r in m["attempts"][0]["qc"]["reasons"])
    scores = _scores(settings)
    assert set(scores.column("precision").to_pylist()) == {"fp32"}
    assert read_manifest(LakePaths(settings.lake.root).scores("emr_risk", AS_OF))["fp32_safe_mode"] is True
    assert "FP32 safe mode" in (run_dir / "report.html").read_text()
    # Each attempt's engine actors are gone when it ends (on a GPU the fp32 attempt needs the GPU the
    # fp16 actors held): the Ray instance the tests share has all its CPUs free again.
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"engine actors outlived the run: {ray_local.available_resources()}"
        time.sleep(0.2)


def _commit_previous_scores(settings: Settings, scoring_models, table: pa.Table, previous: str = "2024-03-31") -> str:
    """Commit the good model's scores (engine alone) of ``table`` as the ``previous`` as-of's partition."""
    good = reference_scores(scoring_models["good"], table)
    keys = sorted(good)
    probs = np.stack([good[k] for k in keys])
    n = len(keys)
    prev = pa.table({"patient_key": keys, "as_of": pa.array([dt.date.fromisoformat(previous)] * n, pa.date32()),
                     "model": ["emr_risk"] * n, "model_version": ["test-1"] * n,
                     "engine_fingerprint": ["onn-fp32-previous"] * n, "precision": ["fp32"] * n,
                     "run_id": ["previous-run"] * n,
                     **{f"score_{h}": pa.array(probs[:, j], pa.float32()) for j, h in enumerate(HEADS)}},
                    schema=SCORES)
    with atomic_partition(LakePaths(settings.lake.root).scores("emr_risk", previous), {"run_id": "previous-run"}) as st:
        pq.write_table(prev, st / "part-00000.parquet")
    return previous


def test_scoring_psi_drift_fails_the_run_and_commits_nothing(scoring_settings, scoring_models):
    shifted = scoring_settings("shift_card")
    table = random_timelines(N, seed=11)
    # The previous as-of's committed scores: the good model (engine alone) on the same population.
    previous = _commit_previous_scores(shifted, scoring_models, table)
    commit_timelines(shifted.lake.root, AS_OF, table)
    with pytest.raises(QCFailed, match="PSI") as err:
        emr.score(shifted, AS_OF, run_id="run-drift", fragment_rows=200)
    assert err.value.verdict["reference"] == f"as_of={previous}"
    assert {c["check"] for c in err.value.verdict["checks"] if not c["passed"]} == {"psi"}
    # fp32 already: no safe mode to fall back to; nothing is committed, the run says why
    lake = LakePaths(shifted.lake.root)
    assert not lake.scores("emr_risk", AS_OF).exists() and not lake.screening(AS_OF).exists()
    assert not list(lake.scores("emr_risk", AS_OF).parent.glob(".staging-*"))
    m = json.loads((lake.run("run-drift") / "metrics.json").read_text())
    assert m["status"] == "failed_qc" and not m["qc"]["passed"] and not m["fp32_safe_mode"]
    assert "FAIL" in (lake.run("run-drift") / "report.html").read_text()


def test_scoring_qc_and_histograms_from_fragment_summaries_equal_a_full_read(scoring_settings, scoring_models):
    from inference import qc
    from inference.metrics import score_histograms

    settings = scoring_settings()
    lake = LakePaths(settings.lake.root)
    # The previous as-of's committed scores (the drift reference): the same engine on another population.
    previous = _commit_previous_scores(settings, scoring_models, random_timelines(N, seed=12))
    commit_timelines(settings.lake.root, AS_OF, random_timelines(N, seed=11, bad_rows=True))
    run_dir = emr.score(settings, AS_OF, fragment_rows=64)

    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["qc"]["psi_checked"] and m["throughput"]["fragments"] > 3
    # The independent reference: every committed score and every reference score read back.
    committed = qc.read_scores(sorted(lake.scores("emr_risk", AS_OF).glob("part-*.parquet")))
    reference = qc.read_scores(sorted(lake.scores("emr_risk", previous).glob("part-*.parquet")))
    same_verdict(m["qc"], qc.evaluate(committed, settings.scoring.qc, reference, f"as_of={previous}"))
    full = score_histograms(committed)
    for h in HEADS:
        assert m["histograms"][h]["counts"] == full[h]["counts"]
        assert (m["histograms"][h]["n"], m["histograms"][h]["non_finite"]) == (full[h]["n"], full[h]["non_finite"])
        assert m["histograms"][h]["std"] == pytest.approx(full[h]["std"], rel=1e-9)
    assert {"read_reference_s", "qc_s", "commit_s", "screening_s"} <= set(m["throughput"]["driver"])
    assert {"ray_init_s", "engine_load_s_max", "actors_ready_s"} <= set(m["throughput"]["startup"])


def test_scoring_applies_the_cards_calibration_after_the_engine_and_reports_reliability(scoring_settings,
                                                                                       scoring_models):
    from scoring_fixtures import PLATT
    import yaml

    settings = scoring_settings("calibrated_card", **{"scoring.screening_top_k": 5})
    table = random_timelines(N, seed=5)
    rng = np.random.default_rng(5)
    labels = {f"label_{h}": pa.array([None if u < 0.3 else int(u > 0.8) for u in rng.random(N)], pa.int8())
              for h in HEADS}
    for name, column in labels.items():
        table = table.append_column(name, column)
    commit_timelines(settings.lake.root, AS_OF, table)
    run_dir = emr.score(settings, AS_OF, fragment_rows=128)

    scores = _scores(settings)
    keys = scores.column("patient_key").to_pylist()
    raw = reference_scores(scoring_models["good"], table.filter(pa.compute.is_in(table.column("patient_key"),
                                                                                   scores.column("patient_key"))))
    for j, h in enumerate(HEADS):
        p = np.array([raw[k][j] for k in keys], np.float64)
        want = 1 / (1 + np.exp(-(PLATT[h]["a"] * np.log(p / (1 - p)) + PLATT[h]["b"])))
        np.testing.assert_allclose(scores.column(f"score_{h}").to_numpy(), want, rtol=1e-5, atol=1e-6)
    card = yaml.safe_load(scoring_models["calibrated_card"].read_text())
    manifest = read_manifest(LakePaths(settings.lake.root).scores("emr_risk", AS_OF))
    assert manifest["calibration"]["id"] == card["calibration"]["id"]
    assert manifest["calibration"]["method"] == "platt"
    m = json.loads((run_dir / "metrics.json").read_text())
    labelled = {h: sum(1 for k, v in zip(table.column("patient_key").to_pylist(), labels[f"label_{h}"].to_pylist())
                       if v is not None and k in set(keys)) for h in HEADS}
    assert {h: m["reliability"][h]["n"] for h in HEADS} == labelled
    html = (run_dir / "report.html").read_text()
    assert "Reliability against this as-of" in html and html.count("<circle") >= 3


def test_fragments_packed_ahead_are_bounded_per_device_not_per_actor():
    ahead = emr_feed.fragments_ahead
    # One H200 host: 16 CPUs, three actors sharing its GPU with four calls each in flight; the
    # bound it was measured with.
    assert ahead(cpus=16, actors=3, devices=1, limit=4) == 16
    # Eight GPUs of three actors each on 400 CPUs: 16 per GPU, not 16 per actor (384).
    assert ahead(cpus=400, actors=24, devices=8, limit=4) == 128
    # Queues deeper than the cap are still filled; the 2-core machine packs as deep as its queue.
    assert ahead(cpus=400, actors=24, devices=1, limit=4) == 96
    assert ahead(cpus=2, actors=1, devices=1, limit=4) == 4
