"""A real Airflow retry of the nightly DAG's ``score_emr`` task resumes the run its first try left.

``dag.test()`` runs the nightly DAG with every task but ``score_emr`` marked
successful (their outputs — timelines, a gated engine — are prepared here) and
``score_emr`` allowed one retry with no delay. The first try's scoring
subprocess kills itself with SIGKILL after three of eight fragments are staged
(the CLI's test-only fault hook, armed through the environment); Airflow marks
the try failed and runs the second try, which must use the same run id, reuse
the staged fragments and commit scores equal, row for row, to a clean CLI run
of the same timelines on another lake.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from dag_runs import key_file, parse_dag, pipeline_settings
from lake.commit import partition_files, read_manifest
from lake.paths import LakePaths
from lake.runs import orchestrated_run_id
from medscreen.fault_injection import FAULT_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scoring"))
from scoring_fixtures import build_model, commit_timelines, random_timelines, write_card  # noqa: E402

pytestmark = pytest.mark.slow

AS_OF = "2024-06-30"
FRAGMENTS = 8
KILL_AFTER = 3
REPO = Path(__file__).resolve().parents[2]


def scores_of(partition: Path) -> dict[str, tuple]:
    rows: dict[str, tuple] = {}
    for f in partition_files(partition):
        for r in pq.read_table(f, partitioning=None).select(
                ["patient_key", "score_t2d", "score_ckd", "score_hf"]).to_pylist():
            assert r["patient_key"] not in rows, f"patient scored twice: {r['patient_key']}"
            rows[r["patient_key"]] = (r["score_t2d"], r["score_ckd"], r["score_hf"])
    return rows


@pytest.fixture(scope="module")
def retried(tmp_path_factory, airflow_db):
    """The nightly DAG's score_emr, killed mid-scoring on its first try and retried by Airflow."""
    from conf.settings import load_settings
    from engines import cache

    root = tmp_path_factory.mktemp("retry")
    onnx_path = build_model(root / "models" / "emr_risk.onnx")
    card = write_card(onnx_path, root / "models" / "emr_risk.yaml")
    table = random_timelines(1200, seed=31)
    lakes = {"dag": root / "lake_dag", "clean": root / "lake_clean"}
    for lake in lakes.values():
        commit_timelines(lake, AS_OF, table, files=FRAGMENTS)
    marker = root / "fault-fired"
    scoring_env = {"MEDSCREEN_MODELS": json.dumps({"emr_risk": str(card)}),
                   "MEDSCREEN_ENGINES__CACHE_DIR": str(root / "engines"),
                   "MEDSCREEN_RAY__ACTOR_NUM_CPUS": "0.5", "MEDSCREEN_SCORING__TOKEN_BUDGET": "2048",
                   # The default fragment size makes one fragment per file: 8 here.
                   FAULT_ENV: f"{KILL_AFTER}:{marker}"}

    with pipeline_settings(lakes["dag"], root / "no-emr-input"):
        mp = pytest.MonkeyPatch()
        try:
            for k, v in scoring_env.items():
                mp.setenv(k, v)
            cache.ensure(load_settings(), precision="fp32")  # the gated engine engines_ensure would build
            dag = parse_dag("nightly_screening")
            task = dag.task_dict["score_emr"]
            task.retries, task.retry_delay = 1, dt.timedelta(0)
            dag_run = dag.test(
                logical_date=dt.datetime.fromisoformat(AS_OF).replace(tzinfo=dt.timezone.utc),
                run_conf={"models": ["emr_risk"]}, mark_success_pattern=r"(?!score_emr$).*")
            ti = next(t for t in dag_run.get_task_instances() if t.task_id == "score_emr")
            dag_run_id = dag_run.run_id
        finally:
            mp.undo()

    # The clean reference: the same CLI, the same engine and timelines, no fault, another lake.
    env = {**os.environ, **scoring_env, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled",
           "MEDSCREEN_LAKE__ROOT": str(lakes["clean"]),
           # The key the DAG's tasks read (pipeline_settings: a key file beside the lakes).
           "MEDSCREEN_PSEUDONYM__KEY_FILE": str(key_file(root))}
    env.pop(FAULT_ENV)
    env.pop("RAY_ADDRESS", None)
    clean = subprocess.run([sys.executable, "-m", "medscreen", "score", "emr", "--lake", str(lakes["clean"]),
                            "--as-of", AS_OF, "--run-id", "clean"], env=env, capture_output=True, text=True,
                           timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    return {"ti": ti, "dag_run_id": dag_run_id, "marker": marker, "lakes": lakes}


def test_the_first_try_died_and_airflow_retried_it_to_success(retried) -> None:
    ti = retried["ti"]
    assert retried["marker"].is_file(), "the fault hook never fired: the first try was not killed"
    assert ti.state == "success" and ti.try_number == 2, (ti.state, ti.try_number)


def test_the_retry_resumed_the_same_run_and_scored_only_what_was_left(retried) -> None:
    lake = LakePaths(retried["lakes"]["dag"])
    run_id = orchestrated_run_id("score_emr", retried["dag_run_id"], "score_emr")
    manifest = read_manifest(lake.scores("emr_risk", AS_OF))
    # The run id comes from the DAG run and the task, not the try number: one run across both tries.
    assert manifest["run_id"] == run_id
    assert sorted(p.name for p in lake.root.joinpath("runs").iterdir()) == [run_id]
    mine = json.loads((lake.run(run_id) / "metrics.json").read_text())["throughput"]
    clean = json.loads((LakePaths(retried["lakes"]["clean"]).run("clean") / "metrics.json")
                       .read_text())["throughput"]
    assert mine["fragments"] == clean["fragments"] == FRAGMENTS
    assert mine["fragments_resumed"] >= KILL_AFTER
    assert mine["fragments_resumed"] + mine["fragments_scored_this_attempt"] == FRAGMENTS
    # The clean run scored every batch in its one attempt; the retry fewer, the run as many in all.
    assert clean["batches_scored_this_attempt"] == clean["batches"] == mine["batches"]
    assert 0 < mine["batches_scored_this_attempt"] < clean["batches_scored_this_attempt"]
    ledger = json.loads((lake.run(run_id) / "ledger.json").read_text())["stages"]["score_emr"]
    assert ledger["balanced"] and ledger["records_out"] == 1200


def test_the_committed_scores_equal_a_clean_runs_row_for_row(retried) -> None:
    resumed = scores_of(LakePaths(retried["lakes"]["dag"]).scores("emr_risk", AS_OF))
    clean = scores_of(LakePaths(retried["lakes"]["clean"]).scores("emr_risk", AS_OF))
    assert len(clean) == 1200 and set(resumed) == set(clean)
    for key, row in clean.items():
        np.testing.assert_array_equal(resumed[key], row, err_msg=key)
    assert not list((retried["lakes"]["dag"] / "scores" / "model=emr_risk").glob(".staging-*"))
