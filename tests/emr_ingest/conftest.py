"""EMR ingest fixtures: the hand-written exports, a parse context, and ingested lakes (once per session)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from emr_ingest_support import FIXTURES, INGEST_KEY, make_ctx, read_lake_table

from conf.settings import load_settings
from preprocessing.emr_record import ParseContext


@pytest.fixture(scope="session")
def ctx() -> ParseContext:
    return make_ctx()


def _ingest(spark, tmp_path_factory, fmt: str, input_dir: Path, runs: int = 1) -> dict[str, Any]:
    from jobs import emr_ingest

    lake = tmp_path_factory.mktemp(f"emr_lake_{fmt}")
    out: dict[str, Any] = {"lake": lake, "summaries": [], "tables": []}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", INGEST_KEY)
        settings = load_settings({"lake.root": str(lake), "spark.master": "local[2]",
                                  "spark.shuffle_partitions": 2})
        for _ in range(runs):
            out["summaries"].append(emr_ingest.run(settings, input_dir, fmt))
            out["tables"].append({name: read_lake_table(lake / "emr" / name)
                                  for name in ("events", "patients", "quarantine")})
    out["settings"] = settings
    return out


@pytest.fixture(scope="session")
def fhir_ingest(spark, tmp_path_factory) -> dict[str, Any]:
    """The hand-written FHIR export ingested twice into one lake (the second run replaces)."""
    return _ingest(spark, tmp_path_factory, "fhir", FIXTURES / "fhir", runs=2)


@pytest.fixture(scope="session")
def omop_ingest(spark, tmp_path_factory) -> dict[str, Any]:
    return _ingest(spark, tmp_path_factory, "omop", FIXTURES / "omop")
