"""Faults survived by `medscreen score emr`, with real processes and real signals: two runs of one
date at once, the driver killed with SIGKILL mid-run, a Ray actor killed with SIGKILL — each followed
by a retry, and each checked by the ledger and by row identity against the engine's own scores."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from lake.commit import partition_files, read_manifest
from lake.locks import store_dir
from lake.paths import LakePaths
from scoring_fixtures import commit_timelines, random_timelines, reference_scores
from test_scoring_cli import _cli_env

AS_OF = "2024-06-30"
REPO = Path(__file__).resolve().parents[2]


def cli(settings, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "medscreen", "score", "emr", "--lake",
                             str(settings.lake.root), "--as-of", AS_OF, *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def scores_of(partition: Path) -> dict[str, tuple]:
    rows = {}
    for f in partition_files(partition):
        t = pq.read_table(f, partitioning=None)
        for r in t.select(["patient_key", "score_t2d", "score_ckd", "score_hf"]).to_pylist():
            assert r["patient_key"] not in rows, f"patient scored twice: {r['patient_key']}"
            rows[r["patient_key"]] = (r["score_t2d"], r["score_ckd"], r["score_hf"])
    return rows


def assert_matches_engine(rows: dict[str, tuple], expected: dict[str, np.ndarray]) -> None:
    assert set(rows) == set(expected), "a patient was lost or invented"
    for key, p in expected.items():
        np.testing.assert_allclose(rows[key], p, rtol=1e-4, atol=1e-5)


def ledger(run_dir: Path) -> dict:
    stage = json.loads((run_dir / "ledger.json").read_text())["stages"]["score_emr"]
    assert stage["balanced"], stage
    return stage


def test_two_runs_of_one_date_never_interleave_and_the_loser_retries(scoring_settings, scoring_models,
                                                                     monkeypatch):
    settings = scoring_settings()
    table = random_timelines(300, seed=21)
    commit_timelines(settings.lake.root, AS_OF, table, files=3)
    _cli_env(monkeypatch, settings)
    runs = {name: cli(settings, "--run-id", name) for name in ("backfill-a", "backfill-b")}
    done = {name: (p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for name, p in runs.items()}
    codes = sorted(rc for rc, _, _ in done.values())
    assert codes == [0, 75], {n: (rc, err[-1500:]) for n, (rc, _, err) in done.items()}
    winner = next(n for n, (rc, _, _) in done.items() if rc == 0)
    loser = next(n for n in done if n != winner)
    # The loser names who holds the partition, and wrote nothing.
    message = done[loser][2]
    assert winner in message and "pid" in message and "host" in message
    assert not LakePaths(settings.lake.root).run(loser).exists()

    lake = LakePaths(settings.lake.root)
    expected = reference_scores(scoring_models["good"], table)
    first_version = read_manifest(lake.scores("emr_risk", AS_OF))["version"]
    assert_matches_engine(scores_of(lake.scores("emr_risk", AS_OF)), expected)
    retry = cli(settings, "--run-id", loser)
    assert retry.wait(timeout=600) == 0, retry.stderr.read()[-2000:]
    final = lake.scores("emr_risk", AS_OF)
    assert read_manifest(final)["run_id"] == loser and read_manifest(final)["version"] != first_version
    assert_matches_engine(scores_of(final), expected)
    # The replaced version is still readable whole (retention) and equal row for row.
    assert scores_of(store_dir(final) / first_version) == scores_of(final)
    for name in (winner, loser):
        assert ledger(lake.run(name))["records_out"] == 300
    screening = read_manifest(lake.screening(AS_OF))
    assert screening["scores_version"] == read_manifest(final)["version"]


def _staged_done(lake_root: Path) -> list[Path]:
    return list((lake_root / "scores" / "model=emr_risk").glob(".staging-*/_work/*.done.json"))


def test_driver_killed_mid_run_is_resumed_by_its_retry(scoring_settings, scoring_models, monkeypatch):
    settings = scoring_settings()
    table = random_timelines(1200, seed=22)
    commit_timelines(settings.lake.root, AS_OF, table, files=8)
    _cli_env(monkeypatch, settings)
    run = cli(settings, "--run-id", "nightly-killed")
    deadline = time.monotonic() + 300
    while not _staged_done(settings.lake.root):
        assert run.poll() is None, f"the run ended before finishing a fragment: {run.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no fragment finished within 300 s"
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    finished = len(_staged_done(settings.lake.root))
    assert 1 <= finished < 8, "killed after every fragment was done: nothing left to resume"
    lake = LakePaths(settings.lake.root)
    assert not lake.scores("emr_risk", AS_OF).exists()  # nothing half published

    retry = cli(settings, "--run-id", "nightly-killed")  # what an Airflow retry runs
    assert retry.wait(timeout=600) == 0, retry.stderr.read()[-2000:]
    throughput = json.loads((lake.run("nightly-killed") / "metrics.json").read_text())["throughput"]
    assert throughput["fragments_resumed"] >= finished
    assert throughput["fragments_resumed"] + throughput["fragments_scored_this_attempt"] == 8
    assert_matches_engine(scores_of(lake.scores("emr_risk", AS_OF)), reference_scores(scoring_models["good"],
                                                                                      table))
    assert ledger(lake.run("nightly-killed"))["records_out"] == 1200
    assert not list((lake.root / "scores" / "model=emr_risk").glob(".staging-*"))


def _actor_pids(session: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if b"ScoreActor" in cmd and os.getsid(int(entry.name)) == session:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def test_ray_actor_killed_mid_run_loses_and_duplicates_nothing(scoring_settings, scoring_models,
                                                               monkeypatch):
    settings = scoring_settings()
    table = random_timelines(1200, seed=23)
    commit_timelines(settings.lake.root, AS_OF, table, files=8)
    _cli_env(monkeypatch, settings)
    run = cli(settings, "--run-id", "actor-killed")
    deadline = time.monotonic() + 300
    killed = None
    while killed is None:
        assert run.poll() is None, f"the run ended before an actor was seen: {run.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no ScoreActor process within 300 s"
        if _staged_done(settings.lake.root):
            pids = _actor_pids(os.getsid(run.pid))
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.02)
    rc = run.wait(timeout=600)
    lake = LakePaths(settings.lake.root)
    if rc != 0:  # the run may fail on a lost actor; its retry must then finish it
        retry = cli(settings, "--run-id", "actor-killed")
        assert retry.wait(timeout=600) == 0, retry.stderr.read()[-2000:]
    assert_matches_engine(scores_of(lake.scores("emr_risk", AS_OF)), reference_scores(scoring_models["good"],
                                                                                      table))
    assert ledger(lake.run("actor-killed"))["records_out"] == 1200
