"""The synthetic cohort as the formats render it (``Cohort``), the simulation's calendar, and the
ground truth read back from its records (first confirmed diagnosis per concept group)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timezone

import numpy as np

from synth.emr_codes import TRUTH_GROUP, ConditionCode

START_MONTH = date(2018, 1, 1)
MONTHS = 96  # 2018-01 .. 2025-12
DATA_END = date(2025, 12, 31)  # last day any good record is dated
LAST_INSTANT = datetime(2025, 12, 31, 23, 0, tzinfo=timezone.utc)
# Most patients register (first visit) during the first 18 months; LATE_REGISTRATION_SHARE
# register later, up to the last month (some after any as-of date one may pick).
REGISTRATION_MONTHS = 18
# ICD-10-CM replaced ICD-9-CM in US claims and records on this day.
ICD10_START = date(2015, 10, 1)
NEVER = 10**6  # onset month of a condition that never starts


def month_start(m: int) -> date:
    """First day of simulation month ``m`` (0 = 2018-01)."""
    y, mo = divmod(m, 12)
    return date(START_MONTH.year + y, mo + 1, 1)


def iso_z(dt: datetime) -> str:
    """``2019-03-04T09:15:00Z``: a UTC time as FHIR instants are written."""
    return dt.isoformat().replace("+00:00", "Z")


# A condition record: (patient, encounter or -1 when migrated from an earlier system without
# one, onset (None: the encounter's start; else ISO date, "YYYY-MM" or "YYYY"), category, code,
# style, verification, clinical (None: absent), recorded (ISO instant), abatement (ISO or None),
# key). style: snomed | icd10 | icd10+snomed | icd9. verification: FHIR condition-ver-status.
CondRec = tuple[int, int, "str | None", str, ConditionCode, str, str, "str | None", str,
                "str | None", str]


@dataclass
class Cohort:
    """Everything the formats render. Lists are in patient order, then time order."""

    patients: int
    seed: int
    sex: list[str]                 # female | male | unknown
    birth_date: list[date]
    given: list[str]
    family: list[str]
    mrn: list[str]
    smoking: list[int]             # index into SMOKING_VALUES
    first_month: list[int] = field(default_factory=list)      # registration month
    registration_date: list[date | None] = field(default_factory=list)  # first visit day
    death_date: list[date | None] = field(default_factory=list)
    left_care: list[bool] = field(default_factory=list)
    # (patient, start_utc, end_utc, class) class: AMB | EMER | IMP
    encounters: list[tuple[int, datetime, datetime, str]] = field(default_factory=list)
    conditions: list[CondRec] = field(default_factory=list)
    # (patient, encounter, kind, value, value2) kind: hba1c glucose bmi bp_panel (value2 =
    # diastolic) sbp dbp egfr_mdrd egfr_ckdepi ntprobnp smoking
    observations: list[tuple[int, int, str, float, float]] = field(default_factory=list)
    # (patient, encounter, note text)
    notes: list[tuple[int, int, str]] = field(default_factory=list)
    # Planted mentions in the notes: (note index, group, assertion, start, end) with
    # start/end character offsets into the note text.
    mentions: list[tuple[int, str, str, int, int]] = field(default_factory=list)
    # head -> onset month per patient (-1: before the start, NEVER: none)
    onset_month: dict[str, np.ndarray] = field(default_factory=dict)
    # head -> day the incident diagnosis was made (the diagnosing visit), else None
    onset_date: dict[str, list[date | None]] = field(default_factory=dict)
    # key -> per patient clinical onset as written on the record ("YYYY[-MM[-DD]]"), else None
    truth_onset: dict[str, list[str | None]] = field(default_factory=dict)

    # Last day the hospital follows each patient: death, the day the last record of those who
    # left care became known, else DATA_END.
    observation_end: list[date] = field(default_factory=list)


def countable(verification: str) -> bool:
    """Whether a coded diagnosis of this verification status makes the patient a case."""
    return verification == "confirmed"


def first_known(c: Cohort) -> dict[str, list[date | None]]:
    """Per concept group, the day each patient's first confirmed diagnosis was recorded."""
    out: dict[str, list[date | None]] = {g: [None] * c.patients for g in set(TRUTH_GROUP.values())}
    for rec in c.conditions:
        group = TRUTH_GROUP.get(rec[10])
        if group is None or not countable(rec[6]):
            continue
        d = date.fromisoformat(rec[8][:10])
        cur = out[group][rec[0]]
        if cur is None or d < cur:
            out[group][rec[0]] = d
    return out
