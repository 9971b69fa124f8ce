"""Reading LAKE/imaging/patient_link (written by jobs/imaging_link) for the stages that need
the EMR patient of a CT series: CT scoring (findings.patient_key) and the worklist."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lake.commit import is_committed, read_manifest
from lake.paths import LakePaths
from lake.schemas import IMAGING_LINK, LINK_NO_MRN


class StaleLinkError(RuntimeError):
    """The link table was built from other series or patients partitions than the committed ones."""


def _run_id(path: Path) -> str | None:
    return read_manifest(path).get("run_id") if is_committed(path) else None


def read_link(lake: LakePaths) -> pa.Table:
    """The committed link table (schema IMAGING_LINK), checked against the committed inputs.

    Raises FileNotFoundError when it was never built, StaleLinkError when the series index
    or the EMR patients were rebuilt since; both name the command that fixes it.
    """
    path = lake.imaging_link
    if not is_committed(path):
        raise FileNotFoundError(f"the imaging ↔ EMR patient link {path} is not committed; run "
                                "`medscreen dicom link` (the imaging_link task) after the EMR ingest "
                                "and the DICOM index")
    inputs = read_manifest(path).get("inputs", {})
    for name, table_path in (("series", lake.dicom_series), ("patients", lake.patients)):
        built_from = (inputs.get(name) or {}).get("run_id")
        if built_from != _run_id(table_path):
            raise StaleLinkError(f"the imaging ↔ EMR patient link was built from another {name} "
                                 f"partition (run {built_from}) than the committed one "
                                 f"({_run_id(table_path)}); rerun `medscreen dicom link`")
    files = sorted(str(p) for p in path.glob("*.parquet"))
    if not files:
        return IMAGING_LINK.empty_table()
    return pq.read_table(files, schema=IMAGING_LINK, partitioning=None)


def attach_patients(series: pa.Table, link: pa.Table) -> pa.Table:
    """``series`` (with ``series_key``) plus the link's ``patient_key`` and ``link_status``.

    A series missing from the link (never expected: the link covers the whole index) is
    counted as ``no_patient_id`` rather than dropped.
    """
    index = pc.index_in(series.column("series_key"), value_set=link.column("series_key"))
    keys = pc.take(link.column("patient_key"), index)
    status = pc.fill_null(pc.take(link.column("link_status"), index), LINK_NO_MRN)
    out = series
    for name, col in (("patient_key", keys), ("link_status", status)):
        if name in out.column_names:
            out = out.drop_columns([name])
        out = out.append_column(name, col)
    return out


def link_counts(table: pa.Table) -> dict[str, int]:
    """Series per link status (``linked`` and each unlinked reason) in a table from attach_patients."""
    counts = pc.value_counts(table.column("link_status")).to_pylist() if table.num_rows else []
    return {str(c["values"]): int(c["counts"]) for c in sorted(counts, key=lambda c: str(c["values"]))}
