"""A non-reference engine through the engine cache: fp16 ONNX, Dice-gated, then scored."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conf.settings import load_settings
from lake.paths import LakePaths

AS_OF = "2024-06-30"
KEY = b"ct-score-fp16-key-0001"


def test_fp16_engine_is_gated_and_finds_the_nodule(tiny_ct, series_index_writer, ray_local, tmp_path):
    from engines import cache
    from inference import ct

    lake_root = tmp_path / "lake"
    series_index_writer(lake_root, KEY, tiny_ct["rows"][:1])
    settings = load_settings({"lake.root": str(lake_root), "engines.precision": "fp16"})
    # Nothing built yet: the cache refuses rather than scoring with an unknown engine.
    with pytest.raises(cache.EngineCacheError, match="engines ensure"):
        ct.score(settings, AS_OF)
    plan = cache.ensure(settings, "ct_nodule", "onnxruntime", "fp16")
    meta = cache.read_metadata(plan)
    assert meta["gate"]["passed"] is True and "delta_dice" in meta["gate"]["metrics"]

    run_dir = ct.score(settings, AS_OF)
    part = LakePaths(lake_root).findings("ct_nodule", AS_OF)
    rows = pq.read_table([str(p) for p in part.glob("*.parquet")], partitioning=None).to_pylist()
    truth = np.array(tiny_ct["with_nodule"]["nodules"][0]["centre_lps_mm"])
    assert rows and all(r["precision"] == "fp16" and r["engine_fingerprint"] == meta["fingerprint"] for r in rows)
    assert min(np.linalg.norm(np.array([r["centre_x_mm"], r["centre_y_mm"], r["centre_z_mm"]]) - truth)
               for r in rows) <= 5.0
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["precisions"] == ["fp16"] and manifest["engine_fingerprints"] == [meta["fingerprint"]]
