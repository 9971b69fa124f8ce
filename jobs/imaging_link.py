"""Imaging ↔ EMR patient link (Spark): LAKE/imaging/series + LAKE/emr/patients → LAKE/imaging/patient_link.

DICOM series carry the keyed hash of ``PatientID`` (an MRN) as ``mrn_key``;
EMR patients carry the keyed hash of their MRN (FHIR identifier of type MR,
OMOP ``person_source_value``) under the same name, made by the same helper
(lake.keys.mrn_key). This job joins the two: one row per series of the index
with the EMR ``patient_key`` when exactly one EMR patient carries the series'
MRN. Unlinked series keep their row, with ``patient_key`` NULL and the reason
in ``link_status`` (``no_patient_id``, ``mrn_not_in_emr``, ``ambiguous_mrn``).

Ledger ``imaging_link``: series in = linked + unlinked by reason (ignored by
rule: not carried to a patient, still counted and still in the table).
``imaging_link.table``: series in = rows written. The manifest names the
series and patients partitions (run ids) it was built from; CT scoring
refuses a link built from other ones.

Run after both ``emr_ingest`` and ``dicom_index``:
``medscreen dicom link --lake LAKE`` or ``spark-submit jobs/imaging_link.py --lake LAKE``.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from conf.settings import Settings, load_settings
from lake.commit import commit, read_manifest, staging_dir
from lake.files import write_json_atomic
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.ledger import LedgerImbalance, StageLedger, write_ledger
from lake.paths import LakePaths
from lake.runs import new_run_id
from lake.schemas import (DICOM_SERIES, IMAGING_LINK, LINK_AMBIGUOUS, LINK_LINKED, LINK_NO_MRN,
                          LINK_NOT_IN_EMR, LINK_STATUSES, PATIENTS)

log = logging.getLogger(__name__)

STAGE = "imaging_link"
TABLE_STAGE = "imaging_link.table"


def link_frame(series: DataFrame, patients: DataFrame) -> DataFrame:
    """One IMAGING_LINK row per series row: the EMR patient_key of the series' MRN, or a reason.

    An MRN carried by two EMR patients links to neither (``ambiguous_mrn``): a finding must
    never reach the wrong patient's worklist row.
    """
    emr = (patients.filter(F.col("mrn_key").isNotNull() & F.col("patient_key").isNotNull())
           .groupBy("mrn_key")
           .agg(F.countDistinct("patient_key").alias("n_patients"), F.min("patient_key").alias("emr_key")))
    joined = series.select("series_key", "study_key", "mrn_key").join(emr, "mrn_key", "left")
    status = (F.when(F.col("mrn_key").isNull(), F.lit(LINK_NO_MRN))
              .when(F.col("n_patients").isNull(), F.lit(LINK_NOT_IN_EMR))
              .when(F.col("n_patients") > 1, F.lit(LINK_AMBIGUOUS))
              .otherwise(F.lit(LINK_LINKED)))
    return (joined.withColumn("link_status", status)
            .withColumn("patient_key", F.when(F.col("link_status") == LINK_LINKED, F.col("emr_key")))
            .select(*IMAGING_LINK.names))


def _committed(path: Path, what: str, fix: str) -> dict[str, Any]:
    try:
        return read_manifest(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} is not committed; run {fix} first") from None


def _read(spark: Any, path: Path, schema: Any) -> DataFrame:
    return (spark.read.schema(from_arrow_schema(schema)).option("pathGlobFilter", "*.parquet")
            .parquet(str(path)))


def run(settings: Settings, run_id: str | None = None) -> dict[str, Any]:
    """Build LAKE/imaging/patient_link from the committed series index and EMR patients.

    Writes the table atomically (a rerun replaces it) and LAKE/runs/<run_id>/{ledger,manifest}.json;
    raises LedgerImbalance (nothing committed) when a series is unaccounted for. Returns a summary
    with the linked count and the unlinked counts by reason.
    """
    from jobs.spark_session import get_spark

    paths = LakePaths(settings.lake.root)
    series_manifest = _committed(paths.dicom_series, "the DICOM series index",
                                 "`medscreen dicom index` (the dicom_index task)")
    patients_manifest = _committed(paths.patients, "the EMR patients table",
                                   "`medscreen emr ingest` (the emr_ingest task)")
    key_fp = stage_key_fingerprint(settings.pseudonym, paths.root,
                                   {"imaging/series": series_manifest, "emr/patients": patients_manifest})
    run_id = run_id or new_run_id(STAGE)
    run_dir = paths.run(run_id)
    spark = get_spark(settings.spark, f"medscreen-{STAGE}")
    series = _read(spark, paths.dicom_series, DICOM_SERIES)
    patients = _read(spark, paths.patients, PATIENTS)
    staging = staging_dir(paths.imaging_link)
    try:
        (link_frame(series, patients).coalesce(1).sortWithinPartitions("series_key")
         .write.mode("overwrite").parquet(str(staging)))
        for p in list(staging.iterdir()):
            if p.name.endswith(".crc") or p.name == "_SUCCESS":
                p.unlink()
        files = sorted(staging.glob("*.parquet"))
        for i, p in enumerate(files):
            p.rename(staging / f"part-{i:05d}.parquet")
        written = pq.read_table([str(f) for f in sorted(staging.glob("*.parquet"))],
                                columns=["link_status"]).column("link_status").to_pylist()
        counts = {s: written.count(s) for s in LINK_STATUSES if written.count(s)}
        n_series = series.count()
        ledger = StageLedger(STAGE, records_in=n_series, records_out=counts.get(LINK_LINKED, 0),
                             ignored={s: n for s, n in counts.items() if s != LINK_LINKED}, unit="series")
        table_ledger = StageLedger(TABLE_STAGE, records_in=n_series, records_out=len(written), unit="series")
        write_ledger(run_dir, ledger, table_ledger)
        ledger.check()
        table_ledger.check()
        manifest = {"stage": STAGE, "run_id": run_id,
                    "inputs": {"series": {"run_id": series_manifest.get("run_id")},
                               "patients": {"run_id": patients_manifest.get("run_id")}},
                    "series": n_series, "linked": counts.get(LINK_LINKED, 0),
                    "unlinked": {s: n for s, n in counts.items() if s != LINK_LINKED}, KEY_FIELD: key_fp}
        commit(staging, paths.imaging_link, manifest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    write_json_atomic(run_dir / "manifest.json", {**manifest, "output": str(paths.imaging_link)})
    log.info("imaging link %s: %d series, %d linked, unlinked %s", run_id, n_series,
             manifest["linked"], manifest["unlinked"])
    return {**manifest, "run_dir": str(run_dir), "output": str(paths.imaging_link)}


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point: ``--lake LAKE [--run-id ID]``."""
    p = argparse.ArgumentParser(prog="imaging_link", description=__doc__.splitlines()[0])
    p.add_argument("--lake", help="lake root (default: lake.root)")
    p.add_argument("--run-id")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings({"lake.root": args.lake})
    try:
        summary = run(settings, run_id=args.run_id)
    except LedgerImbalance as exc:
        print(f"imaging_link: ledger does not balance: {exc}", file=sys.stderr)
        return 3
    except FileNotFoundError as exc:
        print(f"imaging_link: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
