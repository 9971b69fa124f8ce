"""Engines fixtures: one small labelled timelines partition (real Parquet, committed) and settings on it.

Labels come from the committed model's own fp32 scores (top 30 % per head,
10 % flipped), so the reference has a real, non-trivial AUC to lose and a
broken candidate visibly loses it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.settings import Settings, load_settings
from lake.commit import atomic_partition
from lake.paths import LakePaths
from lake.schemas import LABEL_COLUMNS, PREVALENT_COLUMNS, TIMELINES_WITH_LABELS
from preprocessing.eligibility import ENCOUNTER_ID

AS_OF = "2024-06-30"
ROWS = 800


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run on the GPU machine (`pytest -m gpu`); without a GPU they are deselected here."""
    from engines.hardware import gpu_info

    if "gpu" in (config.getoption("markexpr") or "") or gpu_info() is not None:
        return
    here = Path(__file__).parent
    gpu = [i for i in items if i.get_closest_marker("gpu") and here in Path(str(i.fspath)).parents]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if i not in gpu]


def _timelines(vocab_size: int, rng: np.random.Generator) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("patient_key", "length", "tokens", "days_before",
                                             "age_years", "sex")}
    for i in range(ROWS):
        # Mostly short timelines, a long tail, and a few empty ones (new patients).
        n = 0 if i % 97 == 0 else int(min(200, rng.geometric(1 / 30)))
        days = np.sort(rng.integers(0, 1825, n))[::-1]
        cols["patient_key"].append(hashlib.sha256(f"test-patient-{i}".encode()).hexdigest()[:32])
        cols["length"].append(n)
        cols["tokens"].append(rng.integers(1, vocab_size, n).astype(int).tolist())
        cols["days_before"].append(days.astype(int).tolist())
        cols["age_years"].append(float(rng.uniform(18, 95)))
        cols["sex"].append(["F", "M", "U"][int(rng.choice(3, p=[0.48, 0.48, 0.04]))])
    return cols


@pytest.fixture(scope="session")
def engines_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engines import samples
    from engines.model_card import load_card
    from engines.ort_runner import OrtRunner

    root = tmp_path_factory.mktemp("engines") / "lake"
    card = load_card(load_settings({"lake.root": str(root)}), "emr_risk")
    rng = np.random.default_rng(11)
    cols = _timelines(int(card["vocab"]["size"]), rng)
    table = pa.table({k: cols[k] for k in cols})
    with OrtRunner(Path(card["onnx"]["file"]), providers=["CPUExecutionProvider"]) as ref:
        probs = np.zeros((ROWS, 3), np.float32)
        for idx, feed in samples.feed_batches(table, 256, 128):
            probs[idx] = ref.infer(feed)["probs"]
    labels = probs > np.quantile(probs, 0.7, axis=0)
    labels ^= rng.random(labels.shape) < 0.1
    data = {**cols, "as_of": [dt.date.fromisoformat(AS_OF)] * ROWS, **{c: [False] * ROWS for c in PREVALENT_COLUMNS},
            "encounters": [sum(1 for t in toks if t == ENCOUNTER_ID) for toks in cols["tokens"]]}
    for j, c in enumerate(LABEL_COLUMNS):
        data[c] = labels[:, j].astype(np.int8).tolist()
    table = pa.Table.from_pydict({f.name: data[f.name] for f in TIMELINES_WITH_LABELS},
                                 schema=TIMELINES_WITH_LABELS)
    with atomic_partition(LakePaths(root).timelines(AS_OF), {"rows": ROWS}) as staging:
        pq.write_table(table, staging / "part-00000.parquet")
    return root


@pytest.fixture(scope="session")
def engines_settings(engines_lake: Path):
    """Factory: settings on the shared engines lake, with a cache dir of the test's choosing."""

    def _make(cache_dir: Path, **overrides) -> Settings:
        merged = {"lake.root": str(engines_lake), "engines.cache_dir": str(cache_dir),
                  "engines.calibration_rows": 200}
        merged.update({k.replace("__", "."): v for k, v in overrides.items()})
        return load_settings(merged)

    return _make


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One engine cache for tests that only read engines, so each plan is built once per session."""
    return tmp_path_factory.mktemp("engine-cache")
