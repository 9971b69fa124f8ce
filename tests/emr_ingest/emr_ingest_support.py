"""Helpers shared by the EMR ingest tests (a uniquely named module: every area has a conftest.py)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

import pytest

from conf.settings import ExtractionSettings, load_settings
from preprocessing.code_groups import load_code_groups
from preprocessing.emr_record import ParseContext, parse_datetime_us
from preprocessing.notes import NoteExtractor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "emr"
INGEST_KEY = "emr-ingest-tests-key-0001-not-secret"
# The fixtures' export time (FHIR manifest.json transactionTime / OMOP cdm_source).
EXPORT_US = parse_datetime_us("2023-12-31T23:00:00Z")


def make_ctx(key: str = INGEST_KEY, **extraction: Any) -> ParseContext:
    ex = ExtractionSettings(**extraction)
    return ParseContext(key=key.encode(), extractor=NoteExtractor.from_settings(ex),
                        groups=load_code_groups(ex.code_groups_file), now_us=EXPORT_US)


def read_lake_table(path: Path) -> pa.Table:
    """All Parquet files of a committed lake table, as one Arrow table."""
    files = sorted(p for p in Path(path).glob("*.parquet"))
    assert files, f"no parquet files in {path}"
    return pa.concat_tables([pq.read_table(f) for f in files])


def sorted_rows(table: pa.Table) -> list[tuple]:
    rows = [tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in r.items())
            for r in table.to_pylist()]
    return sorted(rows, key=repr)


def ingest(spark, tmp_path_factory, fmt: str, input_dir: Path, runs: int = 1) -> dict[str, Any]:
    """Run the ingest ``runs`` times into a fresh lake; keep each run's summary and tables."""
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
                                  for name in ("events", "patients", "quarantine", "observation_periods")})
    out["settings"] = settings
    return out
