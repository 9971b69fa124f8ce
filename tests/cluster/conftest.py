"""Cluster fixtures: a Spark standalone cluster and a Ray cluster, each started once per test session
with deploy/local_cluster.py (what `make cluster` runs) and always stopped at the end.

The daemons are separate processes in process groups of their own; the CLI under test runs in
child processes pointed at them, as a user's would be.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from cluster_support import TEST_KEY, daemon_env, local_cluster


@pytest.fixture(scope="session")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cluster_key") / "pseudonym.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    with os.fdopen(fd, "w") as f:
        f.write(TEST_KEY)
    return path


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A standalone master and one worker (2 cores, 1 GiB for executors) on 127.0.0.1."""
    state = tmp_path_factory.mktemp("spark_cluster")
    info = local_cluster.ClusterInfo(state_dir=str(state))
    try:
        local_cluster.start_spark(state, info, daemon_env(), workers=1, worker_cores=2, worker_memory="1g")
        yield info
    finally:
        local_cluster.stop(state)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Ray head (1 CPU, no engine resource) and two worker nodes that offer the engine resource."""
    state = tmp_path_factory.mktemp("ray_cluster")
    info = local_cluster.ClusterInfo(state_dir=str(state))
    env = daemon_env()
    try:
        local_cluster.start_ray_head(state, info, env, head_cpus=1)
        for name in ("ray-worker-1", "ray-worker-2"):
            local_cluster.start_ray_worker(state, info, env, name, cpus=1, engine_slots=1)
        yield info
    finally:
        local_cluster.stop(state)
