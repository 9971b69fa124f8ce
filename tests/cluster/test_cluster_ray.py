"""`score emr` and `score ct` with --ray-address on a real Ray cluster (a head and two worker nodes,
each its own `ray start`): the engine actors run on the worker nodes (Ray's GCS actor table says
where), the rows equal the local-Ray run's, and a worker node killed mid-run is survived."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from cluster_support import REPO, TEST_KEY, _load, cluster_env, local_cluster
from lake.commit import partition_files, read_partition
from lake.paths import LakePaths

sys.path.insert(0, str(REPO / "tests" / "scoring"))
from scoring_fixtures import build_model, commit_timelines, random_timelines, write_card  # noqa: E402

ct_fixtures = _load("ct_score_fixtures", REPO / "tests" / "ct_score" / "conftest.py")

pytestmark = pytest.mark.cluster

AS_OF = "2024-06-30"
ENGINE_SLOT = json.dumps({local_cluster.ENGINE_RESOURCE: 0.5})
# Written by the run, not computed from the data: differ between any two runs.
RUN_COLUMNS = {"run_id", "finding_id"}


def medscreen(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "medscreen", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float = 900) -> Path:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, f"{proc.args[3:]} failed:\n{err[-3000:]}"
    return Path(out.strip().splitlines()[-1])


def cluster_state(address: str) -> dict:
    """Ray's own record of the cluster, from its GCS: every actor (class, node, pid) and every node."""
    code = f"""
import json, ray
from ray._private import state
ray.init(address={address!r}, configure_logging=False, log_to_driver=False)
print(json.dumps({{"actors": [{{"cls": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"],
                              "pid": a["Pid"]}} for a in state.actors().values()],
                  "nodes": [{{"node": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]}}
                            for n in ray.nodes()]}}))
"""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_nodes(state: dict) -> set[str]:
    return {n["node"] for n in state["nodes"] if local_cluster.ENGINE_RESOURCE in n["resources"]}


def engine_actors(state: dict, engine_class: str) -> list[dict]:
    # EMR engine actors are plain Ray actors of their class; Ray Data (CT) names the actor that hosts a
    # map_batches class "MapWorker(MapBatches(<class>))".
    return [a for a in state["actors"] if a["cls"] == engine_class or f"MapBatches({engine_class})" in a["cls"]]


@pytest.fixture(scope="module")
def emr_setup(tmp_path_factory, key_file) -> dict:
    root = tmp_path_factory.mktemp("ray_emr_models")
    model = build_model(root / "emr_risk.onnx", "good")
    card = write_card(model, root / "emr_risk.yaml")
    settings = {"MEDSCREEN_MODELS": json.dumps({"emr_risk": str(card)}),
                "MEDSCREEN_ENGINES__CACHE_DIR": str(root / "engines"),
                "MEDSCREEN_RAY__ACTOR_NUM_CPUS": "0.5", "MEDSCREEN_SCORING__TOKEN_BUDGET": "2048"}
    from conf.settings import load_settings
    from engines import cache

    cache.ensure(load_settings({"models": {"emr_risk": str(card)}, "engines.cache_dir": str(root / "engines")}),
                 precision="fp32")
    return {"table": random_timelines(1200, seed=31), "settings": settings, "key_file": key_file}


def emr_lake(tmp_path_factory, setup: dict, name: str, files: int = 8) -> Path:
    """The same 1 200 timelines committed in FILES files (one scoring fragment each)."""
    lake = tmp_path_factory.mktemp(name)
    commit_timelines(lake, AS_OF, setup["table"], files=files)
    return lake


def scores(lake: Path) -> dict[str, tuple]:
    rows: dict[str, tuple] = {}
    for f in partition_files(LakePaths(lake).scores("emr_risk", AS_OF)):
        import pyarrow.parquet as pq

        for r in pq.read_table(f, partitioning=None).select(
                ["patient_key", "score_t2d", "score_ckd", "score_hf"]).to_pylist():
            assert r["patient_key"] not in rows, f"patient scored twice: {r['patient_key']}"
            rows[r["patient_key"]] = (r["score_t2d"], r["score_ckd"], r["score_hf"])
    return rows


def assert_same_scores(got: dict[str, tuple], expected: dict[str, tuple], rtol: float = 1e-6) -> None:
    assert expected and set(got) == set(expected), "a patient was lost or invented"
    np.testing.assert_allclose(np.array([got[k] for k in sorted(expected)]),
                               np.array([expected[k] for k in sorted(expected)]), rtol=rtol, atol=rtol / 10)


def ledger(run_dir: Path, stage: str) -> dict:
    data = json.loads((run_dir / "ledger.json").read_text())
    assert data["stages"][stage]["balanced"], data
    return data["stages"][stage]


@pytest.fixture(scope="module")
def emr_local(emr_setup, ray_cluster, tmp_path_factory) -> dict:
    """The same run on a local Ray instance, while the cluster runs on this machine."""
    lake = emr_lake(tmp_path_factory, emr_setup, "ray_emr_local")
    env = cluster_env(emr_setup["key_file"], **emr_setup["settings"])
    run_dir = finish(medscreen(env, "score", "emr", "--lake", str(lake), "--as-of", AS_OF))
    # Without an address the run starts its own Ray; it must not join the `ray start` cluster
    # that a bare ray.init() finds through /tmp/ray/ray_current_cluster.
    joined = engine_actors(cluster_state(ray_cluster.ray_address), "ScoreActor")
    assert not joined, "the local run's engine actors ran on the Ray cluster"
    return {"lake": lake, "scores": scores(lake), "run_dir": run_dir}


def test_score_emr_on_the_ray_cluster_runs_engines_on_workers_and_equals_local(emr_setup, emr_local,
                                                                               ray_cluster, tmp_path_factory):
    lake = emr_lake(tmp_path_factory, emr_setup, "ray_emr_cluster")
    env = cluster_env(emr_setup["key_file"], **emr_setup["settings"], MEDSCREEN_RAY__ACTOR_RESOURCES=ENGINE_SLOT)
    run_dir = finish(medscreen(env, "score", "emr", "--lake", str(lake), "--as-of", AS_OF,
                               "--ray-address", ray_cluster.ray_address))
    assert_same_scores(scores(lake), emr_local["scores"])
    assert ledger(run_dir, "score_emr")["records_out"] == 1200
    state = cluster_state(ray_cluster.ray_address)
    actors = engine_actors(state, "ScoreActor")
    assert actors, f"no engine actor in the cluster's actor table: {[a['cls'] for a in state['actors']]}"
    assert {a["node"] for a in actors} <= engine_nodes(state), f"an engine actor ran on the head node: {state}"


def test_score_ct_on_the_ray_cluster_equals_local(ray_cluster, key_file, tmp_path_factory):
    dicom = tmp_path_factory.mktemp("ray_ct_dicom")
    s1 = ct_fixtures.write_tiny_series(dicom / "s1", 1, "20240105")
    s2 = ct_fixtures.write_tiny_series(dicom / "s2", 2, "20240210", nodule=False)
    rows = [{"series_uid": s["series_instance_uid"], "study_uid": s["study_uid"], "patient_id": s["patient_id"],
             "date": date, "verdict": "eligible", "files": s["files"]}
            for s, date in ((s1, "2024-01-05"), (s2, "2024-02-10"))]
    findings = {}
    for where in ("local", "cluster"):
        lake = tmp_path_factory.mktemp(f"ray_ct_{where}")
        ct_fixtures.write_series_index(lake, TEST_KEY.encode(), rows)
        extra = {"MEDSCREEN_RAY__ACTOR_RESOURCES": ENGINE_SLOT} if where == "cluster" else {}
        address = ["--ray-address", ray_cluster.ray_address] if where == "cluster" else []
        run_dir = finish(medscreen(cluster_env(key_file, **extra), "score", "ct", "--lake", str(lake),
                                   "--as-of", AS_OF, *address))
        table = read_partition(LakePaths(lake).findings("ct_nodule", AS_OF))
        findings[where] = _rows(table)
        ledger_data = json.loads((run_dir / "ledger.json").read_text())
        assert ledger_data["balanced"], ledger_data
    assert findings["local"], "the local run found nothing: the comparison would prove nothing"
    assert findings["cluster"] == findings["local"]
    state = cluster_state(ray_cluster.ray_address)
    segment = engine_actors(state, "SegmentSeries")
    assert segment, f"no CT engine actor in the cluster's actor table: {[a['cls'] for a in state['actors']]}"
    assert {a["node"] for a in segment} <= engine_nodes(state), "a CT engine actor ran on the head node"


def _rows(table: pa.Table) -> list[tuple]:
    table = table.select(sorted(set(table.column_names) - RUN_COLUMNS))
    out = []
    for r in table.to_pylist():
        out.append(tuple((k, round(v, 4) if isinstance(v, float) else v) for k, v in sorted(r.items())))
    return sorted(out, key=repr)


def _staged_done(lake: Path) -> list[Path]:
    return list((lake / "scores" / "model=emr_risk").glob(".staging-*/_work/*.done.json"))


def _score_actor_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if b"ScoreActor" in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _node_of(pid: int, nodes: dict[str, int]) -> str | None:
    """The daemon (name in NODES) whose process tree holds PID: its ray start → raylet → worker."""
    by_pid = {v: k for k, v in nodes.items()}
    while pid > 1:
        if pid in by_pid:
            return by_pid[pid]
        try:
            pid = int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return None
    return None


def test_worker_node_killed_mid_run_is_survived(emr_setup, emr_local, ray_cluster, tmp_path_factory):
    """Runs last in this module: it leaves the cluster one worker node short."""
    # Small fragments, so the node dies with most of them still to score.
    lake = emr_lake(tmp_path_factory, emr_setup, "ray_emr_node_killed", files=24)
    env = cluster_env(emr_setup["key_file"], **emr_setup["settings"], MEDSCREEN_RAY__ACTOR_RESOURCES=ENGINE_SLOT)
    run = medscreen(env, "score", "emr", "--lake", str(lake), "--as-of", AS_OF, "--run-id", "node-killed",
                    "--ray-address", ray_cluster.ray_address)
    killed, deadline = None, time.monotonic() + 600
    while killed is None:
        assert run.poll() is None, f"the run ended before a node was killed: {run.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline, "no fragment finished within 600 s"
        if _staged_done(lake):
            for pid in _score_actor_pids():
                name = _node_of(pid, {k: v for k, v in ray_cluster.pids.items() if k.startswith("ray-worker")})
                if name:
                    # The whole node at once: its raylet and everything under it, then the actor.
                    os.killpg(ray_cluster.pids[name], signal.SIGKILL)
                    os.kill(pid, signal.SIGKILL) if Path(f"/proc/{pid}").exists() else None
                    killed = name
                    break
        time.sleep(0.05)
    assert len(_staged_done(lake)) < 24, "killed after every fragment was done: nothing was left to survive"
    run_dir = finish(run)
    # Other fragments, other batches (padding per length bucket): equal to float32 rounding.
    assert_same_scores(scores(lake), emr_local["scores"], rtol=1e-5)
    assert ledger(run_dir, "score_emr")["records_out"] == 1200
    state = cluster_state(ray_cluster.ray_address)
    alive_engine_nodes = {n["node"] for n in state["nodes"] if n["alive"]} & engine_nodes(state)
    assert len(alive_engine_nodes) == 1, "the killed worker node is still alive"
