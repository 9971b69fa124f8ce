"""Tiny EMR inputs for the features tests (imported by the test modules): events + patients
written with the lake schemas and committed, as the ingest job leaves them. Keys are
synthetic pseudonym-shaped hex."""
from __future__ import annotations

import datetime as dt
import hashlib
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from lake.commit import atomic_partition
from lake.paths import LakePaths
from lake.schemas import EVENTS, PATIENTS

UTC = dt.timezone.utc
AS_OF = dt.date(2024, 6, 30)
LOOKBACK_DAYS = 400
MAX_TOKENS = 8
HORIZON_DAYS = 365

DX_CODES = ["E11.9", "E11", "e11.65", " E11.65", "N18.3", "N18", "I50.9", "i50.21", "Z99", "I10", "ZZZ.9",
            "", None, "U07.1", "C7A.0"]
ICD9_CODES = ["250.00", "428.0", "401.9", "585.3", "V70.0"]
# Synthea's SNOMED CT codes (T2D, CKD 4, chronic CHF, viral pharyngitis: in no group) and OMOP
# standard concept ids (T2D, heart failure, a concept in no group).
SNOMED_CODES = ["44054006", "431857002", "88805009", "195662009"]
OMOP_CODES = ["201826", "316139", "4112343"]
LOINC = [("4548-4", [5.69, 5.7, 6.49, 6.5, 12.0, None, float("nan"), -1.0], ["%", None, " % ", "mmol/mol"]),
         ("2345-7", [69.9, 70.0, 99.0, 125.9, 126.0, 250.0, 5.5, 11.2], ["mg/dL", "mmol/L", " MG/DL", None, "g/L"]),
         ("39156-5", [17.0, 24.9, 25.0, 31.0, 45.0], ["kg/m2", None, "lb/in2"]),
         ("62238-1", [95.0, 60.0, 59.9, 44.0, 29.0, 10.0], ["mL/min/{1.73_m2}", None]),
         ("8480-6", [118.0, 125.0, 135.0, 150.0, 185.0], ["mm[Hg]", "mmHg"]),
         ("1234-5", [1.0], ["x"])]
ASSERTIONS = ["affirmed", "affirmed", "affirmed", "negated", "history", "family", None, "uncertain"]


def key(i: int | str) -> str:
    """A pseudonym-shaped key for synthetic patient i (no real identifier involved)."""
    return hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()[:32]


def _ts(day: dt.date, seconds: int = 0, micros: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=UTC) + dt.timedelta(seconds=seconds,
                                                                                 microseconds=micros)


def random_event(rng: random.Random, patient_key: str | None, when: dt.datetime | None) -> dict:
    kind = rng.choice(["dx", "dx", "dx_text", "dx_text", "obs", "obs", "encounter", "procedure", None])
    system, code, value, unit, assertion = None, None, None, None, "affirmed"
    if kind in ("dx", "dx_text"):
        r = rng.random()
        system = "icd10cm" if r < 0.6 else "icd9cm" if r < 0.72 else "snomed" if r < 0.9 else "omop"
        code = rng.choice({"icd10cm": DX_CODES, "icd9cm": ICD9_CODES, "snomed": SNOMED_CODES,
                           "omop": OMOP_CODES}[system])
        assertion = rng.choice(ASSERTIONS)
    elif kind == "obs":
        code, values, units = rng.choice(LOINC)
        system = "loinc" if rng.random() < 0.95 else "local"
        value, unit = rng.choice(values), rng.choice(units)
    elif kind == "encounter":
        system, code = "encounter-class", rng.choice(["AMB", "IMP", None])
    # Late recording: some records become known long after their clinical time (a problem-list
    # entry with an old onset), some only a few hours later; a few carry no known time at all.
    known = when
    r = rng.random()
    if when is not None and r < 0.2:
        known = when + dt.timedelta(seconds=rng.randrange(1, 3000 * 86400))
    elif when is not None and r < 0.3:
        known = when + dt.timedelta(seconds=rng.randrange(1, 86400))
    elif r < 0.33:
        known = None
    return {"patient_key": patient_key, "event_time": when, "known_time": known, "kind": kind,
            "code_system": system, "code": code, "value": value, "unit": unit, "assertion": assertion,
            "code_groups": groups_of(kind, system, code), "concept_id": None, "source": "fhir",
            "source_ref": hashlib.sha256(str(rng.random()).encode()).hexdigest()[:32]}


def groups_of(kind: str | None, system: str | None, code: str | None) -> list[str]:
    """The groups ingest puts on a diagnosis (the one evaluator over the shipped concept sets)."""
    from preprocessing.code_groups import groups_for

    return groups_for(system, code) if kind in ("dx", "dx_text") else []


def random_inputs(seed: int = 7, n_patients: int = 40) -> tuple[pa.Table, pa.Table, dict]:
    """Events and patients with every edge the features rules care about.

    Returns the tables and a dict of facts the tests check the ledgers against.
    """
    rng = random.Random(seed)
    end = _ts(AS_OF + dt.timedelta(days=1))
    start = _ts(AS_OF - dt.timedelta(days=LOOKBACK_DAYS))
    edges = [end - dt.timedelta(microseconds=1), end, start, start - dt.timedelta(microseconds=1),
             _ts(AS_OF), _ts(AS_OF + dt.timedelta(days=HORIZON_DAYS), 86399, 999999),
             _ts(AS_OF + dt.timedelta(days=HORIZON_DAYS + 1)), _ts(dt.date(1969, 12, 31), 3600),
             _ts(AS_OF + dt.timedelta(days=HORIZON_DAYS))]
    patients, events = [], []
    facts = {"no_birth_date": 0, "duplicate_rows": 0, "born_after": 0, "unknown_patient_events": 0,
             "no_time_events": 0, "null_key_events": 0}
    for i in range(n_patients):
        k = key(i)
        birth = dt.date(1930, 1, 1) + dt.timedelta(days=rng.randrange(0, 30000))
        if i == 3:
            birth = None
            facts["no_birth_date"] += 1
        if i == 4:
            birth = AS_OF + dt.timedelta(days=10)
            facts["born_after"] += 1
        if i == 5:
            birth = AS_OF  # born on the as-of day: age 0, still a patient
        sex = rng.choice(["F", "M", "U", "f", " m", None, "X"])
        patients.append({"patient_key": k, "birth_date": birth, "sex": sex, "source": "fhir"})
        if i == 6:  # the same key twice: ingest should not do this; the job must not guess
            patients.append({"patient_key": k, "birth_date": birth, "sex": "F", "source": "omop"})
            facts["duplicate_rows"] += 2
        n_events = 0 if i == 7 else rng.randrange(1, 30)
        for _ in range(n_events):
            if rng.random() < 0.15:
                when = rng.choice(edges)
            else:
                when = end + dt.timedelta(seconds=rng.randrange(-(LOOKBACK_DAYS + 200) * 86400, 500 * 86400))
            if rng.random() < 0.01:
                when = None
            events.append(random_event(rng, k, when))
    # Events whose patient is not in the patient table, and events with no key at all.
    for _ in range(5):
        events.append(random_event(rng, key("ghost"), end - dt.timedelta(days=3)))
        facts["unknown_patient_events"] += 1
    for _ in range(2):
        events.append(random_event(rng, None, end - dt.timedelta(days=3)))
        facts["null_key_events"] += 1
    patients.append({"patient_key": None, "birth_date": dt.date(1980, 1, 1), "sex": "F", "source": "fhir"})
    # One patient with a known label story: T2D first coded the day after the as-of date.
    k = key("incident")
    patients.append({"patient_key": k, "birth_date": dt.date(1970, 5, 5), "sex": "M", "source": "fhir"})
    for when, kind, code, assertion in [
            (end - dt.timedelta(days=30), "dx", "I10", "affirmed"),
            (end - dt.timedelta(days=20), "dx_text", "E11.9", "negated"),  # not prevalent: negated
            (end, "dx", "E11.9", "affirmed"),  # first second after the as-of day: incident
            (end + dt.timedelta(days=400), "encounter", None, "affirmed")]:
        events.append({"patient_key": k, "event_time": when, "known_time": when, "kind": kind,
                       "code_system": "icd10cm", "code": code, "value": None, "unit": None, "assertion": assertion,
                       "code_groups": groups_of(kind, "icd10cm", code), "source": "fhir", "source_ref": None})
    # Prevalence stories: T2D coded six years before the as-of date (long before the lookback
    # window: still prevalent, and its timeline is empty); HF coded in the last microsecond of
    # the as-of day (prevalent); CKD only as a family mention (not prevalent).
    # SNOMED-coded stories (Synthea): T2D and CKD 4 recorded years ago (prevalent); T2D with an
    # onset six years back but recorded only after the as-of day (not prevalent, and incident:
    # it became known in the horizon); an OMOP heart-failure concept resolved (history) but
    # first recorded in the horizon (incident).
    for name, when, known, kind, system, code, assertion in [
            ("long_ago", end - dt.timedelta(days=6 * 365), None, "dx", "icd10cm", "E11.9", "affirmed"),
            ("last_us", end - dt.timedelta(microseconds=1), None, "dx", "icd10cm", "I50.9", None),
            ("last_us", end - dt.timedelta(days=2), None, "dx_text", "icd10cm", "N18.3", "family"),
            ("synthea", end - dt.timedelta(days=3000), end - dt.timedelta(days=2990), "dx", "snomed", "44054006",
             "affirmed"),
            ("synthea", end - dt.timedelta(days=900), end - dt.timedelta(days=900), "dx", "snomed", "431857002",
             "history"),
            ("late", end - dt.timedelta(days=6 * 365), end + dt.timedelta(days=10), "dx", "snomed", "44054006",
             "affirmed"),
            ("late", end + dt.timedelta(days=200), end + dt.timedelta(days=201), "dx", "omop", "316139", "history"),
            ("late", end + dt.timedelta(days=400), None, "encounter", None, None, "affirmed")]:
        k = key(name)
        if not any(p["patient_key"] == k for p in patients):
            patients.append({"patient_key": k, "birth_date": dt.date(1950, 2, 2), "sex": "F", "source": "omop"})
        events.append({"patient_key": k, "event_time": when, "known_time": known or when, "kind": kind,
                       "code_system": system, "code": code, "value": None, "unit": None, "assertion": assertion,
                       "code_groups": groups_of(kind, system, code), "source": "omop", "source_ref": None})
    facts["no_time_events"] = sum(1 for e in events if e["event_time"] is None and e["patient_key"] is not None)
    return pa.Table.from_pylist(events, schema=EVENTS), pa.Table.from_pylist(patients, schema=PATIENTS), facts


def write_committed(path: Path, table: pa.Table, n_files: int = 2, manifest: dict | None = None) -> None:
    """Write ``table`` as a committed lake partition (several files, as Spark would)."""
    with atomic_partition(path, manifest or {"run_id": "test-ingest"}) as staging:
        step = max(1, -(-table.num_rows // n_files))
        for i, off in enumerate(range(0, max(table.num_rows, 1), step)):
            pq.write_table(table.slice(off, step), staging / f"part-{i:05d}.parquet")


def always_observed(patients: pa.Table) -> pa.Table:
    """One open observation period from 1900 for every keyed patient row: nobody is left out
    of the as-of population by observation (the population rules have their own tests)."""
    from lake.schemas import OBSERVATION_PERIODS

    keys = sorted({k for k in patients.column("patient_key").to_pylist() if k is not None})
    return pa.Table.from_pylist([{"patient_key": k, "start_date": dt.date(1900, 1, 1), "end_date": None,
                                  "source": "test"} for k in keys], schema=OBSERVATION_PERIODS)


def write_inputs(lake_root: Path, events: pa.Table, patients: pa.Table,
                 periods: pa.Table | None = None) -> LakePaths:
    paths = LakePaths(lake_root)
    write_committed(paths.events, events)
    write_committed(paths.patients, patients, n_files=1)
    write_committed(paths.observation_periods, always_observed(patients) if periods is None else periods,
                    n_files=1)
    return paths


def features_settings(root: Path, **overrides):
    from conf.settings import load_settings

    merged = {"lake.root": str(root), "spark.master": "local[2]", "spark.shuffle_partitions": 2,
              "features.lookback_days": LOOKBACK_DAYS, "features.max_tokens": MAX_TOKENS,
              "features.horizon_days": HORIZON_DAYS}
    merged.update(overrides)
    return load_settings(merged)
