"""Reading the DICOM index tables (LAKE/imaging/series) without Spark."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds

from lake.commit import is_committed, partition_files
from lake.paths import LakePaths
from lake.schemas import DICOM_SERIES


def read_series_table(lake_root: Path, eligible_only: bool = False) -> pa.Table:
    """The committed series table (manifest and markers skipped); FileNotFoundError if not built."""
    path = LakePaths(lake_root).dicom_series
    if not is_committed(path):
        raise FileNotFoundError(f"no committed DICOM series index at {path}; run "
                                "`medscreen dicom index --input DIR --lake LAKE` first")
    files = [str(p) for p in partition_files(path)]  # one version, resolved once
    table = ds.dataset(files, format="parquet", schema=DICOM_SERIES).to_table()
    if eligible_only:
        table = table.filter(ds.field("eligible"))
    return table


def series_record(lake_root: Path, series_key: str) -> dict:
    """One series' row as a dict; ValueError naming the key when the index has no such series."""
    table = read_series_table(lake_root).filter(ds.field("series_key") == series_key)
    if table.num_rows == 0:
        raise ValueError(f"series_key {series_key!r} is not in the DICOM index; list keys with "
                         "`medscreen dicom list --lake LAKE`")
    return table.to_pylist()[0]
