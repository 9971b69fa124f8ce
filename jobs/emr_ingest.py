"""EMR ingest (Spark): raw FHIR Bulk NDJSON or OMOP CDM → LAKE/emr/{events,patients,quarantine,observation_periods}.

Read → parse → de-duplicate → resolve patients → write, each output swapped in
atomically with a manifest, and a ledger that must balance:

1. read (jobs.emr_export): NDJSON with ``spark.read.text`` (a malformed line stays a row and is
   quarantined, never dropped by a JSON reader); OMOP CSV/Parquet with an
   all-string schema of the columns each table needs (a bad value is
   quarantined by the parser, not nulled by the reader). Tables we do not
   ingest are counted, not parsed.
2. parse: the pure parsers (preprocessing.fhir / preprocessing.omop) over
   Arrow batches (``mapInArrow``): one record in, one record out, ids hashed
   with the pseudonym key inside the executor (read there from its 0600 file:
   the task closure carries a lake.keys.KeyFile, never the key).
3. de-duplicate: of accepted or ignored records with the same type and id, the
   first in reader order wins; the others are quarantined ``duplicate_id``.
4. resolve: clinical records whose patient is not an accepted patient are
   quarantined ``unknown_patient``.
5. write: events (one row per event), patients, quarantine, each into a
   staging directory; row counts read back and checked against the ledger;
   then committed (rename) with a manifest. A rerun replaces.

Spark-submit-able: ``spark-submit jobs/emr_ingest.py --input DIR --format fhir --lake LAKE``.
Logs carry counts only: never ids, names or note text.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from conf.settings import Settings, load_settings
from jobs.emr_export import (FORMATS, MALFORMED, export_time_us, fingerprint, list_inputs, omop_vocabulary,
                             read_fhir, read_omop_table, with_vocabulary)
from jobs.spark_session import get_spark
from lake.commit import clean_stale_staging, commit_set, staging_dir
from lake.files import file_sha256, write_json_atomic
from lake.keys import bind_lake, executor_key_file
from lake.ledger import LedgerImbalance, StageLedger, write_ledger
from lake.paths import LakePaths
from lake.runs import new_run_id
from lake.schemas import EVENTS
from lake.schemas import PERIOD_SOURCE_FHIR, PERIOD_SOURCE_OMOP
from preprocessing import emr_record as rec
from preprocessing.icd import code_set_version

log = logging.getLogger(__name__)

STAGE = "emr_ingest"
EVENTS_STAGE = "emr_ingest.events"
PATIENTS_STAGE = "emr_ingest.patients"
QUARANTINE_STAGE = "emr_ingest.quarantine"
PERIODS_STAGE = "emr_ingest.observation_periods"

RECORDS_SPARK = from_arrow_schema(rec.RECORDS)


# --- parsing inside the executors ----------------------------------------------------------

# One ParseContext per Python worker and configuration: the code set, code groups and the
# notes NLP pipeline (spaCy + rules) are built once per worker process, not per batch.
_CONTEXTS: dict[tuple[Any, ...], rec.ParseContext] = {}


def _context(cfg: tuple[Any, ...]) -> rec.ParseContext:
    ctx = _CONTEXTS.get(cfg)
    if ctx is None:
        from preprocessing.code_groups import load_code_groups
        from preprocessing.notes import NoteExtractor

        key_file, targets_file, context_file, groups_file, now, descendants = cfg
        groups = load_code_groups(groups_file)
        if descendants:
            groups = groups.with_omop_descendants(descendants)
        ctx = rec.ParseContext(key=key_file.load(), extractor=NoteExtractor.from_files(targets_file, context_file, groups.names),
                               groups=groups, now_us=now)
        _CONTEXTS[cfg] = ctx
    return ctx


def _parse_fhir_batches(cfg: tuple[Any, ...], batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    from preprocessing.fhir import parse_fhir_line

    ctx = _context(cfg)
    for batch in batches:
        lines = batch.column("value").to_pylist()
        files = batch.column("file").to_pylist()
        records = [parse_fhir_line(line, ctx, f) for line, f in zip(lines, files)]
        yield rec.records_to_arrow(records, batch.column("ord").to_pylist())


def _parse_omop_batches(cfg: tuple[Any, ...], table: str, columns: tuple[str, ...],
                        batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    from preprocessing.omop import parse_omop_row

    ctx = _context(cfg)
    for batch in batches:
        cols = {c: batch.column(c).to_pylist() for c in columns}
        bad = batch.column(MALFORMED).to_pylist()
        records = [parse_omop_row(table, {c: cols[c][i] for c in columns}, ctx, bool(bad[i]))
                   for i in range(batch.num_rows)]
        yield rec.records_to_arrow(records, batch.column("ord").to_pylist())


# --- transforms --------------------------------------------------------------------------------

def resolve(records: DataFrame) -> DataFrame:
    """Parsed records → final records: duplicates and unknown-patient references quarantined.

    Same columns as the input (:data:`preprocessing.emr_record.RECORDS`); one row per input
    row, so the ledger still balances. Of accepted or ignored records with the same type and
    id the first in reader order (``ord``) stays; a clinical record stays only if its
    patient_key is an accepted patient's.
    """
    ok = F.col("status") == rec.OK
    # Ignored records take part too: a repeated Claim line is a duplicate, not a second Claim.
    keyed = F.col("status").isin(rec.OK, rec.IGNORED) & F.col("source_ref").isNotNull()
    first = Window.partitionBy("_keyed", "resource_type", "source_ref").orderBy("ord")
    ranked = (records.withColumn("_keyed", keyed)
              .withColumn("_dup", F.col("_keyed") & (F.row_number().over(first) > 1)))
    known = (ranked.filter(ok & F.col("is_patient") & ~F.col("_dup"))
             .select("patient_key").distinct().withColumn("_known", F.lit(True)))
    joined = ranked.join(known, "patient_key", "left")
    dup = F.col("_dup")
    unknown = ok & ~dup & ~F.col("is_patient") & F.col("_known").isNull()
    bad = dup | unknown
    no_events = F.array().cast(RECORDS_SPARK["events"].dataType)
    return joined.select(
        "ord",
        F.when(bad, F.lit(rec.QUARANTINE)).otherwise(F.col("status")).alias("status"),
        "resource_type",
        F.when(dup, F.lit(rec.R_DUPLICATE_ID)).when(unknown, F.lit(rec.R_UNKNOWN_PATIENT))
        .otherwise(F.col("reason")).alias("reason"),
        F.when(dup, F.concat(F.col("resource_type"), F.lit(" id seen earlier in the export")))
        .when(unknown, F.concat(F.col("resource_type"),
                                F.lit(" references a patient not accepted in this export")))
        .otherwise(F.col("detail")).alias("detail"),
        "source_ref", "patient_key", "is_patient", "birth_date", "sex",
        F.when(bad, no_events).otherwise(F.col("events")).alias("events"),
        "death_date", "mrn_key", "period_start", "period_end")


def events_frame(final: DataFrame, source: str) -> DataFrame:
    """Accepted records → LAKE/emr/events rows (schema lake.schemas.EVENTS)."""
    e = (final.filter((F.col("status") == rec.OK) & ~F.col("is_patient"))
         .select("patient_key", "source_ref", F.explode("events").alias("e")))
    return e.select(
        "patient_key", F.col("e.event_time").alias("event_time"), F.col("e.kind").alias("kind"),
        F.col("e.code_system").alias("code_system"), F.col("e.code").alias("code"),
        F.col("e.value").alias("value"), F.col("e.unit").alias("unit"),
        F.col("e.assertion").alias("assertion"), F.col("e.code_groups").alias("code_groups"),
        F.col("e.concept_id").alias("concept_id"), F.lit(source).alias("source"), "source_ref",
        # Known no earlier than the parser says; without a recorded time, at the clinical time.
        F.coalesce(F.col("e.known_time"), F.col("e.event_time")).alias("known_time")
    ).select(*EVENTS.names)


I_VOCABULARY_TABLE = "vocabulary_table"


def diagnosis_counts(final: DataFrame) -> dict[str, Any]:
    """Accepted diagnoses per code system, in a code group or not, and (OMOP) with a standard
    concept or not: ``{"by_vocabulary": {system: {"in_group": n, "no_group": m}},
    "standard_concept": {"mapped": a, "not_mapped": b}}`` (the second only where conditions
    carry concept ids, i.e. OMOP)."""
    e = (final.filter((F.col("status") == rec.OK) & ~F.col("is_patient"))
         .select("resource_type", F.explode("events").alias("e"))
         .filter(F.col("e.kind") == "dx"))
    rows = (e.groupBy(F.coalesce(F.col("e.code_system"), F.lit("none")).alias("system"),
                      (F.size(F.col("e.code_groups")) > 0).alias("grouped"),
                      (F.col("resource_type") == "condition_occurrence").alias("omop"),
                      F.col("e.concept_id").isNotNull().alias("standard"))
            .count().collect())
    by_vocab: dict[str, dict[str, int]] = {}
    standard = {"mapped": 0, "not_mapped": 0}
    any_omop = False
    for r in rows:
        counts = by_vocab.setdefault(r["system"], {"in_group": 0, "no_group": 0})
        counts["in_group" if r["grouped"] else "no_group"] += int(r["count"])
        if r["omop"]:
            any_omop = True
            standard["mapped" if r["standard"] else "not_mapped"] += int(r["count"])
    out: dict[str, Any] = {"by_vocabulary": {k: by_vocab[k] for k in sorted(by_vocab)}}
    if any_omop:
        out["standard_concept"] = standard
    return out


def patients_frame(final: DataFrame, source: str) -> DataFrame:
    """Accepted patient records → LAKE/emr/patients rows (schema lake.schemas.PATIENTS).

    ``death_date`` is the patient record's own (FHIR ``deceased[x]``), else the earliest
    accepted death record of the patient (OMOP ``death``).
    """
    ok = F.col("status") == rec.OK
    deaths = (final.filter(ok & ~F.col("is_patient") & F.col("death_date").isNotNull())
              .groupBy("patient_key").agg(F.min("death_date").alias("_death")))
    return (final.filter(ok & F.col("is_patient")).join(deaths, "patient_key", "left")
            .select("patient_key", "birth_date", "sex", F.lit(source).alias("source"),
                    F.coalesce(F.col("death_date"), F.col("_death")).alias("death_date"), "mrn_key"))


def observation_periods_frame(final: DataFrame, source: str) -> DataFrame:
    """LAKE/emr/observation_periods rows (schema lake.schemas.OBSERVATION_PERIODS).

    OMOP: the accepted observation_period rows. FHIR has no such resource, so a
    patient is registered from the first record known for them: the UTC date on
    which their earliest accepted record became available (the later of its
    clinical and known times, as the timelines read it), open-ended (end NULL).
    A FHIR patient with no accepted record has no period, so is never in an
    as-of population.
    """
    ok = F.col("status") == rec.OK
    if source == "omop":
        return (final.filter(ok & F.col("period_start").isNotNull())
                .select("patient_key", F.col("period_start").alias("start_date"),
                        F.col("period_end").alias("end_date"), F.lit(PERIOD_SOURCE_OMOP).alias("source")))
    available = F.greatest(F.col("e.event_time"), F.coalesce(F.col("e.known_time"), F.col("e.event_time")))
    first_us = F.min(F.unix_micros(available))
    # Integer day arithmetic: the UTC date whatever the session time zone.
    first_day = F.date_from_unix_date(F.floor(first_us / F.lit(86_400_000_000)).cast("int"))
    return (final.filter(ok & ~F.col("is_patient")).select("patient_key", F.explode("events").alias("e"))
            .groupBy("patient_key").agg(first_day.alias("start_date"))
            .select("patient_key", "start_date", F.lit(None).cast("date").alias("end_date"),
                    F.lit(PERIOD_SOURCE_FHIR).alias("source")))


def expected_period_rows(final: DataFrame, source: str) -> int:
    """How many observation-period rows ingest must write, counted apart from the frame itself."""
    ok = F.col("status") == rec.OK
    if source == "omop":
        return final.filter(ok & (F.col("resource_type") == "observation_period")).count()
    return (final.filter(ok & ~F.col("is_patient") & (F.size("events") > 0))
            .select("patient_key").distinct().count())


def quarantine_frame(final: DataFrame, source: str) -> DataFrame:
    """Quarantined records → LAKE/emr/quarantine rows (schema lake.schemas.QUARANTINE)."""
    return (final.filter(F.col("status") == rec.QUARANTINE)
            .select(F.lit(source).alias("source"), "resource_type", "reason", "source_ref", "detail"))


# --- the job ----------------------------------------------------------------------------------------

def _parse(spark: SparkSession, fmt: str, files: list[Path], cfg: tuple[Any, ...],
           vocabulary: tuple[DataFrame | None, DataFrame | None] = (None, None),
           ) -> tuple[DataFrame, DataFrame | None, dict[str, int]]:
    """(parsed records, raw rows for an independent count or None, rows of tables not ingested)."""
    if fmt == "fhir":
        raw = read_fhir(spark, files)
        return raw.mapInArrow(partial(_parse_fhir_batches, cfg), RECORDS_SPARK), raw, {}
    from preprocessing.omop import TABLE_COLUMNS, VOCABULARY_TABLES, table_name

    parsed: DataFrame | None = None
    raw_all: DataFrame | None = None
    skipped: dict[str, int] = {}
    for path in files:
        table = table_name(path.name)
        columns = TABLE_COLUMNS.get(table)
        if table in VOCABULARY_TABLES:
            continue  # read and counted by omop_vocabulary
        if columns is None:
            # Not parsed, but every row is counted: the ledger must account for them.
            skipped[table] = skipped.get(table, 0) + read_omop_table(spark, path, None).count()
            continue
        raw = read_omop_table(spark, path, columns)
        if table == "condition_occurrence":
            raw = with_vocabulary(raw, *vocabulary)
        part = raw.mapInArrow(partial(_parse_omop_batches, cfg, table, columns), RECORDS_SPARK)
        parsed = part if parsed is None else parsed.unionByName(part)
        one = raw.select(F.lit(1).alias("one"))
        raw_all = one if raw_all is None else raw_all.unionByName(one)
    if parsed is None:
        parsed = spark.createDataFrame([], RECORDS_SPARK)
    return parsed, raw_all, skipped


def _write(df: DataFrame, final_path: Path, sort_cols: list[str]) -> Path:
    staging = staging_dir(final_path)
    df.sortWithinPartitions(*sort_cols).write.mode("overwrite").parquet(str(staging))
    # Checksums and Spark's own marker are noise in the lake; commit() writes _SUCCESS.
    for p in staging.iterdir():
        if p.name.endswith(".crc") or p.name == "_SUCCESS":
            p.unlink()
    return staging


def parquet_rows(directory: Path) -> int:
    """Rows in a directory's Parquet files, from their footers (no data is read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in sorted(Path(directory).glob("*.parquet")))


def run(settings: Settings, input_dir: Path | str, fmt: str, run_id: str | None = None) -> dict[str, Any]:
    """Ingest one EMR export (``fmt`` fhir | omop) into the lake; return the run summary.

    Writes LAKE/emr/events, LAKE/emr/patients, LAKE/emr/quarantine and
    LAKE/emr/observation_periods (each
    replaced atomically) and LAKE/runs/<run_id>/{ledger,manifest}.json. Raises
    LedgerImbalance (nothing committed) when a record is unaccounted for.
    """
    input_dir = Path(input_dir)
    files = list_inputs(input_dir, fmt)
    key_file = executor_key_file(settings.pseudonym)
    bind_lake(settings.lake.root, key_file.fingerprint)
    run_id = run_id or new_run_id(STAGE)
    paths = LakePaths(settings.lake.root)
    run_dir = paths.run(run_id)
    started = dt.datetime.now(dt.timezone.utc)
    ex = settings.extraction
    groups_file = Path(ex.code_groups_file).resolve()
    # Load once on the driver: a bad groups or notes rules file fails here with its message, not in a task.
    from preprocessing.code_groups import load_code_groups
    groups = load_code_groups(groups_file)
    from preprocessing.notes import load_note_rules
    targets_file, context_file = Path(ex.note_targets_file).resolve(), Path(ex.note_context_file).resolve()
    load_note_rules(targets_file, context_file, groups.names)
    export_us, export_time_from = export_time_us(input_dir, fmt)
    clean_stale_staging(paths.events.parent)

    spark = get_spark(settings.spark, f"medscreen-{STAGE}")
    # Parquet timestamps as UTC microseconds (Arrow reads them as timestamp[us, tz=UTC]).
    spark.conf.set("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
    log.info("emr ingest %s: %d %s input files", run_id, len(files), fmt)
    descendants: tuple[tuple[str, str], ...] = ()
    vocabulary: tuple[DataFrame | None, DataFrame | None] = (None, None)
    vocabulary_rows: dict[str, int] = {}
    if fmt == "omop":
        descendants, concept, maps, vocabulary_rows = omop_vocabulary(
            spark, files, sorted(groups.omop_concept_ids()))
        vocabulary = (concept, maps)
    cfg = (key_file, str(targets_file), str(context_file), str(groups_file), export_us, descendants)

    parsed, raw, skipped = _parse(spark, fmt, files, cfg, vocabulary)
    # Parse once: resolve() reads the parsed records twice (records, accepted patient keys).
    parsed = parsed.persist()
    final = resolve(parsed).persist()
    stagings: list[Path] = []
    try:
        rows_read = raw.count() if raw is not None else 0
        counts = (final.groupBy("status", "resource_type", "reason")
                  .agg(F.count(F.lit(1)).alias("n"),
                       F.sum(F.when(F.col("status") == rec.OK, F.size("events")).otherwise(0))
                       .alias("n_events"))
                  .collect())
        ledger = StageLedger(STAGE, unit="records")
        ledger.records_in = rows_read + sum(skipped.values()) + sum(vocabulary_rows.values())
        if skipped:
            ledger.ignored[rec.I_UNSUPPORTED_TABLE] = sum(skipped.values())
        if vocabulary_rows:
            # Reference rows, not patient records: used to map conditions, counted here.
            ledger.ignored[I_VOCABULARY_TABLE] = sum(vocabulary_rows.values())
        diagnoses = diagnosis_counts(final)
        by_type: dict[str, dict[str, int]] = {}
        n_events = n_patients = 0
        for row in counts:
            status, rtype, reason, n = row["status"], row["resource_type"], row["reason"], int(row["n"])
            by_type.setdefault(rtype, {}).setdefault(status, 0)
            by_type[rtype][status] += n
            if status == rec.OK:
                ledger.records_out += n
                n_events += int(row["n_events"] or 0)
                if rtype in ("Patient", "person"):
                    n_patients += n
            elif status == rec.QUARANTINE:
                ledger.quarantined[reason] = ledger.quarantined.get(reason, 0) + n
            else:
                ledger.ignored[reason] = ledger.ignored.get(reason, 0) + n
        for table, n in skipped.items():
            by_type.setdefault(table, {})[rec.IGNORED] = n
        for table, n in vocabulary_rows.items():
            by_type.setdefault(table, {})[rec.IGNORED] = n

        staging_events = _write(
            events_frame(final, fmt).repartition(settings.spark.shuffle_partitions, "patient_key"),
            paths.events, ["patient_key", "event_time", "kind", "code_system", "code", "assertion"])
        stagings.append(staging_events)
        staging_patients = _write(patients_frame(final, fmt).coalesce(1), paths.patients, ["patient_key"])
        stagings.append(staging_patients)
        staging_quarantine = _write(quarantine_frame(final, fmt).coalesce(1), paths.emr_quarantine,
                                    ["resource_type", "reason", "source_ref"])
        stagings.append(staging_quarantine)
        staging_periods = _write(observation_periods_frame(final, fmt).coalesce(1), paths.observation_periods,
                                 ["patient_key", "start_date"])
        stagings.append(staging_periods)
        n_periods = expected_period_rows(final, fmt)

        # Read back what was staged (footers only): the write lost nothing, or nothing commits.
        written = {name: parquet_rows(p) for name, p in
                   (("events", staging_events), ("patients", staging_patients),
                    ("quarantine", staging_quarantine), ("observation_periods", staging_periods))}
        stages = [
            ledger,
            StageLedger(EVENTS_STAGE, records_in=n_events, records_out=written["events"], unit="events"),
            StageLedger(PATIENTS_STAGE, records_in=n_patients, records_out=written["patients"],
                        unit="patients"),
            StageLedger(QUARANTINE_STAGE, records_in=ledger.quarantined_total,
                        records_out=written["quarantine"], unit="records"),
            StageLedger(PERIODS_STAGE, records_in=n_periods, records_out=written["observation_periods"],
                        unit="periods"),
        ]
        write_ledger(run_dir, *stages)
        for s in stages:
            s.check()

        manifest = {
            "run_id": run_id, "stage": STAGE, "format": fmt, "source": fmt,
            "input": fingerprint(input_dir, files), "code_set_version": code_set_version(),
            "code_groups_sha256": file_sha256(groups_file),
            "code_groups_version": groups.version,
            "omop_vocabulary": {"tables": vocabulary_rows, "descendant_concepts": len(descendants)},
            "diagnoses": diagnoses,
            # The notes NLP rules: a changed term or cue list changes what the notes yield.
            "note_targets_sha256": file_sha256(targets_file),
            "note_context_sha256": file_sha256(context_file),
            "export_time_utc": (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
                                + dt.timedelta(microseconds=export_us)).isoformat(),
            "export_time_from": export_time_from,
            "counts": {"records_in": ledger.records_in, "records_out": ledger.records_out,
                       "quarantined": ledger.quarantined_total, "ignored": ledger.ignored_total,
                       **{f"{k}_rows": v for k, v in written.items()}},
            "started_utc": started.isoformat(), "key_fingerprint": key_file.fingerprint,
        }
        # One set: a reader gets the four tables of one export, never events of this one with
        # patients or observation periods of the last.
        commit_set({paths.events: staging_events, paths.patients: staging_patients,
                    paths.emr_quarantine: staging_quarantine, paths.observation_periods: staging_periods},
                   STAGE, manifest, run_id=run_id)
        outputs = {"events": str(paths.events), "patients": str(paths.patients),
                   "quarantine": str(paths.emr_quarantine),
                   "observation_periods": str(paths.observation_periods)}
        stagings.clear()
    finally:
        final.unpersist()
        parsed.unpersist()
        for s in stagings:
            shutil.rmtree(s, ignore_errors=True)

    finished = dt.datetime.now(dt.timezone.utc)
    manifest.update({"finished_utc": finished.isoformat(), "outputs": outputs,
                     "ledger": str(run_dir / "ledger.json")})
    write_json_atomic(run_dir / "manifest.json", manifest)
    summary = {
        "run_id": run_id, "run_dir": str(run_dir), "format": fmt,
        "counts": {s.stage: s.to_dict() for s in stages},
        "quarantine_reasons": dict(sorted(ledger.quarantined.items())),
        "ignored": dict(sorted(ledger.ignored.items())),
        "by_resource_type": {k: by_type[k] for k in sorted(by_type)},
        "outputs": outputs,
        "code_set_version": manifest["code_set_version"],
        "code_groups_version": groups.version,
        "diagnoses": diagnoses,
        "seconds": round((finished - started).total_seconds(), 3),
    }
    log.info("emr ingest %s: %d records in, %d out, %d quarantined, %d ignored; %d events, %d patients",
             run_id, ledger.records_in, ledger.records_out, ledger.quarantined_total,
             ledger.ignored_total, written["events"], written["patients"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point: ``--input DIR --format fhir|omop [--lake LAKE] [--run-id ID]``."""
    p = argparse.ArgumentParser(prog="emr_ingest", description=__doc__.splitlines()[0])
    p.add_argument("--input", type=Path, required=True, help="export directory")
    p.add_argument("--format", choices=FORMATS, default=None, help="default: inputs.emr_format")
    p.add_argument("--lake", default=None, help="lake root (default: lake.root)")
    p.add_argument("--run-id", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings({"lake.root": args.lake, "inputs.emr_format": args.format})
    try:
        summary = run(settings, args.input, settings.inputs.emr_format, args.run_id)
    except LedgerImbalance as exc:
        print(f"emr_ingest: ledger does not balance: {exc}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as exc:
        print(f"emr_ingest: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
