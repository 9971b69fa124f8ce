"""OMOP CDM 5.4 row parser: one table row (column → string) → one :class:`ParsedRecord`.

Tables read, as OHDSI ships them (CSV or Parquet; extra columns ignored):

- ``person`` → a patients row; ``person_id`` in decimal is the source id;
  birth from ``birth_datetime`` else year/month/day; sex from
  ``gender_concept_id`` (8507 M, 8532 F) else ``gender_source_value``;
  ``person_source_value`` is the medical record number (→ ``mrn_key``);
- ``death`` → the person's death date (``death_datetime`` else ``death_date``,
  UTC date); one row per person (a second is ``duplicate_id``);
- ``observation_period`` → an observation period (start/end dates, inclusive);
  an end before the start is quarantined ``invalid_period``;
- ``visit_occurrence`` → ``encounter`` event (``visit_concept_id``, system ``omop``);
- ``condition_occurrence`` → ``dx`` event. Groups: the standard
  ``condition_concept_id`` (else the standard concept the source concept
  'Maps to' in ``concept_relationship``), with descendants through
  ``concept_ancestor`` and its SNOMED code from ``concept`` when the CDM ships
  those tables; only when that gives no group, the source value (ICD-10-CM,
  validated, ``invalid_icd10cm`` if not in the code set; ICD-9-CM; SNOMED CT)
  and the source concept. The event keeps the standard concept id
  (``concept_id``) and, as its code, an ICD source value, else the standard
  concept's code (``snomed``) or id (``omop``). Known at the end of its date;
- ``measurement`` / ``observation`` → ``obs`` event with ``value_as_number``;
  code = LOINC source value when it is one, else the concept id;
- ``note`` → ``dx_text`` events from ``note_text`` (text dropped here, never stored).

The vocabulary tables (``concept``, ``concept_relationship``,
``concept_ancestor``) are read by the job for the condition rows (see
:data:`VOCABULARY_TABLES`) and counted as ``vocabulary_table``. Every other
table (drug_exposure, cost, cdm_source, ...) is ignored by rule
``unsupported_table`` and counted by the job. All values arrive as
strings (the job reads with an all-string schema) so a bad value becomes a
quarantine reason here rather than a silent null in the reader.

Pure: no Spark, Ray or Airflow.
"""
from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

from lake.keys import mrn_source_id
from lake.schemas import (KIND_DX, KIND_DX_TEXT, KIND_ENCOUNTER, KIND_OBS, SYSTEM_ICD9CM,
                          SYSTEM_ICD10CM, SYSTEM_LOINC, SYSTEM_OMOP, SYSTEM_SNOMED)
from preprocessing.code_groups import is_snomed_concept_id
from preprocessing.emr_record import (I_NON_NUMERIC_VALUE, I_UNSUPPORTED_TABLE, OK, R_FUTURE_DATE,
                                      R_INVALID_DATE, R_INVALID_ID, R_MALFORMED_LINE,
                                      R_INVALID_SUBJECT, R_INVALID_VALUE,
                                      R_MALFORMED_CODE, R_MISSING_CODE, R_MISSING_DATE,
                                      R_MISSING_ID, R_MISSING_SUBJECT, R_MISSING_VALUE, Event,
                                      ParseContext, ParsedRecord, dx_event, ignored, parse_date,
                                      parse_datetime_us, quarantine)
from preprocessing.emr_record import R_INVALID_PERIOD
from preprocessing.icd import looks_like_icd9cm, normalise_icd9cm, normalise_icd10cm, parse_icd10cm

SOURCE = "omop"
SYSTEM_OMOP_CONCEPT = SYSTEM_OMOP  # an OMOP concept id as the code

# Columns the ingest job adds to condition_occurrence rows from the CDM's own vocabulary tables
# (null when the CDM ships none): the condition concept's vocabulary, code and standard flag,
# and the standard concepts the source concept 'Maps to' (space-separated ids).
VOCABULARY_COLUMNS = ("_concept_vocabulary", "_concept_code", "_concept_standard", "_maps_to")
# The columns each supported table is read with (all as strings). Missing ones read as null.
TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "gender_concept_id", "year_of_birth", "month_of_birth",
               "day_of_birth", "birth_datetime", "gender_source_value", "person_source_value"),
    "death": ("person_id", "death_date", "death_datetime"),
    "observation_period": ("observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date"),
    "visit_occurrence": ("visit_occurrence_id", "person_id", "visit_concept_id",
                         "visit_start_date", "visit_start_datetime"),
    "condition_occurrence": ("condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_start_date", "condition_start_datetime",
                             "condition_source_value", "condition_source_concept_id", *VOCABULARY_COLUMNS),
    "measurement": ("measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                    "measurement_datetime", "value_as_number", "value_as_concept_id",
                    "measurement_source_value", "unit_source_value"),
    "observation": ("observation_id", "person_id", "observation_concept_id", "observation_date",
                    "observation_datetime", "value_as_number", "value_as_string",
                    "value_as_concept_id", "observation_source_value", "unit_source_value"),
    "note": ("note_id", "person_id", "note_date", "note_datetime", "note_text"),
}
# OMOP vocabulary tables used for conditions, with the columns read (OHDSI's CSV layout).
VOCABULARY_TABLES: dict[str, tuple[str, ...]] = {
    "concept": ("concept_id", "vocabulary_id", "standard_concept", "concept_code", "invalid_reason"),
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id", "invalid_reason"),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
}

_GENDER_CONCEPTS = {"8507": "M", "8532": "F"}
_GENDER_VALUES = {"m": "M", "male": "M", "f": "F", "female": "F"}
_LOINC = re.compile(r"\d{1,7}-\d")


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def table_name(file_or_dir_name: str) -> str:
    """The CDM table a file or folder holds: ``PERSON.csv``, ``person.parquet``, ``person/`` → ``person``."""
    base = file_or_dir_name.rstrip("/").rsplit("/", 1)[-1]
    for suffix in (".csv.gz", ".csv", ".tsv", ".parquet", ".txt"):
        if base.lower().endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.lower()


def decimal_id(value: str | None) -> str | None:
    """An integer id in decimal (``"00042"``, ``"42.0"`` → ``"42"``); None if empty; ValueError if not integral."""
    if value is None:
        return None
    s = str(value).strip()
    if not s:
        return None
    if s.lstrip("-").isdigit():
        return str(int(s))
    f = float(s)  # ValueError for non-numbers: the caller quarantines
    if not f.is_integer():
        raise ValueError("not an integer")
    return str(int(f))


def _id(row: Mapping[str, str | None], col: str, table: str, missing: str) -> str:
    try:
        v = decimal_id(row.get(col))
    except (ValueError, OverflowError):
        raise _Bad(R_INVALID_ID if missing == R_MISSING_ID else R_INVALID_SUBJECT,
                   f"{table}.{col} is not an integer") from None
    if v is None:
        raise _Bad(missing, f"{table}.{col} is empty")
    return v


def _concept(row: Mapping[str, str | None], col: str, table: str) -> str | None:
    try:
        v = decimal_id(row.get(col))
    except (ValueError, OverflowError):
        raise _Bad(R_MALFORMED_CODE, f"{table}.{col} is not an integer concept id") from None
    return None if v in (None, "0") else v  # 0 = "no matching concept" in OMOP


def _text(row: Mapping[str, str | None], col: str) -> str | None:
    v = row.get(col)
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _time(row: Mapping[str, str | None], ctx: ParseContext, table: str, *cols: str) -> int:
    for col in cols:
        v = _text(row, col)
        if v is None:
            continue
        try:
            t = parse_datetime_us(v)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, f"{table}.{col} is not a date/datetime") from None
        if t > ctx.now_us:
            raise _Bad(R_FUTURE_DATE, f"{table}.{col} is in the future")
        return t
    raise _Bad(R_MISSING_DATE, f"{table} has none of " + ", ".join(cols))


def _number(row: Mapping[str, str | None], col: str, table: str) -> float | None:
    v = _text(row, col)
    if v is None:
        return None
    try:
        f = float(v)
    except ValueError:
        raise _Bad(R_INVALID_VALUE, f"{table}.{col} is not a number") from None
    if f != f or f in (float("inf"), float("-inf")):
        raise _Bad(R_INVALID_VALUE, f"{table}.{col} is not a finite number")
    return f


def parse_omop_row(table: str, row: Mapping[str, str | None], ctx: ParseContext,
                   malformed: bool = False) -> ParsedRecord:
    """Parse one row of CDM ``table``. Never raises for bad data: bad rows come back quarantined.

    ``malformed``: the reader saw more or fewer fields than the header (a cut-off extract);
    such a row is quarantined ``malformed_line`` whatever its surviving fields say.
    """
    parser = _PARSERS.get(table)
    if parser is None:
        return ignored(table, I_UNSUPPORTED_TABLE, f"table {table} is not ingested")
    # death has no id of its own: CDM 5.4 allows one row per person.
    id_col = "person_id" if table in ("person", "death") else f"{table}_id"
    ref = None
    if malformed:
        try:
            rid = decimal_id(row.get(id_col))
            ref = ctx.hash(f"{table}/{rid}") if rid is not None else None
        except (ValueError, OverflowError):
            pass
        return quarantine(table, R_MALFORMED_LINE,
                          f"{table} row has a different number of fields than the header", ref)
    try:
        rid = _id(row, id_col, table, R_MISSING_ID)
        ref = ctx.hash(f"{table}/{rid}")
        rec = parser(row, ctx, table, rid)
    except _Bad as bad:
        return quarantine(table, bad.reason, bad.detail, ref)
    if rec.source_ref is None:
        rec.source_ref = ref
    return rec


def _person(row: Mapping[str, str | None], ctx: ParseContext, table: str, pid: str) -> ParsedRecord:
    birth = None
    bdt = _text(row, "birth_datetime")
    try:
        if bdt is not None:
            birth = parse_date(bdt)
        elif _text(row, "year_of_birth") is not None:
            y = int(float(_text(row, "year_of_birth") or ""))
            m = int(float(_text(row, "month_of_birth") or 1))
            d = int(float(_text(row, "day_of_birth") or 1))
            birth = dt.date(y, m, d)
    except (ValueError, TypeError, OverflowError):
        raise _Bad(R_INVALID_DATE, "person birth date columns do not form a date") from None
    if birth is not None and birth > ctx.today:
        raise _Bad(R_FUTURE_DATE, "person birth date is in the future")
    gc = _text(row, "gender_concept_id")
    sex = _GENDER_CONCEPTS.get(gc or "") or _GENDER_VALUES.get((_text(row, "gender_source_value") or "").lower(), "U")
    mrn = _text(row, "person_source_value")
    return ParsedRecord(OK, table, patient_key=ctx.hash(pid), is_patient=True, birth_date=birth, sex=sex,
                        mrn_key=ctx.hash(mrn_source_id(mrn)) if mrn is not None else None)


def _day(row: Mapping[str, str | None], ctx: ParseContext, table: str, *cols: str) -> dt.date:
    us = _time(row, ctx, table, *cols)
    return (dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(microseconds=us)).date()


def _death(row: Mapping[str, str | None], ctx: ParseContext, table: str, pid: str) -> ParsedRecord:
    death = _day(row, ctx, table, "death_datetime", "death_date")
    return ParsedRecord(OK, table, patient_key=ctx.hash(pid), death_date=death)


def _observation_period(row: Mapping[str, str | None], ctx: ParseContext, table: str,
                        rid: str) -> ParsedRecord:
    pkey = _subject(row, ctx, table)
    start = _day(row, ctx, table, "observation_period_start_date")
    end_text = _text(row, "observation_period_end_date")
    end = None
    if end_text is not None:
        try:
            end = parse_date(end_text)
        except (ValueError, TypeError, OverflowError):
            raise _Bad(R_INVALID_DATE, f"{table}.observation_period_end_date is not a date") from None
        if end < start:
            raise _Bad(R_INVALID_PERIOD, f"{table}.observation_period_end_date is before its start date")
    # An end after the export is the ETL's "still observed": kept as given (the as-of day
    # is never after the export in a real run).
    return ParsedRecord(OK, table, patient_key=pkey, period_start=start, period_end=end)


def _subject(row: Mapping[str, str | None], ctx: ParseContext, table: str) -> str:
    return ctx.hash(_id(row, "person_id", table, R_MISSING_SUBJECT))


def _visit(row: Mapping[str, str | None], ctx: ParseContext, table: str, rid: str) -> ParsedRecord:
    pkey = _subject(row, ctx, table)
    t = _time(row, ctx, table, "visit_start_datetime", "visit_start_date")
    concept = _concept(row, "visit_concept_id", table)
    ev = Event(t, KIND_ENCOUNTER, SYSTEM_OMOP_CONCEPT if concept else None, concept, None, None,
               "affirmed", [])
    return ParsedRecord(OK, table, patient_key=pkey, events=[ev])


_VOCABULARY_SYSTEMS = {"SNOMED": SYSTEM_SNOMED, "ICD10CM": SYSTEM_ICD10CM, "ICD9CM": SYSTEM_ICD9CM}


def _source_code(src: str | None) -> tuple[str | None, str | None]:
    """(system, code) of a condition_source_value: ICD-9-CM, ICD-10-CM (validated), SNOMED CT, or none."""
    if src is None:
        return None, None
    if looks_like_icd9cm(src):
        return SYSTEM_ICD9CM, normalise_icd9cm(src)
    if normalise_icd10cm(src) is not None:
        code, reason = parse_icd10cm(src)
        if code is None:
            raise _Bad(reason or R_MALFORMED_CODE,
                       "condition_occurrence.condition_source_value is ICD-10-CM-shaped but "
                       "not in the ICD-10-CM code set")
        return SYSTEM_ICD10CM, code
    if is_snomed_concept_id(src):
        # ETL-Synthea and most SNOMED-native sources put the SNOMED code here.
        return SYSTEM_SNOMED, src
    return None, None


def _condition(row: Mapping[str, str | None], ctx: ParseContext, table: str, rid: str) -> ParsedRecord:
    pkey = _subject(row, ctx, table)
    src_system, src_code = _source_code(_text(row, "condition_source_value"))
    source_concept = _concept(row, "condition_source_concept_id", table)
    standard = _concept(row, "condition_concept_id", table)
    flag = _text(row, "_concept_standard")
    if standard is not None and flag is not None and flag != "S":
        # A non-standard id where the CDM wants a standard one: treat it as a source concept.
        source_concept, standard = source_concept or standard, None
    if standard is None and _text(row, "_maps_to"):
        standard = min((_text(row, "_maps_to") or "").split(), key=int)
    # Standard concept first (with descendants from concept_ancestor), then the source.
    groups: list[str] = []
    std_system = _VOCABULARY_SYSTEMS.get(_text(row, "_concept_vocabulary") or "") \
        if standard is not None and standard == _concept(row, "condition_concept_id", table) else None
    std_code = _text(row, "_concept_code") if std_system else None
    if standard is not None:
        groups = ctx.groups.groups_for(SYSTEM_OMOP, standard)
        if std_system:
            groups += [g for g in ctx.groups.groups_for(std_system, std_code) if g not in groups]
    if not groups:
        groups = ctx.groups.groups_for(src_system, src_code)
        groups += [g for g in ctx.groups.groups_for(SYSTEM_OMOP, source_concept) if g not in groups]
    groups = [g for g in ctx.groups.names if g in groups]
    # The event's code: an ICD source value (what the token vocabulary speaks), else the
    # standard concept's own code, else its id, else the source's SNOMED code or concept id.
    if src_system in (SYSTEM_ICD10CM, SYSTEM_ICD9CM):
        system, code = src_system, src_code
    elif std_system and std_code:
        system, code = std_system, std_code
    elif standard is not None:
        system, code = SYSTEM_OMOP, standard
    elif src_system is not None:
        system, code = src_system, src_code
    elif source_concept is not None:
        system, code = SYSTEM_OMOP, source_concept
    else:
        if _text(row, "condition_source_value") is not None:
            raise _Bad(R_MALFORMED_CODE, "condition_occurrence.condition_source_value is not an ICD "
                       "or SNOMED CT code and there is no concept id")
        raise _Bad(R_MISSING_CODE, "condition_occurrence has no source value and no concept id")
    t = _time(row, ctx, table, "condition_start_datetime", "condition_start_date")
    # OMOP has no recorded time: the record is known at its date (the end of that day).
    known = t if _text(row, "condition_start_datetime") else t + 86_400_000_000 - 1
    ev = dx_event(ctx, t, KIND_DX, system, code, "affirmed", known,
                  int(standard) if standard is not None else None, groups)
    return ParsedRecord(OK, table, patient_key=pkey, events=[ev])


def _valued(row: Mapping[str, str | None], ctx: ParseContext, table: str, rid: str) -> ParsedRecord:
    pkey = _subject(row, ctx, table)
    src = _text(row, f"{table}_source_value")
    if src is not None and _LOINC.fullmatch(src):
        system, code = SYSTEM_LOINC, src
    else:
        system, code = SYSTEM_OMOP_CONCEPT, _concept(row, f"{table}_concept_id", table)
    if code is None:
        raise _Bad(R_MISSING_CODE, f"{table} has no LOINC source value and no concept id")
    t = _time(row, ctx, table, f"{table}_datetime", f"{table}_date")
    value = _number(row, "value_as_number", table)
    if value is None:
        has_other = _concept(row, "value_as_concept_id", table) is not None or \
            _text(row, "value_as_string") is not None
        # OMOP observation rows are often facts without a value (allergies, history items):
        # valid CDM, so counted by rule; a measurement without any value is a broken record.
        if has_other or table == "observation":
            return ignored(table, I_NON_NUMERIC_VALUE, f"{table} has no value_as_number")
        raise _Bad(R_MISSING_VALUE, f"{table}.value_as_number is empty")
    ev = Event(t, KIND_OBS, system, code, value, _text(row, "unit_source_value"), "affirmed", [])
    return ParsedRecord(OK, table, patient_key=pkey, events=[ev])


def _note(row: Mapping[str, str | None], ctx: ParseContext, table: str, rid: str) -> ParsedRecord:
    pkey = _subject(row, ctx, table)
    t = _time(row, ctx, table, "note_datetime", "note_date")
    events = [dx_event(ctx, t, KIND_DX_TEXT, system, code, assertion)
              for system, code, assertion in ctx.extractor(row.get("note_text"))]
    return ParsedRecord(OK, table, patient_key=pkey, events=events)


_PARSERS = {
    "person": _person,
    "visit_occurrence": _visit,
    "condition_occurrence": _condition,
    "measurement": _valued,
    "observation": _valued,
    "note": _note,
    "death": _death,
    "observation_period": _observation_period,
}
