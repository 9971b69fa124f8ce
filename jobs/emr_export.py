"""Reading one raw EMR export in Spark: its files, fingerprint and export time, FHIR NDJSON
lines, OMOP CDM tables as strings, and the CDM's own vocabulary tables."""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType

from preprocessing import emr_record as rec

FORMATS = ("fhir", "omop")
_NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz", ".jsonl", ".jsonl.gz")
_OMOP_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".parquet")
_CORRUPT = "_corrupt_record"
MALFORMED = "_malformed"


def list_inputs(input_dir: Path, fmt: str) -> list[Path]:
    """The files (or Parquet folders) of an export, sorted; a clear error when there are none."""
    input_dir = Path(input_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown EMR format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not input_dir.is_dir():
        raise FileNotFoundError(f"EMR input directory {input_dir} does not exist; pass --input "
                                "the export directory")
    suffixes = _NDJSON_SUFFIXES if fmt == "fhir" else _OMOP_SUFFIXES
    found = [p for p in sorted(input_dir.rglob("*")) if p.is_file()
             and p.name.lower().endswith(suffixes) and not p.name.startswith((".", "_"))]
    if fmt == "omop":
        # A table may also be a folder of Parquet part files (person/part-0000.parquet).
        found = sorted({p.parent if p.parent != input_dir and p.name.endswith(".parquet") else p
                        for p in found})
    if not found:
        kind = "FHIR Bulk NDJSON (*.ndjson)" if fmt == "fhir" else "OMOP CDM tables (*.csv, *.parquet)"
        raise FileNotFoundError(f"no {kind} files under {input_dir}; check --input and --format")
    return found


def fingerprint(input_dir: Path, files: list[Path]) -> dict[str, Any]:
    """File names (relative) and sizes of the input, and a sha256 over them."""
    entries = []
    for f in files:
        parts = [f] if f.is_file() else sorted(p for p in f.rglob("*") if p.is_file())
        for p in parts:
            entries.append({"name": str(p.relative_to(input_dir)), "size": p.stat().st_size})
    digest = hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
    return {"files": entries, "sha256": digest}


def export_time_us(input_dir: Path, fmt: str) -> tuple[int, str]:
    """When the export was taken (microseconds, UTC) and where that came from.

    A record dated after its export is impossible (``future_date``): FHIR Bulk
    exports say when in ``manifest.json`` ``transactionTime``; OMOP in
    ``cdm_source.cdm_release_date`` (end of that day). Otherwise, and never
    later than, the time of this run.
    """
    now = rec.now_us()
    found: tuple[int, str] | None = None
    try:
        if fmt == "fhir" and (input_dir / "manifest.json").is_file():
            t = json.loads((input_dir / "manifest.json").read_text()).get("transactionTime")
            if t:
                found = (rec.parse_datetime_us(t), "manifest.json transactionTime")
        elif fmt == "omop":
            for p in sorted(input_dir.glob("*")):
                if p.name.lower() in ("cdm_source.csv", "cdm_source.csv.gz"):
                    header, delimiter = _csv_header(p)
                    opener = gzip.open if p.name.lower().endswith(".gz") else open
                    with opener(p, "rt", newline="", encoding="utf-8-sig") as f:  # type: ignore[operator]
                        rows = list(csv.DictReader(f, delimiter=delimiter))
                    for col in ("cdm_release_date", "source_release_date"):
                        v = next((r.get(col) for r in rows if r.get(col)), None)
                        if v:
                            end_of_day = rec.parse_datetime_us(v[:10]) + 86_400_000_000 - 1
                            found = (end_of_day, f"cdm_source.{col}")
                            break
    except (ValueError, TypeError, OSError) as exc:
        raise ValueError(f"{input_dir}: cannot read the export time ({exc}); fix the export's "
                         "manifest.json / cdm_source table or remove it") from None
    if found is None or found[0] > now:
        return now, "run time"
    return found


def read_fhir(spark: SparkSession, files: list[Path]) -> DataFrame:
    """Raw NDJSON lines with their file name and reader order (``value``, ``file``, ``ord``)."""
    raw = spark.read.text([str(f) for f in files])
    return raw.select(F.col("value"), F.col("_metadata.file_name").alias("file"),
                      F.monotonically_increasing_id().alias("ord"))


def _csv_header(path: Path) -> tuple[list[str], str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", newline="", encoding="utf-8-sig") as f:  # type: ignore[operator]
        first = f.readline()
    delimiter = "\t" if "\t" in first and "," not in first else ","
    return next(csv.reader([first], delimiter=delimiter)), delimiter


def read_omop_table(spark: SparkSession, path: Path, columns: tuple[str, ...] | None) -> DataFrame:
    """One CDM table as strings: ``columns`` (lower-case; absent ones null), ``_malformed``, ``ord``.

    With ``columns=None`` the table as read (used only to count rows of tables not ingested).
    """
    if path.is_dir() or path.name.lower().endswith(".parquet"):
        df = spark.read.parquet(str(path))
    else:
        header, delimiter = _csv_header(path)
        # Every column as a string: typed CSV schemas null or fail on one bad value, and the
        # parser should decide (and quarantine with a reason). Names come from the header
        # because exports differ in column order and extra columns.
        # A row with more or fewer fields than the header (a cut-off extract) fills the
        # corrupt-record column, so the parser can quarantine it as malformed_line.
        schema = StructType([StructField(h, StringType(), True) for h in header]
                            + [StructField(_CORRUPT, StringType(), True)])
        df = (spark.read.schema(schema).option("header", True).option("multiLine", True)
              .option("escape", '"').option("sep", delimiter).option("mode", "PERMISSIVE")
              .option("columnNameOfCorruptRecord", _CORRUPT)
              .option("enforceSchema", True).csv(str(path)))
    if columns is None:
        return df
    by_lower = {c.lower(): c for c in df.columns}
    cols = [(F.col(f"`{by_lower[c]}`").cast("string") if c in by_lower else F.lit(None).cast("string")).alias(c)
            for c in columns]
    bad = F.col(_CORRUPT).isNotNull() if _CORRUPT in df.columns else F.lit(False)
    return df.select(*cols, bad.alias(MALFORMED), F.monotonically_increasing_id().alias("ord"))


def _valid_vocabulary(df: DataFrame) -> DataFrame:
    reason = F.col("invalid_reason")
    return df.filter(reason.isNull() | (F.trim(reason) == ""))


def omop_vocabulary(spark: SparkSession, files: list[Path], listed_ids: list[str]
                    ) -> tuple[tuple[tuple[str, str], ...], DataFrame | None, DataFrame | None, dict[str, int]]:
    """The CDM's own vocabulary, where it ships one: (concept_ancestor pairs under the concept
    sets' listed ids, concept columns for condition rows, 'Maps to' per source concept, rows read).

    The ancestor pairs are vocabulary, not patient data, and bounded by the concept sets: they
    travel to the executors with the parse configuration. The other two are joined to the
    condition rows (one row out per row in).
    """
    from preprocessing.omop import VOCABULARY_TABLES, table_name

    found = {table_name(p.name): p for p in files if table_name(p.name) in VOCABULARY_TABLES}
    counts: dict[str, int] = {}
    pairs: tuple[tuple[str, str], ...] = ()
    concept = maps = None
    if "concept_ancestor" in found:
        anc = read_omop_table(spark, found["concept_ancestor"], VOCABULARY_TABLES["concept_ancestor"])
        counts["concept_ancestor"] = anc.count()
        rows = (anc.filter(F.col("ancestor_concept_id").isin(listed_ids))
                .select("ancestor_concept_id", "descendant_concept_id").distinct().collect())
        pairs = tuple(sorted((str(int(r[0])), str(int(r[1]))) for r in rows
                             if r[0] and r[1] and r[1].strip().isdigit()))
    if "concept" in found:
        c = read_omop_table(spark, found["concept"], VOCABULARY_TABLES["concept"])
        counts["concept"] = c.count()
        concept = F.broadcast(_valid_vocabulary(c).select(
            F.col("concept_id").cast("long").alias("_cid"),
            F.trim(F.col("vocabulary_id")).alias("_concept_vocabulary"),
            F.trim(F.col("concept_code")).alias("_concept_code"),
            F.trim(F.col("standard_concept")).alias("_concept_standard")).dropDuplicates(["_cid"]))
    if "concept_relationship" in found:
        r = read_omop_table(spark, found["concept_relationship"], VOCABULARY_TABLES["concept_relationship"])
        counts["concept_relationship"] = r.count()
        maps = (_valid_vocabulary(r).filter(F.trim(F.col("relationship_id")) == "Maps to")
                .groupBy(F.col("concept_id_1").cast("long").alias("_sid"))
                .agg(F.array_join(F.array_sort(F.collect_set(F.col("concept_id_2").cast("long")
                                                             .cast("string"))), " ").alias("_maps_to")))
    return pairs, concept, maps, counts


def with_vocabulary(raw: DataFrame, concept: DataFrame | None, maps: DataFrame | None) -> DataFrame:
    """Condition rows with the VOCABULARY_COLUMNS filled from the CDM's tables (null without them)."""
    from preprocessing.omop import VOCABULARY_COLUMNS

    out = raw.drop(*VOCABULARY_COLUMNS)
    cid = F.expr("try_cast(condition_concept_id as bigint)")
    sid = F.expr("try_cast(condition_source_concept_id as bigint)")
    if concept is not None:
        out = out.join(concept, cid == F.col("_cid"), "left").drop("_cid")
    if maps is not None:
        out = out.join(maps, sid == F.col("_sid"), "left").drop("_sid")
    for c in VOCABULARY_COLUMNS:
        if c not in out.columns:
            out = out.withColumn(c, F.lit(None).cast("string"))
    return out
