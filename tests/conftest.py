"""Shared fixtures: a throwaway lake, a pseudonym key, one local Spark session, one local Ray.

Area fixtures live in tests/<area>/conftest.py.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conf.settings import Settings, load_settings

TEST_KEY = "test-pseudonym-key-not-for-production-0001"


@pytest.fixture(scope="session", autouse=True)
def _session_pseudonym_key() -> str:
    """The test key for module- and session-scoped fixtures too: every stage checks the key at entry."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", TEST_KEY)
        yield TEST_KEY


@pytest.fixture(autouse=True)
def _pseudonym_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture
def lake_root(tmp_path: Path) -> Path:
    root = tmp_path / "lake"
    root.mkdir()
    return root


@pytest.fixture
def make_settings(lake_root: Path):
    """Factory: settings on a fresh lake, with dotted overrides (``{"features.max_tokens": 64}``)."""

    def _make(**overrides) -> Settings:
        merged = {"lake.root": str(lake_root), "spark.master": "local[2]",
                  "spark.shuffle_partitions": 2}
        merged.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_settings(merged)

    return _make


@pytest.fixture(scope="session")
def spark():
    """One local[2] SparkSession for the whole test run (JVM start-up is the expensive part)."""
    from conf.settings import SparkSettings
    from jobs.spark_session import get_spark

    session = get_spark(SparkSettings(master="local[2]", shuffle_partitions=2, driver_memory="2g"),
                        "medscreen-tests")
    yield session
    session.stop()


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance (2 CPUs) for the whole test run."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()
