"""The DataFrame transforms of point-in-time timelines (jobs.emr_features): events encoded to
tokens, per-patient aggregates, the as-of population, timeline and label columns, ledger counts.

The same rules as preprocessing.timelines and preprocessing.vocabulary, written as Spark
expressions (no Python UDFs); tests check the two agree row for row.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from lake.schemas import LABEL_COLUMNS, NOT_IN_POPULATION, PREVALENT_COLUMNS, TIMELINES, TIMELINES_WITH_LABELS
from preprocessing.timelines import LABEL_GROUPS, SEXES, US_PER_DAY, epoch_day, window_us
from preprocessing.vocabulary import (DX_GROUP_TOKENS, DX_KINDS, ENCOUNTER, ICD9_BUCKET, LOINC_RULES, OOV,
                                      OOV_ID, TOKEN_ASSERTIONS, UNKNOWN_BIN, Vocabulary)

# Patient-row statuses. "ok" rows become timelines; the rest are counted in the ledger.
OK = "ok"
PATIENT_QUARANTINE = ("no_patient_key", "duplicate_patient_key", "no_birth_date")
PATIENT_IGNORED = ("born_after_as_of", *NOT_IN_POPULATION)


def loinc_rules_frame(spark: SparkSession) -> DataFrame:
    """The LOINC binning rules as a small table (code, units map, cuts, bins), broadcast into a join.

    Table-driven rather than one CASE expression per rule: the generated code
    stays small however many rules there are.
    """
    rows = [(r.code, {u: float(f) for u, f in r.units.items()}, [float(c) for c in r.cuts], list(r.bins))
            for r in LOINC_RULES]
    return spark.createDataFrame(rows, "loinc_code string, loinc_units map<string,double>, "
                                       "loinc_cuts array<double>, loinc_bins array<string>")


def vocabulary_frame(spark: SparkSession, vocab: Vocabulary) -> DataFrame:
    """(token, token_id) for every token — small, broadcast into the event join."""
    return spark.createDataFrame([(t, i) for i, t in enumerate(vocab.tokens)], "token string, token_id int")


def _loinc_bin() -> Column:
    """Bin of an observation joined to its rule, mirroring vocabulary.loinc_bin."""
    value, unit = F.col("value"), F.lower(F.trim(F.col("unit")))
    factor = F.when(unit.isNull(), F.lit(1.0)).otherwise(F.try_element_at(F.col("loinc_units"), unit))
    v = value * factor  # NULL when the unit is not one we can convert
    # Bin i holds [cuts[i-1], cuts[i]): its index is the number of cuts ≤ v.
    index = F.size(F.filter(F.col("loinc_cuts"), lambda c: c <= v))
    return (F.when(value.isNull() | F.isnan(value) | (value < 0) | v.isNull(), F.lit(UNKNOWN_BIN))
            .otherwise(F.try_element_at(F.col("loinc_bins"), index + 1)))


def normalised_code() -> Column:
    """ICD code without punctuation, upper case — vocabulary.normalise_icd_code in SQL."""
    return F.upper(F.regexp_replace(F.coalesce(F.col("code"), F.lit("")), "[^A-Za-z0-9]", ""))


def token_column() -> Column:
    """The token string of each event (NULL = no token), mirroring vocabulary.token_for.

    Expects the event columns, ``code_norm`` (:func:`normalised_code`) and the LOINC rule
    columns of :func:`loinc_rules_frame` (NULL when the event is not an observation with a rule).
    """
    kind, system, assertion = F.col("kind"), F.col("code_system"), F.col("assertion")
    icd10 = F.concat(F.lit("icd10:"), F.substring(F.col("code_norm"), 1, 3))
    groups = F.coalesce(F.col("code_groups"), F.array().cast("array<string>"))
    dx = (F.when(assertion.isNotNull() & ~assertion.isin(*TOKEN_ASSERTIONS), F.lit(None).cast("string"))
          .when(system == "icd10cm", icd10))
    for g in DX_GROUP_TOKENS:  # vocabulary.group_token: most specific group first
        dx = dx.when(F.array_contains(groups, g), F.lit("dx:" + g))
    dx = dx.when(system == "icd9cm", F.lit(ICD9_BUCKET)).otherwise(F.lit(OOV))
    obs = F.concat(F.lit("loinc:"), F.col("loinc_code"), F.lit(":"), _loinc_bin())
    return (F.when(kind == "encounter", F.lit(ENCOUNTER))
            .when(kind.isin(*DX_KINDS), dx)
            .when(F.col("loinc_code").isNotNull(), obs)
            .otherwise(F.lit(OOV)))


def encode_events(events: DataFrame, vocab_frame: DataFrame) -> DataFrame:
    """Add ``token_id`` (int; NULL for events that yield no token; OOV for unknown strings) and ``code_norm``."""
    rules = F.broadcast(loinc_rules_frame(events.sparkSession))
    is_rule_obs = (F.col("kind") == "obs") & (F.col("code_system") == "loinc")
    # code_norm once per event: the token and the three label groups all need it.
    with_rule = (events.withColumn("code_norm", normalised_code())
                 .join(rules, is_rule_obs & (F.col("code") == F.col("loinc_code")), "left"))
    tokens = with_rule.withColumn("token", token_column()).drop("loinc_code", "loinc_units", "loinc_cuts",
                                                                 "loinc_bins")
    joined = tokens.join(F.broadcast(vocab_frame), "token", "left")
    return joined.withColumn("token_id", F.when(F.col("token").isNull(), F.lit(None).cast("int"))
                             .otherwise(F.coalesce(F.col("token_id"), F.lit(OOV_ID)))).drop("token")


def _group_match(names: tuple[str, ...]) -> Column:
    """A diagnosis whose code_groups (set at ingest by code_groups.groups_for) meet ``names``."""
    groups = F.coalesce(F.col("code_groups"), F.array().cast("array<string>"))
    return F.col("kind").isin(*DX_KINDS) & F.arrays_overlap(groups, F.array(*[F.lit(n) for n in names]))


def available_us() -> Column:
    """When the event was available: the later of its clinical and known times
    (timelines._available_us); a missing known time is the clinical time."""
    t = F.unix_micros(F.col("event_time"))
    return F.greatest(t, F.coalesce(F.unix_micros(F.col("known_time")), t))


def diagnosed_by(names: tuple[str, ...], end_us: int) -> Column:
    """The event is a diagnosis of the group available before ``end_us`` (affirmed, history or
    assertion-less): timelines._diagnosed_by in SQL, the one "already diagnosed" rule of labels
    and prevalence flags. NULL (not true) for an event without a time."""
    a = F.col("assertion")
    return (_group_match(names) & (available_us() < end_us)
            & (a.isNull() | a.isin(*TOKEN_ASSERTIONS)))


def patient_aggregates(encoded: DataFrame, as_of: dt.date, lookback_days: int,
                       horizon_days: int | None = None) -> DataFrame:
    """Per patient_key: the sorted in-window (t, tok) structs, event counts by reason, prevalence
    (``prev_<head>``, 1/0, over all events available by the end of the as-of day: no lookback)
    and label flags.

    Filtering is by integer µs since the epoch, so nothing depends on the session time zone.
    An event counts only when its clinical and known times are both before the end of the day.
    """
    t = F.unix_micros(F.col("event_time"))
    avail = available_us()
    start, end = window_us(as_of, lookback_days)
    in_win = (t >= start) & (avail < end)
    one = F.lit(1)
    aggs = [
        F.sort_array(F.collect_list(F.when(in_win & F.col("token_id").isNotNull(),
                                           F.struct(t.alias("t"), F.col("token_id").alias("tok"))))).alias("ev"),
        F.count(one).alias("n_events"),
        F.sum(F.when(t.isNull(), one).otherwise(0)).alias("n_no_time"),
        F.sum(F.when(t >= end, one).otherwise(0)).alias("n_after"),
        F.sum(F.when((t < end) & (avail >= end), one).otherwise(0)).alias("n_known_after"),
        F.sum(F.when((t < start) & (avail < end), one).otherwise(0)).alias("n_before"),
        F.sum(F.when(in_win & F.col("token_id").isNull(), one).otherwise(0)).alias("n_dropped"),
        *[F.max(F.when(diagnosed_by(names, end), one).otherwise(0)).alias(f"prev_{head}")
          for head, names in LABEL_GROUPS.items()],
    ]
    if horizon_days is not None:
        horizon_end = end + horizon_days * US_PER_DAY
        a, kind = F.col("assertion"), F.col("kind")
        incident = a.isNull() | (a == "affirmed") | ((kind == "dx") & (a == "history"))
        # The first incident diagnosis's availability time, not a flag: censoring (death, end of
        # observation) is known only after the patient join, and compares against this time.
        for head, names in LABEL_GROUPS.items():
            aggs.append(F.min(F.when(_group_match(names) & (avail >= end) & (avail < horizon_end) & incident,
                                     avail)).alias(f"pos_{head}"))
        aggs.append(F.max(F.when(t >= horizon_end - US_PER_DAY, one).otherwise(0)).alias("followed"))
    return encoded.groupBy("patient_key").agg(*aggs)


def period_aggregates(periods: DataFrame, as_of: dt.date) -> DataFrame:
    """Per patient_key, the observation periods against the as-of day (population_status and
    censor_date in SQL): ``obs_started`` / ``obs_covers`` (1/0), ``cover_open`` (a covering
    period without an end) and ``cover_end`` (the latest end of a covering period)."""
    day = F.lit(as_of)
    started = F.col("start_date") <= day
    covers = started & (F.col("end_date").isNull() | (F.col("end_date") >= day))
    return periods.groupBy("patient_key").agg(
        F.max(F.when(started, 1).otherwise(0)).alias("obs_started"),
        F.max(F.when(covers, 1).otherwise(0)).alias("obs_covers"),
        F.max(F.when(covers & F.col("end_date").isNull(), 1).otherwise(0)).alias("cover_open"),
        F.max(F.when(covers, F.col("end_date"))).alias("cover_end"))


def join_patients(aggregates: DataFrame, patients: DataFrame, as_of: dt.date,
                  periods: DataFrame) -> DataFrame:
    """Full outer join of patient rows with event aggregates and observation periods, with a
    ``status`` per row and ``censor_day`` (last day of label follow-up; NULL = none)."""
    p = patients.groupBy("patient_key").agg(
        F.count(F.lit(1)).alias("n_patient_rows"), F.min("birth_date").alias("birth_date"),
        F.min("sex").alias("sex_raw"), F.min("source").alias("patient_source"),
        F.min("death_date").alias("death_date"))
    p = p.join(period_aggregates(periods, as_of), "patient_key", "left")
    j = p.join(aggregates, "patient_key", "full_outer")
    status = (F.when(F.col("n_patient_rows").isNull(),
                     F.when(F.col("patient_key").isNull(), "events_no_patient_key").otherwise("unknown_patient"))
              .when(F.col("patient_key").isNull(), "no_patient_key")
              .when(F.col("n_patient_rows") > 1, "duplicate_patient_key")
              .when(F.col("birth_date").isNull(), "no_birth_date")
              .when(F.col("birth_date") > F.lit(as_of), "born_after_as_of")
              .when(F.col("death_date") <= F.lit(as_of), "deceased")
              .when(F.coalesce(F.col("obs_started"), F.lit(0)) == 0, "not_yet_registered")
              .when(F.col("obs_covers") == 0, "not_under_observation")
              .otherwise(OK))
    # least() skips NULLs: no death and an open period leave no censoring.
    censor = F.least(F.col("death_date"), F.when(F.col("cover_open") == 1, F.lit(None).cast("date"))
                     .otherwise(F.col("cover_end")))
    return j.withColumn("status", status).withColumn("censor_day", censor)


def timeline_columns(as_of: dt.date, max_tokens: int, with_labels: bool,
                     horizon_days: int = 0) -> list[Column]:
    """Column expressions of the TIMELINES (+ label) schema over a :func:`join_patients` frame."""
    as_of_day = epoch_day(as_of)
    ev = F.coalesce(F.col("ev"), F.array().cast("array<struct<t:bigint,tok:int>>"))
    kept = F.slice(ev, F.greatest(F.size(ev) - max_tokens + 1, F.lit(1)), max_tokens)

    def days_before(x: Column) -> Column:
        # Floor to the UTC day in integers: pmod keeps pre-1970 instants on the right day.
        day = ((x["t"] - F.pmod(x["t"], F.lit(US_PER_DAY))) / F.lit(US_PER_DAY)).cast("int")
        return F.lit(as_of_day) - day

    sex = F.upper(F.trim(F.col("sex_raw")))
    cols = [
        F.col("patient_key"),
        F.lit(as_of).alias("as_of"),
        F.size(kept).cast("int").alias("length"),
        F.transform(kept, lambda x: x["tok"]).cast("array<int>").alias("tokens"),
        F.transform(kept, days_before).cast("array<int>").alias("days_before"),
        ((F.lit(as_of_day) - F.unix_date(F.col("birth_date"))) / F.lit(365.25)).cast("float").alias("age_years"),
        F.when(sex.isin(*SEXES), sex).otherwise(F.lit("U")).alias("sex"),
        # A patient without events has no aggregate row: not prevalent.
        *[F.coalesce(F.col(f"prev_{head}") == 1, F.lit(False)).alias(col)
          for head, col in zip(LABEL_GROUPS, PREVALENT_COLUMNS)],
    ]
    if with_labels:
        horizon_end = (as_of_day + 1 + horizon_days) * US_PER_DAY
        censor_end = (F.unix_date(F.col("censor_day")) + F.lit(1)).cast("long") * F.lit(US_PER_DAY)
        positive_end = F.coalesce(F.least(censor_end, F.lit(horizon_end)), F.lit(horizon_end))
        uncensored = F.col("censor_day").isNull() | (censor_end >= F.lit(horizon_end))
        for head, col in zip(LABEL_GROUPS, LABEL_COLUMNS):
            cols.append(F.when(F.col(f"prev_{head}") == 1, F.lit(None))
                        .when(F.col(f"pos_{head}") < positive_end, F.lit(1))
                        .when((F.col("followed") == 1) & uncensored, F.lit(0))
                        .otherwise(F.lit(None)).cast("tinyint").alias(col))
    return cols


_COUNTERS = ("n_patient_rows", "n_events", "n_no_time", "n_after", "n_known_after", "n_before", "n_dropped")


def build_timelines(events: DataFrame, patients: DataFrame, vocab_frame: DataFrame, as_of: dt.date,
                    lookback_days: int, max_tokens: int, horizon_days: int | None = None, *,
                    periods: DataFrame) -> DataFrame:
    """Events + patients + observation periods → one row per patient key seen in events or
    patients, with the timeline columns, ``status`` and the per-reason counters the ledger sums."""
    aggs = patient_aggregates(encode_events(events, vocab_frame), as_of, lookback_days, horizon_days)
    joined = join_patients(aggs, patients, as_of, periods)
    n_in_window = F.size(F.coalesce(F.col("ev"), F.array())).alias("n_in_window")
    counters = [F.coalesce(F.col(c), F.lit(0)).cast("long").alias(c) for c in _COUNTERS]
    return joined.select(*timeline_columns(as_of, max_tokens, horizon_days is not None, horizon_days or 0),
                         "status",
                         "patient_source", n_in_window, *counters)


def timelines_output(built: DataFrame, with_labels: bool) -> DataFrame:
    """The rows written to the partition: status ok, exactly the lake schema's columns."""
    schema = TIMELINES_WITH_LABELS if with_labels else TIMELINES
    return built.filter(F.col("status") == OK).select(*schema.names)


def ledger_stats(built: DataFrame) -> dict[str, Any]:
    """One aggregate over the built frame: everything the ledgers and the manifest need."""
    ok = F.col("status") == OK

    def total(cond: Column, col: str | Column) -> Column:
        c = F.col(col) if isinstance(col, str) else col
        return F.coalesce(F.sum(F.when(cond, c).otherwise(0)), F.lit(0)).cast("long")

    is_patient = F.col("n_patient_rows") > 0
    not_output = is_patient & ~ok
    aggs = [
        total(F.lit(True), "n_patient_rows").alias("patients_in"),
        total(ok, F.lit(1)).alias("rows_out"),
        *[total(F.col("status") == s, "n_patient_rows").alias(f"pq_{s}") for s in PATIENT_QUARANTINE],
        *[total(F.col("status") == s, "n_patient_rows").alias(f"pi_{s}") for s in PATIENT_IGNORED],
        total(F.lit(True), "n_events").alias("events_in"),
        total(ok, "length").alias("events_out"),
        total(ok, "n_no_time").alias("eq_no_event_time"),
        total(F.col("status") == "events_no_patient_key", "n_events").alias("eq_no_patient_key"),
        total(ok, "n_after").alias("ei_after_as_of"),
        total(ok, "n_known_after").alias("ei_known_after_as_of"),
        total(ok, "n_before").alias("ei_before_lookback"),
        total(ok, "n_dropped").alias("ei_dropped_assertion"),
        total(ok, F.col("n_in_window") - F.col("length")).alias("ei_truncated_max_tokens"),
        total(F.col("status") == "unknown_patient", "n_events").alias("ei_unknown_patient"),
        total(not_output, "n_events").alias("ei_patient_not_output"),
        F.percentile(F.when(ok, F.col("length")), [0.5, 0.95, 0.99]).alias("length_pct"),
        F.max(F.when(ok, F.col("length"))).alias("length_max"),
        total(ok & (F.col("length") == 0), F.lit(1)).alias("rows_empty"),
    ]
    aggs += [total(ok & F.col(col), F.lit(1)).alias(f"{col}_n") for col in PREVALENT_COLUMNS]
    for col in LABEL_COLUMNS:
        if col in built.columns:
            aggs += [total(ok & (F.col(col) == 1), F.lit(1)).alias(f"{col}_pos"),
                     total(ok & (F.col(col) == 0), F.lit(1)).alias(f"{col}_neg"),
                     total(ok & F.col(col).isNull(), F.lit(1)).alias(f"{col}_null")]
    row = built.agg(*aggs).first()
    return row.asDict() if row is not None else {}
