"""Shared by the cluster tests (a uniquely named module: every area has a conftest.py): the
launcher that `make cluster` uses, and the environment a CLI child runs with."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
TEST_KEY = "test-pseudonym-key-not-for-production-0001"  # tests/conftest.py's key: pseudonyms join


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


local_cluster = _load("local_cluster", REPO / "deploy" / "local_cluster.py")


def daemon_env() -> dict[str, str]:
    env = local_cluster.daemon_env()
    # Executors and Ray workers import this checkout's modules, as the driver does.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def cluster_env(key_file: Path, **settings: str) -> dict[str, str]:
    """A CLI child's environment: the key only as a 0600 file (executors on the cluster read it there),
    this checkout first on the path, MEDSCREEN_* settings given as NAME=value."""
    env = {k: v for k, v in os.environ.items() if k not in ("MEDSCREEN_PSEUDONYM_KEY", "RAY_ADDRESS")}
    env["MEDSCREEN_PSEUDONYM__KEY_FILE"] = str(key_file)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["RAY_AUTH_MODE"] = "disabled"
    env.update(settings)
    return env
