"""Point-in-time EMR timelines: LAKE/emr/events + patients → LAKE/emr/timelines/as_of=D.

spark-submit-able (``main(argv)``) and callable (``run(settings, as_of)``, the
``medscreen emr features`` command). The feature rules live in
preprocessing/timelines.py and preprocessing/vocabulary.py; jobs.timeline_frames
computes the same thing with Spark expressions (no Python UDFs, nothing of the
data collected to the driver) and tests check the two agree row for row; this
module reads the committed inputs, runs those transforms, writes and commits.

One output row per patient of the as-of population (alive, registered and
under observation on D: ``patients.death_date`` and LAKE/emr/observation_periods,
rules in preprocessing.timelines.population_status), including patients with no
events in the window (``length`` 0), with ``prevalent_<head>`` flags (already
diagnosed by the end of the as-of day; computed on every run, labels or not).
Patients outside the population are ignored by rule under ``deceased``,
``not_yet_registered`` or ``not_under_observation``; labels are censored at
death and at the end of observation (timelines.censor_date).
Patient rows that cannot be used are quarantined (``no_patient_key``,
``duplicate_patient_key``, ``no_birth_date``) into ``LAKE/runs/<run_id>/quarantine/emr_features``; patients born after the
as-of date are ignored by rule. Two ledger stages account for everything:
``emr_features`` (patients) and ``emr_features.events`` (every event is in a
timeline or counted under a reason: after the as-of day, known only after the
as-of day (known_after_as_of), before the lookback,
dropped assertion, truncated to max_tokens, unknown patient, …).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from conf.settings import Settings, load_settings
from jobs.timeline_frames import (PATIENT_IGNORED, PATIENT_QUARANTINE, build_timelines, ledger_stats,
                                  timelines_output, vocabulary_frame)
from lake.commit import commit, read_manifest, reading_together, staging_dir
from lake.files import write_json_atomic
from lake.locks import partition_lock
from lake.keys import KEY_FIELD, stage_key_fingerprint
from lake.ledger import LedgerImbalance, StageLedger, write_ledger
from lake.paths import LakePaths, as_of_str
from lake.runs import new_run_id
from lake.schemas import (EVENTS, LABEL_COLUMNS, PATIENTS, PREVALENT_COLUMNS, QUARANTINE, TIMELINES,
                          TIMELINES_WITH_LABELS)
from lake.schemas import NOT_IN_POPULATION, OBSERVATION_PERIODS
from preprocessing.vocabulary import Vocabulary, default_vocabulary

STAGE = "emr_features"
EVENTS_STAGE = "emr_features.events"
log = logging.getLogger(__name__)

_QUARANTINE_DETAIL = {
    "no_patient_key": "patient row without patient_key",
    "duplicate_patient_key": "patient_key appears on more than one patient row",
    "no_birth_date": "patient row without birth_date; age at as-of cannot be computed",
}


class InputNotCommitted(FileNotFoundError):
    """An input partition has no _SUCCESS marker."""


def ledgers(stats: dict[str, Any]) -> tuple[StageLedger, StageLedger]:
    """The patient and event ledgers from :func:`ledger_stats`."""
    patients = StageLedger(STAGE, unit="patients", records_in=stats["patients_in"], records_out=stats["rows_out"],
                           quarantined={s: stats[f"pq_{s}"] for s in PATIENT_QUARANTINE if stats[f"pq_{s}"]},
                           ignored={s: stats[f"pi_{s}"] for s in PATIENT_IGNORED if stats[f"pi_{s}"]})
    q = {k[3:]: v for k, v in stats.items() if k.startswith("eq_") and v}
    ig = {k[3:]: v for k, v in stats.items() if k.startswith("ei_") and v}
    events = StageLedger(EVENTS_STAGE, unit="events", records_in=stats["events_in"],
                         records_out=stats["events_out"], quarantined=q, ignored=ig)
    return patients, events


# ---------------------------------------------------------------- I/O

def _spark_schema(schema: Any) -> Any:
    return from_arrow_schema(schema)


def _require_committed(path: Path, what: str) -> dict[str, Any]:
    try:
        return read_manifest(path)
    except FileNotFoundError:
        raise InputNotCommitted(
            f"{what} partition {path} is not committed (no _SUCCESS marker): the ingest run that writes it "
            "has not finished or failed; run `medscreen emr ingest` and retry") from None


def _check_columns(path: Path, schema: Any, what: str) -> None:
    """Fail early, naming the file, if a Parquet file lacks a column of the contract
    (Spark would silently read it as NULL)."""
    files = sorted(p for p in path.rglob("*.parquet")
                   if not any(s.startswith((".", "_")) for s in p.relative_to(path).parts))
    if not files:
        return
    have = set(pq.read_schema(files[0]).names)
    missing = [n for n in schema.names if n not in have]
    if missing:
        raise ValueError(f"{what} file {files[0].name} in {path} lacks columns {missing} of the "
                         f"lake schema; rewrite the partition with the current ingest job")


def read_table(spark: SparkSession, path: Path, schema: Any) -> DataFrame:
    """A committed lake table with its explicit schema (manifest and markers are skipped)."""
    return (spark.read.schema(_spark_schema(schema)).option("pathGlobFilter", "*.parquet")
            .option("recursiveFileLookup", "true").parquet(str(path)))


def _tidy_spark_output(directory: Path) -> int:
    """Give Spark's part files stable names (part-00000.parquet …) and drop its checksums and
    marker, so identical reruns give identical partitions; return the file count."""
    n = 0
    for p in sorted(directory.iterdir()):
        if p.name.endswith(".crc") or p.name == "_SUCCESS":
            p.unlink()
    for p in sorted(directory.glob("part-*.parquet")):
        index = p.name.split("-")[1]
        p.rename(directory / f"part-{index}.parquet")
        n += 1
    return n


def _write_vocabulary(paths: LakePaths, vocab: Vocabulary) -> Path:
    target = paths.vocabulary / f"{vocab.sha256[:12]}.json"
    if target.is_file():
        try:
            if Vocabulary.load(target).sha256 == vocab.sha256:
                return target
        except (ValueError, KeyError, json.JSONDecodeError):
            pass  # a damaged copy: rewrite it below
    return vocab.save(target)


def _merge_run_manifest(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / "manifest.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("stages", {})[STAGE] = entry
    data["run_id"] = entry["run_id"]
    if KEY_FIELD in entry:
        data[KEY_FIELD] = entry[KEY_FIELD]
    write_json_atomic(path, data)


def run(settings: Settings, as_of: str, with_labels: bool = False, run_id: str | None = None) -> dict[str, Any]:
    """Build LAKE/emr/timelines/as_of=D from the committed events and patients partitions.

    Writes the partition atomically (a rerun replaces it), the vocabulary to
    LAKE/emr/vocabulary/<sha256[:12]>.json, the ledger to LAKE/runs/<run_id>/,
    and quarantined patient rows to LAKE/runs/<run_id>/quarantine/emr_features.
    Raises InputNotCommitted if an input is not committed and LedgerImbalance
    (before committing anything) if the counts do not reconcile. Returns a summary.
    """
    as_of_date = dt.date.fromisoformat(as_of_str(as_of))
    paths = LakePaths(settings.lake.root)
    _require_committed(paths.events, "events")
    _require_committed(paths.patients, "patients")
    _require_committed(paths.observation_periods, "observation periods")
    run_id = run_id or new_run_id(STAGE)
    # One writer of this date's timelines at a time; the events and patients versions read are
    # resolved once and leased for the whole job, so a concurrent ingest cannot change them.
    # One reading of ingest's set pointer: events, patients and periods of the same ingest.
    with partition_lock(paths.timelines(as_of_date), run_id), \
            reading_together(paths.events, paths.patients, paths.observation_periods) as versions:
        return _run(settings, as_of_date, with_labels, run_id, *versions)


def _run(settings: Settings, as_of_date: dt.date, with_labels: bool, run_id: str, events_path: Path,
         patients_path: Path, periods_path: Path) -> dict[str, Any]:
    from jobs.spark_session import get_spark

    paths = LakePaths(settings.lake.root)
    feats = settings.features
    events_manifest = _require_committed(events_path, "events")
    patients_manifest = _require_committed(patients_path, "patients")
    periods_manifest = _require_committed(periods_path, "observation periods")
    key_fp = stage_key_fingerprint(settings.pseudonym, paths.root,
                                   {"emr/events": events_manifest, "emr/patients": patients_manifest,
                                    "emr/observation_periods": periods_manifest})
    _check_columns(events_path, EVENTS, "events")
    _check_columns(patients_path, PATIENTS, "patients")
    _check_columns(periods_path, OBSERVATION_PERIODS, "observation periods")
    run_dir = paths.run(run_id)
    vocab = default_vocabulary()
    horizon = feats.horizon_days if with_labels else None

    spark = get_spark(settings.spark, f"medscreen-{STAGE}")
    events = read_table(spark, events_path, EVENTS)
    patients = read_table(spark, patients_path, PATIENTS)
    periods = read_table(spark, periods_path, OBSERVATION_PERIODS)
    built = build_timelines(events, patients, vocabulary_frame(spark, vocab), as_of_date,
                            feats.lookback_days, feats.max_tokens, horizon, periods=periods)
    # Three actions (stats, timelines, quarantine) read the same per-patient frame: scan events once.
    built = built.persist(StorageLevel.MEMORY_AND_DISK)
    final = paths.timelines(as_of_date)
    staging = None
    try:
        stats = ledger_stats(built)
        patient_ledger, event_ledger = ledgers(stats)
        write_ledger(run_dir, patient_ledger, event_ledger)
        for ledger in (patient_ledger, event_ledger):
            ledger.check()

        if patient_ledger.quarantined_total:
            quarantine_dir = run_dir / "quarantine" / STAGE
            (built.filter(F.col("status").isin(*PATIENT_QUARANTINE))
             .select(F.coalesce(F.col("patient_source"), F.lit("unknown")).alias("source"),
                     F.lit("patient").alias("resource_type"), F.col("status").alias("reason"),
                     F.col("patient_key").alias("source_ref"),
                     F.element_at(F.create_map(*[F.lit(x) for kv in _QUARANTINE_DETAIL.items() for x in kv]),
                                  F.col("status")).alias("detail"))
             .select(*QUARANTINE.names)
             .coalesce(1).write.mode("overwrite").parquet(str(quarantine_dir)))
            _tidy_spark_output(quarantine_dir)

        staging = staging_dir(final)
        n_files = settings.spark.shuffle_partitions
        (timelines_output(built, with_labels)
         .repartition(n_files, "patient_key").sortWithinPartitions("patient_key")
         .write.mode("overwrite").parquet(str(staging)))
        files = _tidy_spark_output(staging)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        built.unpersist()

    vocab_file = _write_vocabulary(paths, vocab)
    pct = stats["length_pct"] or [0, 0, 0]
    length = {"p50": float(pct[0]), "p95": float(pct[1]), "p99": float(pct[2]),
              "max": int(stats["length_max"] or 0), "empty_rows": stats["rows_empty"]}
    labels = {}
    for col in LABEL_COLUMNS if with_labels else ():
        pos, neg, null = stats[f"{col}_pos"], stats[f"{col}_neg"], stats[f"{col}_null"]
        labels[col] = {"positive": pos, "negative": neg, "null": null,
                       "prevalence": (pos / (pos + neg)) if pos + neg else None}
    manifest = {
        "stage": STAGE, "run_id": run_id, "as_of": as_of_date.isoformat(),
        "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "schema": (TIMELINES_WITH_LABELS if with_labels else TIMELINES).names,
        "vocabulary": {"version": vocab.version, "sha256": vocab.sha256, "size": vocab.size,
                       "file": vocab_file.relative_to(paths.root).as_posix()},
        "lookback_days": feats.lookback_days, "max_tokens": feats.max_tokens,
        "with_labels": with_labels, "horizon_days": horizon,
        "rows": stats["rows_out"], "files": files, "length": length, "labels": labels,
        # Patients already diagnosed (all history up to the end of D, no lookback): left out of screening.
        "prevalent": {col: stats[f"{col}_n"] for col in PREVALENT_COLUMNS},
        "ledger": {STAGE: patient_ledger.to_dict(), EVENTS_STAGE: event_ledger.to_dict()},
        # The disease definitions the events' code_groups were filled with (flags and labels use them),
        # and the exact versions read.
        "inputs": {"events": {"run_id": events_manifest.get("run_id"), "version": events_manifest.get("version"),
                              "code_groups_version": events_manifest.get("code_groups_version"),
                              "code_groups_sha256": events_manifest.get("code_groups_sha256")},
                   "patients": {"run_id": patients_manifest.get("run_id"),
                                "version": patients_manifest.get("version")},
                   "observation_periods": {"run_id": periods_manifest.get("run_id"),
                                           "version": periods_manifest.get("version")}},
        # Left out of the as-of population, by reason (also in the ledger's "ignored").
        "not_in_population": {r: patient_ledger.ignored.get(r, 0) for r in NOT_IN_POPULATION},
        KEY_FIELD: key_fp,
    }
    commit(staging, final, manifest, run_id=run_id)
    summary = {
        "run_id": run_id, "run_dir": str(run_dir), "output": str(final), "as_of": as_of_date.isoformat(),
        "rows": stats["rows_out"], "patients_in": patient_ledger.records_in,
        "patients_quarantined": patient_ledger.quarantined, "patients_ignored": patient_ledger.ignored,
        "events_in": event_ledger.records_in, "events_out": event_ledger.records_out,
        "events_ignored": event_ledger.ignored, "events_quarantined": event_ledger.quarantined,
        "length": length, "labels": labels, "prevalent": manifest["prevalent"],
        "not_in_population": manifest["not_in_population"],
        "vocabulary_sha256": vocab.sha256, "files": files,
    }
    _merge_run_manifest(run_dir, {k: v for k, v in manifest.items() if k != "ledger"} | {"output": str(final)})
    log.info("emr_features %s: %d rows, %d events in", as_of_date, stats["rows_out"], stats["events_in"])
    return summary


def main(argv: list[str] | None = None) -> int:
    """spark-submit entry point: ``emr_features.py --lake L --as-of D [--with-labels] [--run-id R]``."""
    ap = argparse.ArgumentParser(prog="emr_features", description=__doc__.splitlines()[0])
    ap.add_argument("--lake", help="lake root (default: lake.root from config / MEDSCREEN_LAKE__ROOT)")
    ap.add_argument("--as-of", dest="as_of", required=True, help="as-of date, YYYY-MM-DD (UTC)")
    ap.add_argument("--with-labels", action="store_true", help="add label_t2d/ckd/hf from (as-of, as-of + horizon]")
    ap.add_argument("--run-id", dest="run_id", help="run id to record under (default: a new one)")
    args = ap.parse_args(argv)
    settings = load_settings({"lake.root": args.lake})
    # Stop the session only if this call started it (spark-submit), not a caller's.
    owned = SparkSession.getActiveSession() is None
    try:
        summary = run(settings, args.as_of, with_labels=args.with_labels, run_id=args.run_id)
    except (InputNotCommitted, LedgerImbalance, ValueError) as exc:
        print(f"emr_features: {exc}", file=sys.stderr)
        return 2
    finally:
        active = SparkSession.getActiveSession()
        if owned and active is not None:
            active.stop()
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
