"""DICOM index (Spark, headers only): raw DICOM folders → LAKE/imaging/{instances,series,quarantine}.

Spark distributes file paths; each task reads headers only (pixel data is
skipped, though its byte length is checked) and pseudonymises every UID and
patient id before a row exists. File paths are stored relative to the
archive root (the input folder) with every component keyed (lake.archive):
folder names often carry patient names or MRNs. Executors read the key from
its file (lake.keys.KeyFile), never from the task closure. Header values
that can name a person or place (names, accession numbers, institution,
descriptions, free text) are never read into a row. Instances are grouped
by ``series_key`` and each series gets a geometry summary and a verdict:
``eligible`` or a reason code (not_ct, localizer, too_few_slices,
inconsistent_orientation, inconsistent_size, missing_slices, gantry_tilt,
undecodable_pixels, …).
Exactly one pixel frame per series (the middle slice) is decoded to prove the
series can be read.

Ledger (LAKE/runs/<run_id>/ledger.json): files in = instances indexed +
files quarantined; series in = eligible + rejected with a reason. The three
tables are staged, the ledger checked, then each is committed atomically; a
rerun replaces them.

Run as ``medscreen dicom index --input DIR --lake LAKE`` or
``spark-submit jobs/dicom_index.py --input DIR --lake LAKE``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from conf.settings import Settings, load_settings
from lake.commit import commit_set, staging_dir
from lake.archive import PATH_SCHEME
from lake.files import write_json_atomic
from lake.keys import KeyFile, bind_lake, executor_key_file, key_relative_path, mrn_key, pseudonymise
from lake.ledger import StageLedger, write_ledger
from lake.paths import LakePaths
from lake.runs import new_run_id
from lake.schemas import DICOM_INSTANCES, DICOM_QUARANTINE, DICOM_SERIES
from preprocessing.dicom_header import ELIGIBLE, judge_series, read_instance_header

log = logging.getLogger(__name__)

STAGE = "dicom_index"
STAGE_FILES = f"{STAGE}.files"
STAGE_SERIES = f"{STAGE}.series"
# Verdict for a series whose headers break the judging code itself (never expected; counted, not fatal).
REASON_INVALID_HEADERS = "invalid_headers"
# Instance columns that travel from header reading to the series verdict.
# ``source_path`` (the file as found) stays inside the job: the tables get the keyed ``path``.
_HEADER_COLUMNS = [f.name for f in DICOM_INSTANCES] + ["quarantine", "detail", "source_path"]


def list_input_files(input_dir: Path) -> list[str]:
    """Every regular file under ``input_dir`` (sorted, so partitions and reruns are stable)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"DICOM input {input_dir} is not a directory; pass --input DIR "
                                "or set MEDSCREEN_INPUTS__DICOM_DIR")
    out = []
    for root, dirs, files in os.walk(input_dir):
        dirs.sort()
        out.extend(os.path.join(root, f) for f in sorted(files))
    return out


def _row_schema():
    return from_arrow_schema(DICOM_INSTANCES.append(pa.field("quarantine", pa.string()))
                             .append(pa.field("detail", pa.string()))
                             .append(pa.field("source_path", pa.string())))


def keyed_path(key: bytes, archive_root: str, path: str) -> str:
    """``path`` relative to ``archive_root``, every component keyed (what the imaging tables store)."""
    return key_relative_path(key, os.path.relpath(path, archive_root).replace(os.sep, "/"))


def _scrubbed(detail: str | None, raw: str, keyed: str) -> str | None:
    # A decoder's message may quote the file it failed on.
    if not detail:
        return detail
    return detail.replace(raw, keyed).replace(os.path.basename(raw), keyed.rsplit("/", 1)[-1])


def header_rows(paths: Iterator[str], key_file: KeyFile, archive_root: str) -> Iterator[tuple[Any, ...]]:
    """Read each file's header and yield one pseudonymised row (instance or quarantine) per file."""
    key = key_file.load()
    for p in paths:
        h = read_instance_header(p)
        keyed = keyed_path(key, archive_root, p)
        if "quarantine" in h:
            row = {"path": keyed, "file_size_bytes": h.get("file_size_bytes"),
                   "quarantine": h["quarantine"], "detail": _scrubbed(h["detail"], p, keyed)}
        else:
            row = dict(h, path=keyed)
            # Raw identifiers end here: only their keyed hashes go on.
            row["series_key"] = pseudonymise(key, row.pop("series_uid"))
            row["study_key"] = pseudonymise(key, row.pop("study_uid"))
            row["sop_key"] = pseudonymise(key, row.pop("sop_uid"))
            pid = row.pop("patient_id")
            # PatientID is an MRN: keyed with the EMR side's helper so imaging_link can join them.
            row["mrn_key"] = mrn_key(key, pid) if pid.strip() else None
            row["quarantine"], row["detail"] = None, None
        row["source_path"] = p
        yield tuple(row.get(c) for c in _HEADER_COLUMNS)


def judge_rows(rows: Iterator[tuple[Any, ...]], min_slices: int, gantry_tilt: str,
               run_id: str) -> tuple[Any, ...]:
    """The series-table row for one series' header rows (tuples in _HEADER_COLUMNS order)."""
    records = [dict(zip(_HEADER_COLUMNS, r)) for r in rows]
    # Judging decodes one slice, so it sees the files as found; the row gets the keyed paths.
    keyed = {r["source_path"]: r["path"] for r in records}
    found = [dict(r, path=r["source_path"]) for r in records]
    try:
        s = judge_series(found, min_slices=min_slices, gantry_tilt=gantry_tilt)
    except Exception as exc:  # a header combination no rule foresaw: reject the series, keep the run
        s = {"slice_count": len(records), "paths": sorted(str(r["path"]) for r in found),
             "verdict": REASON_INVALID_HEADERS, "detail": f"{type(exc).__name__} while judging the series"}
    for raw in s["paths"]:
        s["detail"] = _scrubbed(s["detail"], raw, keyed[raw])
    s["paths"] = [keyed[raw] for raw in s["paths"]]
    first = records[0]
    s.update(series_key=first["series_key"], study_key=first["study_key"], mrn_key=first["mrn_key"],
             eligible=s["verdict"] == ELIGIBLE, detail=s["detail"] or None, run_id=run_id)
    return tuple(s.get(c) for c in DICOM_SERIES.names)


def index_frames(spark: SparkSession, files: list[str], key_file: KeyFile, settings: Settings,
                 run_id: str, archive_root: str) -> tuple[DataFrame, DataFrame, DataFrame, Any]:
    """(instances, series, quarantine, header-row RDD) for ``files``; nothing is written.

    Header rows are persisted so every file is read once; unpersist the RDD when done.
    Grouping stays in the RDD API so the same Python workers that read headers
    judge series (no Arrow/pandas round trip for a handful of rows per series).
    """
    n_parts = max(2, min(len(files) // 256 + 1, 512))
    rows = spark.sparkContext.parallelize(files, n_parts).mapPartitions(lambda it: header_rows(it, key_file, archive_root)).persist()
    frame = spark.createDataFrame(rows, _row_schema())
    instances = frame.filter(F.col("quarantine").isNull()).select(*DICOM_INSTANCES.names)
    quarantine = (frame.filter(F.col("quarantine").isNotNull())
                  .withColumn("reason", F.col("quarantine")).withColumn("run_id", F.lit(run_id))
                  .select(*DICOM_QUARANTINE.names))
    q_at, k_at = _HEADER_COLUMNS.index("quarantine"), _HEADER_COLUMNS.index("series_key")
    min_slices, tilt = settings.imaging.min_slices, settings.imaging.gantry_tilt
    series_rdd = (rows.filter(lambda r: r[q_at] is None).map(lambda r: (r[k_at], r))
                  .groupByKey(settings.spark.shuffle_partitions)
                  .map(lambda kv: judge_rows(kv[1], min_slices, tilt, run_id)))
    series = spark.createDataFrame(series_rdd, from_arrow_schema(DICOM_SERIES))
    return instances, series, quarantine, rows


def _write(df: DataFrame, final: Path, n_files: int, sort_cols: list[str]) -> Path:
    staging = staging_dir(final)
    # One file: coalesce (no shuffle); several: hash-partition so reruns split rows the same way.
    shaped = df.coalesce(1) if n_files == 1 else df.repartition(n_files, sort_cols[0])
    (shaped.sortWithinPartitions(*sort_cols).write.mode("overwrite").parquet(str(staging)))
    # Spark's own markers/checksums would confuse readers that glob the partition.
    for p in list(staging.iterdir()):
        if p.name.endswith(".crc") or p.name == "_SUCCESS":
            p.unlink()
    return staging


def _dataset(path: Path) -> ds.Dataset:
    return ds.dataset(sorted(str(p) for p in Path(path).glob("*.parquet")), format="parquet")


def _value_counts(path: Path, column: str) -> dict[str, int]:
    counts = pc.value_counts(_dataset(path).to_table(columns=[column]).column(column))
    return {str(c["values"]): int(c["counts"]) for c in counts.to_pylist()}


def run(settings: Settings, input_dir: Path, run_id: str | None = None,
        spark: SparkSession | None = None) -> dict[str, Any]:
    """Index ``input_dir`` into the lake; return a summary with counts and the ledger.

    Raises LedgerImbalance (after writing the ledger, before committing any
    table) when files or series are unaccounted for.
    """
    from jobs.spark_session import get_spark

    key_file = executor_key_file(settings.pseudonym)
    bind_lake(settings.lake.root, key_file.fingerprint)
    archive_root = str(Path(input_dir).resolve())
    files = list_input_files(Path(archive_root))
    run_id = run_id or new_run_id(STAGE)
    paths = LakePaths(settings.lake.root)
    spark = spark or get_spark(settings.spark, f"medscreen-{STAGE}")
    instances, series, quarantine, rows = index_frames(spark, files, key_file, settings, run_id,
                                                      archive_root)
    stagings: dict[str, Path] = {}
    try:
        stagings["series"] = _write(series, paths.dicom_series, 1, ["series_key"])
        stagings["instances"] = _write(instances, paths.dicom_instances,
                                       max(1, settings.spark.shuffle_partitions), ["series_key", "path"])
        stagings["quarantine"] = _write(quarantine, paths.imaging_quarantine, 1, ["path"])
        # Count what was written (staged files, read back) so the ledger checks the outputs
        # themselves; column reads through Arrow avoid more Spark jobs for a few numbers.
        n_instances = _dataset(stagings["instances"]).count_rows()
        q_counts = _value_counts(stagings["quarantine"], "reason")
        v_counts = _value_counts(stagings["series"], "verdict")
        n_series_in = len(pc.unique(_dataset(stagings["instances"]).to_table(columns=["series_key"])
                                    .column("series_key")))
        files_ledger = StageLedger(STAGE_FILES, records_in=len(files), records_out=int(n_instances),
                                   quarantined=q_counts, unit="files")
        series_ledger = StageLedger(STAGE_SERIES, records_in=int(n_series_in),
                                    records_out=v_counts.get(ELIGIBLE, 0),
                                    quarantined={k: v for k, v in v_counts.items() if k != ELIGIBLE},
                                    unit="series")
        run_dir = paths.run(run_id)
        ledger_path = write_ledger(run_dir, files_ledger, series_ledger)
        files_ledger.check()
        series_ledger.check()
        manifest = {"run_id": run_id, "stage": "dicom_index", "input_dir": str(input_dir),
                    "archive_root": archive_root, "path_scheme": PATH_SCHEME,
                    "key_fingerprint": key_file.fingerprint,
                    "files": len(files), "instances": int(n_instances),
                    "series": int(n_series_in), "eligible_series": v_counts.get(ELIGIBLE, 0),
                    "gantry_tilt": settings.imaging.gantry_tilt, "min_slices": settings.imaging.min_slices}
        # One set: a reader gets the series, instances and quarantine of one index run together.
        commit_set({paths.dicom_series: stagings["series"], paths.dicom_instances: stagings["instances"],
                    paths.imaging_quarantine: stagings["quarantine"]}, "dicom_index", manifest, run_id=run_id)
        stagings.clear()
    finally:
        rows.unpersist()
        for p in stagings.values():
            shutil.rmtree(p, ignore_errors=True)
    write_json_atomic(run_dir / "manifest.json", manifest)
    summary = {"run_id": run_id, "counts": {"files": len(files), "instances": int(n_instances),
                                            "quarantined_files": q_counts, "series": int(n_series_in),
                                            "series_verdicts": v_counts},
               "ledger": str(ledger_path), "series_table": str(paths.dicom_series)}
    log.info("dicom index %s: %d files, %d instances, %d series (%d eligible)", run_id, len(files),
             n_instances, n_series_in, v_counts.get(ELIGIBLE, 0))
    return summary


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point: ``--input DIR --lake LAKE [--run-id ID]``."""
    p = argparse.ArgumentParser(prog="dicom_index", description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, help="DICOM folder (default: inputs.dicom_dir)")
    p.add_argument("--lake", help="lake root (default: lake.root)")
    p.add_argument("--run-id")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings({"lake.root": args.lake, "inputs.dicom_dir": args.input})
    if settings.inputs.dicom_dir is None:
        raise SystemExit("dicom_index: no input; pass --input DIR or set MEDSCREEN_INPUTS__DICOM_DIR")
    summary = run(settings, Path(settings.inputs.dicom_dir), run_id=args.run_id)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
