"""The parsed-record contract shared by the FHIR and OMOP parsers.

A parser turns one raw record (an NDJSON line, an OMOP row) into exactly one
:class:`ParsedRecord`: accepted (``ok``, with zero or more events, or the
patient's demographics), ``quarantine`` (with a machine-readable reason), or
``ignored`` by a documented rule (e.g. ``unsupported_resource``). One record
in, one record out is what makes the ingest ledger balance.

Everything here is already pseudonymised: patient keys and record refs are
keyed hashes (lake.keys.pseudonymise); no raw ids, names or note text.

Pure: numpy/pyarrow only; no Spark, Ray or Airflow.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pyarrow as pa

from lake.schemas import UTC_TS
from preprocessing.code_groups import CodeGroups
from preprocessing.notes import NoteExtractor

OK = "ok"
QUARANTINE = "quarantine"
IGNORED = "ignored"

# Quarantine reason codes (machine-readable; documented in docs and the summary).
R_MALFORMED_JSON = "malformed_json"
R_MALFORMED_LINE = "malformed_line"     # a CSV row with more or fewer fields than its header
R_MISSING_RESOURCE_TYPE = "missing_resource_type"
R_MISSING_ID = "missing_id"
R_INVALID_ID = "invalid_id"
R_MISSING_SUBJECT = "missing_subject"
R_INVALID_SUBJECT = "invalid_subject"
R_UNKNOWN_PATIENT = "unknown_patient"
R_DUPLICATE_ID = "duplicate_id"
R_MISSING_DATE = "missing_date"
R_INVALID_DATE = "invalid_date"
R_FUTURE_DATE = "future_date"
R_MISSING_CODE = "missing_code"
R_MALFORMED_CODE = "malformed_code"
R_MISSING_VALUE = "missing_value"
R_INVALID_VALUE = "invalid_value"
R_MISSING_ATTACHMENT = "missing_attachment"
R_UNDECODABLE_ATTACHMENT = "undecodable_attachment"
R_INVALID_PERIOD = "invalid_period"     # an observation period that ends before it starts

# Ignore rules (counted in the ledger's ``ignored``, never silent).
I_UNSUPPORTED_RESOURCE = "unsupported_resource"
I_UNSUPPORTED_TABLE = "unsupported_table"
I_BLANK_LINE = "blank_line"
I_ENTERED_IN_ERROR = "entered_in_error"
I_NON_NUMERIC_VALUE = "non_numeric_value"
I_UNSUPPORTED_ATTACHMENT = "unsupported_attachment"


class Event(NamedTuple):
    """One row of LAKE/emr/events, minus the record-level columns (patient_key, source, source_ref)."""

    event_time_us: int          # microseconds since the epoch, UTC (clinical time)
    kind: str
    code_system: str | None
    code: str | None
    value: float | None
    unit: str | None
    assertion: str
    code_groups: list[str]
    known_time_us: int | None = None   # when the record became known; None: the clinical time
    concept_id: int | None = None      # OMOP standard concept id


@dataclass
class ParsedRecord:
    """The outcome of parsing one raw record."""

    status: str                      # ok | quarantine | ignored
    resource_type: str               # FHIR resource type or OMOP table
    reason: str | None = None        # quarantine reason or ignore rule
    detail: str | None = None        # short, identifier-free explanation
    source_ref: str | None = None    # keyed hash of "<type>/<id>" (the dedup key)
    patient_key: str | None = None
    is_patient: bool = False         # a patients-table row (birth_date, sex)
    birth_date: dt.date | None = None
    sex: str | None = None
    events: list[Event] = field(default_factory=list)
    # Population facts (patients table, observation periods): FHIR Patient.deceased[x] and
    # the MR identifier on the patient row; an OMOP death row carries death_date alone; an
    # OMOP observation_period row carries period_start (and period_end, NULL = open).
    death_date: dt.date | None = None
    mrn_key: str | None = None
    period_start: dt.date | None = None
    period_end: dt.date | None = None


def quarantine(resource_type: str, reason: str, detail: str,
               source_ref: str | None = None) -> ParsedRecord:
    """A quarantined record; ``detail`` must name fields, never values."""
    return ParsedRecord(QUARANTINE, resource_type, reason, detail, source_ref)


def ignored(resource_type: str, rule: str, detail: str | None = None,
            source_ref: str | None = None) -> ParsedRecord:
    """A record not carried forward by a documented rule."""
    return ParsedRecord(IGNORED, resource_type, rule, detail, source_ref)


@dataclass
class ParseContext:
    """Everything a parser needs besides the record: the key, the notes pipeline, the code groups, now."""

    key: bytes
    extractor: NoteExtractor
    groups: CodeGroups
    now_us: int                      # records dated after this are future_date

    def hash(self, source_id: str) -> str:
        """Keyed hash of a source identifier: exactly lake.keys.pseudonymise, faster.

        The HMAC's keyed state is built once and copied per id; patient ids repeat on
        every record of a patient, so their hashes are memoised (bounded).
        """
        got = self._memo.get(source_id)
        if got is None:
            h = self._hmac.copy()
            h.update(str(source_id).encode("utf-8"))
            got = h.hexdigest()[:32]
            if len(self._memo) >= 200_000:
                self._memo.clear()
            self._memo[source_id] = got
        return got

    def __post_init__(self) -> None:
        self._hmac = hmac.new(self.key, digestmod=hashlib.sha256)
        self._memo: dict[str, str] = {}

    @property
    def today(self) -> dt.date:
        return (_EPOCH + dt.timedelta(microseconds=self.now_us)).date()


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_ONE_US = dt.timedelta(microseconds=1)


def now_us() -> int:
    """The current time as microseconds since the epoch, UTC."""
    return (dt.datetime.now(dt.timezone.utc) - _EPOCH) // _ONE_US


def parse_datetime_us(value: object) -> int:
    """A FHIR dateTime/instant/date or OMOP date/datetime as microseconds since the epoch, UTC.

    Partial dates (``2019``, ``2019-03``) and dates without a time mean the
    start of that period at midnight UTC; a time without an offset is read as
    UTC; offsets are converted. Raise ValueError for anything else.
    """
    if not isinstance(value, str):
        raise ValueError("not a string")
    s = value.strip()
    n = len(s)
    if n == 4 and s.isdigit():
        d = dt.datetime(int(s), 1, 1, tzinfo=dt.timezone.utc)
    elif n == 7 and s[4] == "-":
        d = dt.datetime(int(s[:4]), int(s[5:7]), 1, tzinfo=dt.timezone.utc)
    elif n == 8 and s.isdigit():  # OMOP exports sometimes write dates as yyyymmdd
        d = dt.datetime(int(s[:4]), int(s[4:6]), int(s[6:8]), tzinfo=dt.timezone.utc)
    else:
        d = dt.datetime.fromisoformat(s)
        if d.tzinfo is None:
            d = d.replace(tzinfo=dt.timezone.utc)
    return (d - _EPOCH) // _ONE_US


def parse_known_time_us(value: object) -> int:
    """When a FHIR/OMOP date(time) became known: the END of its period, µs since the epoch, UTC.

    ``2019`` → 2019-12-31T23:59:59.999999Z, ``2019-03`` → the last instant of
    March 2019, a date → the last instant of that day; a full dateTime is
    itself. A record dated only "2019" may have been written in December: on an
    as-of day inside 2019 it is not yet known. Raise ValueError like
    :func:`parse_datetime_us`.
    """
    start = parse_datetime_us(value)
    s = str(value).strip()
    n = len(s)
    d = _EPOCH + dt.timedelta(microseconds=start)
    if n == 4:
        end = d.replace(year=d.year + 1)
    elif n == 7:
        end = d.replace(year=d.year + 1, month=1) if d.month == 12 else d.replace(month=d.month + 1)
    elif n in (8, 10):
        end = d + dt.timedelta(days=1)
    else:
        return start
    return (end - _EPOCH) // _ONE_US - 1


def parse_date(value: object) -> dt.date:
    """A date (or the date part of a datetime) as a ``datetime.date``; ValueError otherwise."""
    us = parse_datetime_us(value)
    return (_EPOCH + dt.timedelta(microseconds=us)).date()


def dx_event(ctx: ParseContext, time_us: int, kind: str, system: str, code: str,
             assertion: str = "affirmed", known_time_us: int | None = None,
             concept_id: int | None = None, groups: list[str] | None = None) -> Event:
    """A diagnosis event with its code groups (``ctx.groups.groups_for(system, code)`` unless given)."""
    if groups is None:
        groups = ctx.groups.groups_for(system, code)
    return Event(time_us, kind, system, code, None, None, assertion, groups, known_time_us, concept_id)


# --- Arrow form of a batch of records (what the Spark job moves between Python and the JVM) ---

EVENT_STRUCT = pa.struct([
    ("event_time", UTC_TS),
    ("kind", pa.string()),
    ("code_system", pa.string()),
    ("code", pa.string()),
    ("value", pa.float64()),
    ("unit", pa.string()),
    ("assertion", pa.string()),
    ("code_groups", pa.list_(pa.string())),
    ("known_time", UTC_TS),
    ("concept_id", pa.int64()),
])

RECORDS = pa.schema([
    ("ord", pa.int64()),             # reader order: first of duplicate ids wins
    ("status", pa.string()),
    ("resource_type", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("source_ref", pa.string()),
    ("patient_key", pa.string()),
    ("is_patient", pa.bool_()),
    ("birth_date", pa.date32()),
    ("sex", pa.string()),
    ("events", pa.list_(EVENT_STRUCT)),
    ("death_date", pa.date32()),
    ("mrn_key", pa.string()),
    ("period_start", pa.date32()),
    ("period_end", pa.date32()),
])


def records_to_arrow(records: list[ParsedRecord], ords: list[int]) -> pa.RecordBatch:
    """One RecordBatch (schema :data:`RECORDS`) for parsed records and their reader order."""
    # Built column by column (flat event columns + list offsets): building nested Python
    # dicts for pyarrow costs more than the parsing itself.
    offsets = [0]
    ev_cols: list[list[Any]] = [[] for _ in range(10)]
    groups_offsets = [0]
    groups_flat: list[str] = []
    n = 0
    for r in records:
        for e in r.events:
            for col, v in zip(ev_cols, e):
                col.append(v)
            groups_flat.extend(e.code_groups)
            groups_offsets.append(len(groups_flat))
            n += 1
        offsets.append(n)
    t_us, kind, system, code, value, unit, assertion, _, known_us, concept = ev_cols
    groups = pa.ListArray.from_arrays(pa.array(groups_offsets, pa.int32()),
                                      pa.array(groups_flat, pa.string()))
    structs = pa.StructArray.from_arrays(
        [pa.array(t_us, pa.int64()).cast(UTC_TS), pa.array(kind, pa.string()),
         pa.array(system, pa.string()), pa.array(code, pa.string()),
         pa.array(value, pa.float64()), pa.array(unit, pa.string()),
         pa.array(assertion, pa.string()), groups,
         pa.array(known_us, pa.int64()).cast(UTC_TS), pa.array(concept, pa.int64())],
        fields=list(EVENT_STRUCT))
    events = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs,
                                      type=pa.list_(EVENT_STRUCT))
    cols = [
        pa.array(ords, pa.int64()),
        pa.array([r.status for r in records], pa.string()),
        pa.array([r.resource_type for r in records], pa.string()),
        pa.array([r.reason for r in records], pa.string()),
        pa.array([r.detail for r in records], pa.string()),
        pa.array([r.source_ref for r in records], pa.string()),
        pa.array([r.patient_key for r in records], pa.string()),
        pa.array([r.is_patient for r in records], pa.bool_()),
        pa.array([r.birth_date for r in records], pa.date32()),
        pa.array([r.sex for r in records], pa.string()),
        events,
        pa.array([r.death_date for r in records], pa.date32()),
        pa.array([r.mrn_key for r in records], pa.string()),
        pa.array([r.period_start for r in records], pa.date32()),
        pa.array([r.period_end for r in records], pa.date32()),
    ]
    return pa.RecordBatch.from_arrays(cols, schema=RECORDS)
