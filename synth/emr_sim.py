"""The simulation behind the synthetic EMR: one cohort, rendered as FHIR or OMOP.

Patients live month by month from 2018-01 to 2025-12. Latent HbA1c, BMI, eGFR and
blood pressure drift; chronic conditions start through monthly logistic hazards that
depend on the patient's current state (the planted signal, see ``SIGNAL``); patients die
through a hazard of their own, some leave the hospital's care, some register late; visits
happen at a rate that grows with age and morbidity, and only what is measured, coded or
written at a visit reaches the record. The formats (synth.emr_fhir, synth.emr_omop) only
render the ``Cohort`` this module returns, so both formats carry the same patients and signal.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np

from synth.emr_codes import (ACUTE, CONDITIONS, TRUTH_GROUP, Z_ORAL_HYPOGLYCEMIC,
                                       ConditionCode)
from synth.emr_notes import NoteContext, write_note

START_MONTH = date(2018, 1, 1)
MONTHS = 96  # 2018-01 .. 2025-12
DATA_END = date(2025, 12, 31)  # last day any good record is dated
LAST_INSTANT = datetime(2025, 12, 31, 23, 0, tzinfo=timezone.utc)
# Most patients register (first visit) during the first 18 months; LATE_REGISTRATION_SHARE
# register later, up to the last month (some after any as-of date one may pick).
REGISTRATION_MONTHS = 18
LATE_REGISTRATION_SHARE = 0.10
CHILD_SHARE = 0.12          # patients aged 0-17 at the start
LEAVE_SHARE = 0.05          # patients who leave the hospital's care (records stop, alive)
# ICD-10-CM replaced ICD-9-CM in US claims and records on this day.
ICD10_START = date(2015, 10, 1)

# The planted signal: monthly incidence hazards, logit = intercept + sum(coef * feature).
# Features are the patient's state in that month; docs/synthetic_emr.md spells them out.
SIGNAL: dict[str, dict[str, float]] = {
    "t2d": {"intercept": -4.8, "hba1c_minus_5_9_pct": 4.5, "obese": 0.7, "hypertension": 0.4,
            "age_minus_55_years": 0.015, "hba1c_at_least_6_5": 2.5},
    "ckd": {"intercept": -4.8, "egfr_minus_60": -0.12, "diabetes": 0.8, "hypertension": 0.6},
    "hf": {"intercept": -5.3, "ln_ntprobnp_minus_ln_300": 1.6, "hypertension": 0.5, "cad": 0.5,
           "af": 0.6, "age_minus_60_years": 0.02, "ckd": 0.3, "diabetes": 0.2},
    "htn": {"intercept": -6.6, "age_minus_50_years": 0.04, "bmi_minus_28": 0.08},
    "cad": {"intercept": -8.3, "age_minus_50_years": 0.06, "male": 0.6, "hypertension": 0.5,
            "diabetes": 0.5},
    "af": {"intercept": -8.6, "age_minus_50_years": 0.08, "hypertension": 0.5, "obese": 0.4},
    "stroke": {"intercept": -8.8, "af": 1.4, "age_minus_60_years": 0.05, "hypertension": 0.5},
    "death": {"intercept": -8.0, "age_minus_60_years": 0.08, "hf": 1.0, "ckd": 0.5, "stroke": 0.6},
    # Added to every logit above while the patient is under 18: chronic adult disease and
    # death are rare in children.
    "all": {"under_18_years": -6.0},
}
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


_SYL = ["ka", "ren", "mo", "li", "sa", "dor", "vel", "an", "tri", "bo", "ne", "sul", "ma", "ri",
        "ol", "quin", "ta", "bre", "ys", "lo", "da", "vin", "ae", "tho", "el", "ra", "zan", "mi"]


def _fake_name(rnd: random.Random, parts: int) -> str:
    # Pronounceable nonsense: realistic raw input for ingest to drop, derived from nobody.
    return "".join(rnd.choice(_SYL) for _ in range(parts)).capitalize()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def simulate(patients: int, seed: int) -> Cohort:
    """Simulate ``patients`` patients over 2018-01..2025-12, deterministically per ``seed``."""
    if patients < 1:
        raise ValueError(f"patients must be >= 1 (got {patients}); ask for at least one patient")
    rng = np.random.default_rng(seed)
    n = patients

    # --- who they are -------------------------------------------------------------
    # A hospital population: a younger and an older adult mode, ages 18-88 at the start so
    # that nobody is older than 95 by the end, plus children of every age.
    older = rng.random(n) < 0.6
    age0 = np.where(older, rng.normal(64, 12, n), rng.normal(38, 11, n)).clip(18, 88)
    sex_u = rng.random(n)
    male = sex_u < 0.47
    sex = np.where(male, "male", np.where(sex_u < 0.997, "female", "unknown"))
    bmi0 = rng.normal(28.5, 5.5, n).clip(17, 58)
    bmi_slope = rng.normal(0.1, 0.35, n)                                  # kg/m2 per year
    # Children: drawn from streams of their own so the adults' draws do not move with them.
    crng = np.random.default_rng([seed, 1])
    child = crng.random(n) < CHILD_SHARE
    # Negative: born during the simulation (registered at or after birth).
    age0 = np.where(child, crng.uniform(-6.0, 18.0, n), age0)
    bmi0 = np.where(child, crng.normal(18.0, 3.0, n).clip(12, 35), bmi0)
    bmi_slope = np.where(child, crng.normal(0.3, 0.2, n), bmi_slope)
    a1c0 = (5.05 + 0.03 * (bmi0 - 26) + 0.008 * (age0 - 45) + rng.normal(0, 0.3, n)).clip(4.3, 9)
    a1c_slope = (rng.normal(0.03, 0.07, n) + 0.05 * (bmi0 > 30)).clip(-0.1, 0.4)  # % per year
    a1c_slope = np.where(child, 0.0, a1c_slope)
    egfr0 = (124 - 0.75 * np.maximum(age0, 18) + rng.normal(0, 11, n)).clip(8, 130)
    egfr_slope = rng.normal(0.8, 0.5, n).clip(0, 3)                      # mL/min lost per year
    sbp_base = 112 + 0.35 * (age0 - 40) + 0.5 * (bmi0 - 26) + rng.normal(0, 8, n)
    frailty = rng.normal(0, 0.3, n)                                       # shared risk, all heads
    # Cardiac strain, seen as NT-proBNP: rises for years before heart failure is diagnosed.
    bnp_slope = rng.normal(0.1, 0.15, n).clip(-0.1, 0.8)                  # ln(pg/mL) per year

    # --- prevalent conditions at the start ------------------------------------------
    u = rng.random((8, n))
    htn = u[0] < _sigmoid(-1.4 + 0.06 * (age0 - 50) + 0.08 * (bmi0 - 28))
    dm = (a1c0 >= 6.5) | (u[7] < _sigmoid(-3.0 + 0.04 * (age0 - 50) + 0.1 * (bmi0 - 28)))
    a1c0 = np.where(dm, rng.normal(7.3, 0.6, n).clip(6.5, 10), a1c0)
    cad = u[1] < _sigmoid(-4.2 + 0.07 * (age0 - 55) + 0.6 * male + 0.6 * htn)
    af = u[2] < _sigmoid(-4.6 + 0.09 * (age0 - 60) + 0.4 * htn)
    ckd = (egfr0 < 60) & (u[3] < 0.85)
    hf = u[4] < _sigmoid(-4.8 + 0.06 * (age0 - 60) + 0.9 * htn + cad + af)
    stroke = u[5] < _sigmoid(-5.5 + 0.06 * (age0 - 60) + 1.2 * af)
    hld = u[6] < _sigmoid(-1.2 + 0.04 * (age0 - 50) + 0.05 * (bmi0 - 28))
    del hld  # drawn to keep the stream; hyperlipidemia is decided per patient below
    adult0 = ~child
    htn, dm, cad, af, ckd, hf, stroke = (x & adult0 for x in (htn, dm, cad, af, ckd, hf, stroke))
    a1c0 = np.where(child, a1c0.clip(4.3, 5.6), a1c0)

    onset = {k: np.full(n, NEVER, dtype=np.int64) for k in ("t2d", "ckd", "hf", "htn", "cad", "af",
                                                            "stroke")}
    for k, flag in (("t2d", dm), ("ckd", ckd), ("hf", hf), ("htn", htn), ("cad", cad), ("af", af),
                    ("stroke", stroke)):
        onset[k][flag] = -1
    death_month = np.full(n, NEVER, dtype=np.int64)
    # Registration (first visit), late registration and leaving care: a stream of their own.
    vrng = np.random.default_rng([seed, 3])
    first_month = vrng.integers(0, REGISTRATION_MONTHS, n)
    late = vrng.random(n) < LATE_REGISTRATION_SHARE
    first_month = np.where(late, vrng.integers(REGISTRATION_MONTHS, MONTHS, n), first_month)
    born_month = np.where(age0 < 0, np.ceil(-age0 * 12).astype(np.int64) + 1, 0)
    first_month = np.maximum(first_month, born_month)
    leaves = vrng.random(n) < LEAVE_SHARE
    leave_month = np.where(leaves, first_month + 6 + (vrng.random(n) * MONTHS).astype(np.int64),
                           NEVER)
    leaves = leaves & (leave_month < MONTHS)
    leave_month = np.where(leaves, leave_month, NEVER)
    drng = np.random.default_rng([seed, 2])   # deaths: their own stream

    # --- monthly states and hazards ---------------------------------------------------
    a1c = np.empty((n, MONTHS), dtype=np.float32)
    bmi = np.empty((n, MONTHS), dtype=np.float32)
    egfr = np.empty((n, MONTHS), dtype=np.float32)
    sbp = np.empty((n, MONTHS), dtype=np.float32)
    cur_a1c, cur_bmi, cur_egfr = a1c0.copy(), bmi0.copy(), egfr0.copy()
    treated_a1c = rng.normal(7.0, 0.5, n).clip(6.0, 9.5)
    cur_bnp = (np.log(40) + 0.03 * (age0 - 50) + 0.5 * htn + 0.6 * cad + 0.8 * af
               + rng.normal(0, 0.5, n))
    bnp = np.empty((n, MONTHS), dtype=np.float32)
    child_off = SIGNAL["all"]["under_18_years"]
    for m in range(MONTHS):
        age = age0 + m / 12.0
        minor = child_off * (age < 18)
        has = {k: onset[k] <= m - 1 for k in onset}  # state entering this month
        s = SIGNAL["death"]
        logit = (s["intercept"] + s["age_minus_60_years"] * (age - 60) + s["hf"] * has["hf"]
                 + s["ckd"] * has["ckd"] + s["stroke"] * has["stroke"] + minor)
        # Only registered patients die on the record: the export holds the hospital's patients.
        died = (death_month == NEVER) & (m > first_month) & (drng.random(n) < _sigmoid(logit))
        death_month[died] = m
        alive = death_month > m      # the dead develop nothing new
        obese = cur_bmi >= 30
        hz = rng.random((7, n))
        s = SIGNAL["t2d"]
        logit = (s["intercept"] + s["hba1c_minus_5_9_pct"] * (cur_a1c - 5.9) + s["obese"] * obese
                 + s["hypertension"] * has["htn"] + s["age_minus_55_years"] * (age - 55)
                 + s["hba1c_at_least_6_5"] * (cur_a1c >= 6.5) + frailty + minor)
        new = alive & ~has["t2d"] & (onset["t2d"] == NEVER) & (hz[0] < _sigmoid(logit))
        onset["t2d"][new] = m
        # Diagnosis is made on a lab at or above the 6.5 % threshold.
        cur_a1c = np.where(new, np.maximum(cur_a1c, 6.5) + np.abs(rng.normal(0.5, 0.4, n)), cur_a1c)
        s = SIGNAL["ckd"]
        logit = (s["intercept"] + s["egfr_minus_60"] * (cur_egfr - 60) + s["diabetes"] * has["t2d"]
                 + s["hypertension"] * has["htn"] + frailty + minor)
        new = alive & (onset["ckd"] == NEVER) & (hz[1] < _sigmoid(logit))
        onset["ckd"][new] = m
        s = SIGNAL["hf"]
        logit = (s["intercept"] + s["ln_ntprobnp_minus_ln_300"] * (cur_bnp - np.log(300))
                 + s["hypertension"] * has["htn"] + s["cad"] * has["cad"]
                 + s["af"] * has["af"] + s["age_minus_60_years"] * (age - 60)
                 + s["ckd"] * has["ckd"] + s["diabetes"] * has["t2d"] + frailty + minor)
        new = alive & (onset["hf"] == NEVER) & (hz[2] < _sigmoid(logit))
        onset["hf"][new] = m
        cur_bnp = np.where(new, np.maximum(cur_bnp, np.log(600)) + np.abs(rng.normal(0.5, 0.5, n)),
                           cur_bnp)
        s = SIGNAL["htn"]
        logit = (s["intercept"] + s["age_minus_50_years"] * (age - 50)
                 + s["bmi_minus_28"] * (cur_bmi - 28) + minor)
        onset["htn"][alive & (onset["htn"] == NEVER) & (hz[3] < _sigmoid(logit))] = m
        s = SIGNAL["cad"]
        logit = (s["intercept"] + s["age_minus_50_years"] * (age - 50) + s["male"] * male
                 + s["hypertension"] * has["htn"] + s["diabetes"] * has["t2d"] + minor)
        onset["cad"][alive & (onset["cad"] == NEVER) & (hz[4] < _sigmoid(logit))] = m
        s = SIGNAL["af"]
        logit = (s["intercept"] + s["age_minus_50_years"] * (age - 50)
                 + s["hypertension"] * has["htn"] + s["obese"] * obese + minor)
        onset["af"][alive & (onset["af"] == NEVER) & (hz[5] < _sigmoid(logit))] = m
        s = SIGNAL["stroke"]
        logit = (s["intercept"] + s["af"] * has["af"] + s["age_minus_60_years"] * (age - 60)
                 + s["hypertension"] * has["htn"] + minor)
        onset["stroke"][alive & (onset["stroke"] == NEVER) & (hz[6] < _sigmoid(logit))] = m

        has_dm = onset["t2d"] <= m
        a1c[:, m] = cur_a1c
        bmi[:, m] = cur_bmi
        egfr[:, m] = cur_egfr
        bnp[:, m] = cur_bnp
        new_cardiac = (onset["cad"] == m) | (onset["af"] == m) | (onset["htn"] == m)
        cur_bnp = cur_bnp + bnp_slope / 12 + 0.4 * new_cardiac + rng.normal(0, 0.03, n)
        sbp[:, m] = sbp_base + 0.35 * m / 12 + 12 * (onset["htn"] <= m)
        # Treated diabetics drift back towards their treated level; others keep rising.
        cur_a1c = np.where(has_dm, cur_a1c + 0.15 * (treated_a1c - cur_a1c),
                           cur_a1c + a1c_slope / 12) + rng.normal(0, 0.03, n)
        cur_bmi = cur_bmi + bmi_slope / 12 + rng.normal(0, 0.05, n)
        cur_egfr = (cur_egfr - (egfr_slope + 1.5 * has_dm + 1.0 * (onset["htn"] <= m)) / 12
                    + rng.normal(0, 0.3, n)).clip(5, 140)

    # --- visits --------------------------------------------------------------------
    months = np.arange(MONTHS)
    n_chronic = sum((onset[k][:, None] <= months[None, :]).astype(np.float32) for k in onset)
    age_m = age0[:, None] + months[None, :] / 12.0
    rate = 0.03 + 0.0025 * np.clip(age_m - 40, 0, None) + 0.03 * n_chronic
    visits = rng.poisson(rate).clip(0, 2)
    visits[months[None, :] < first_month[:, None]] = 0
    visits[np.arange(n), first_month] = np.maximum(visits[np.arange(n), first_month], 1)
    for k in ("t2d", "ckd", "hf", "stroke"):
        # An incident diagnosis is made at a visit in its onset month.
        o = onset[k]
        idx = np.nonzero((o >= first_month) & (o < MONTHS))[0]
        visits[idx, o[idx]] = np.maximum(visits[idx, o[idx]], 1)
    # Records stop: nothing from the month of death on, nothing after leaving care. A patient
    # who dies in the month they would have registered never registers.
    visits[months[None, :] >= death_month[:, None]] = 0
    visits[months[None, :] > leave_month[:, None]] = 0

    rnd = random.Random(seed * 1_000_003 + 17)
    cohort = Cohort(
        patients=n, seed=seed, sex=sex.tolist(),
        birth_date=[START_MONTH - timedelta(days=int(a * 365.25) + rnd.randrange(365))
                    if a >= 1 else START_MONTH - timedelta(days=int(a * 365.25))
                    for a in age0.tolist()],
        given=[_fake_name(rnd, 2) for _ in range(n)],
        family=[_fake_name(rnd, rnd.choice((2, 3))) for _ in range(n)],
        mrn=[f"MRN{rnd.randrange(10**8):08d}" for _ in range(n)],
        smoking=[rnd.choices((0, 1, 2), (0.55, 0.28, 0.17))[0] for _ in range(n)],
    )
    cohort.first_month = first_month.tolist()
    cohort.left_care = leaves.tolist()
    ddays = drng.integers(0, 28, n).tolist()
    cohort.death_date = [month_start(int(dm_)) + timedelta(days=dd) if dm_ < MONTHS else None
                         for dm_, dd in zip(death_month.tolist(), ddays)]
    # The dead's onsets after death never happened; children get no adult chronic record.
    cohort.onset_month = {k: v for k, v in onset.items()}
    _visits_to_records(cohort, rnd, visits, first_month, onset, a1c, bmi, egfr, sbp, bnp, age0,
                       child)
    starts: dict[int, date] = {}
    lasts: dict[int, date] = {}
    for p, st, en, _c in cohort.encounters:
        starts.setdefault(p, st.date())
        # A lab result is issued up to two days after the visit.
        lasts[p] = max(lasts.get(p, en.date()), en.date(), (st + timedelta(days=3)).date())
    for r in cohort.conditions:
        lasts[r[0]] = max(lasts.get(r[0], DATA_END), date.fromisoformat(r[8][:10]))
    cohort.registration_date = [starts.get(p) for p in range(n)]
    # Those who left care are followed until their last record is known.
    cohort.observation_end = [cohort.death_date[p] or (min(lasts.get(p, DATA_END), DATA_END)
                                                        if leaves[p] else DATA_END)
                              for p in range(n)]
    return cohort


_CHRONIC = ("htn", "hld", "cad", "af", "t2d", "ckd", "hf")
_TARGETS = ("t2d", "ckd", "hf")
# Share of visits at which a clinician writes a target diagnosis the patient does not (yet)
# have as provisional / differential / unconfirmed, when a marker points at it.
SUSPECT_SHARE = 0.04
REFUTE_SHARE = 0.6          # of those, refuted at the next visit (if still absent)
ENTERED_IN_ERROR_SHARE = 0.006  # per visit: a wrong-chart entry, later marked entered-in-error
LATE_CODING_SHARE = 0.15    # incident diagnoses coded 1-4 months after the diagnosing visit
LEGACY_ICD9_SHARE = 0.5     # early registrants' old conditions also on the migrated ICD-9 list
NOTE_SHARE = 0.2            # visits with a progress note (every incident visit has one)


def _style(rnd: random.Random) -> str:
    """Coding of a condition written from 2018 on: SNOMED CT only (as Synthea and many EHR
    problem lists write it) for the majority, ICD-10-CM (billing) or both for the rest."""
    u = rnd.random()
    return "snomed" if u < 0.6 else ("icd10" if u < 0.8 else "icd10+snomed")


def _partial(d: date, rnd: random.Random) -> str:
    """A past onset as a patient recalls it: full date, year-month or year (valid FHIR)."""
    u = rnd.random()
    if u < 0.1:
        return f"{d.year:04d}"
    if u < 0.3:
        return f"{d.year:04d}-{d.month:02d}"
    return d.isoformat()


def _visits_to_records(c: Cohort, rnd: random.Random, visits: np.ndarray, first_month: np.ndarray,
                       onset: dict[str, np.ndarray], a1c: np.ndarray, bmi: np.ndarray,
                       egfr: np.ndarray, sbp: np.ndarray, bnp: np.ndarray, age0: np.ndarray,
                       child: np.ndarray) -> None:
    onset_l = {k: v.tolist() for k, v in onset.items()}
    a1c_l, bmi_l, egfr_l, sbp_l = a1c.tolist(), bmi.tolist(), egfr.tolist(), sbp.tolist()
    bnp_l = bnp.tolist()
    first_l, age_l, visits_l, child_l = (first_month.tolist(), age0.tolist(), visits.tolist(),
                                         child.tolist())
    onset_date: dict[str, list[date | None]] = {k: [None] * c.patients for k in onset}
    truth_onset: dict[str, list[str | None]] = {k: [None] * c.patients
                                               for k in (*onset, "hld", "obesity")}
    enc_list, cond_list, obs_list, note_list = c.encounters, c.conditions, c.observations, c.notes
    mentions = c.mentions
    rr = rnd.random
    # A stream of its own for what this version adds (statuses, late coding, legacy lists):
    # the draws of the visits, labs and codes above stay where they were.
    xr = random.Random(c.seed * 7_000_003 + 29)
    # Standard normals drawn once from a seeded stream: per-call gauss() dominates otherwise.
    normals = np.random.default_rng(c.seed + 101).standard_normal(int(visits.sum()) * 8 + 16).tolist()
    nz = iter(normals).__next__
    month_starts = [month_start(m) for m in range(MONTHS)]
    ln_250 = math.log(250)
    for p in range(c.patients):
        vrow = visits_l[p]
        death = c.death_date[p]
        # Hyperlipidemia is prevalent-only (no hazard): on the problem list or not.
        hld_flag = (not child_l[p]) and rnd.random() < min(0.9, 0.2 + 0.006 * max(age_l[p] - 35, 0))
        coded: set[str] = set()           # conditions already on this patient's record
        registered = False                # the first visit writes the problem list
        obesity_coded = prediab_coded = False
        stroke_code_month = NEVER
        pending_refute: dict[str, ConditionCode] = {}
        last_ckd: int = -1                # index of the patient's latest CKD record
        # Onsets before registration: a plausible past onset date for the problem list.
        past_onset: dict[str, str] = {}
        past_day: dict[str, date] = {}
        for k in onset_l:
            if onset_l[k][p] < first_l[p]:
                years_ago = rnd.randint(1, 12) if onset_l[k][p] == -1 else 0
                d = month_start(max(onset_l[k][p], 0)) - timedelta(days=365 * years_ago
                                                                    + rnd.randrange(28))
                past_day[k] = d
                past_onset[k] = _partial(d, xr) if years_ago else d.isoformat()
        if hld_flag:
            d = month_start(first_l[p]) - timedelta(days=rnd.randrange(200, 4000))
            past_day["hld"] = d
            past_onset["hld"] = d.isoformat()
        for k, v in past_onset.items():
            truth_onset[k][p] = v
        # Early registrants came over from the hospital's previous system: conditions known
        # before ICD-10-CM are on its migrated list, coded in ICD-9-CM and recorded then.
        if first_l[p] < REGISTRATION_MONTHS:
            for k in ("htn", "hld", "cad", "af", "t2d", "ckd", "hf", "stroke"):
                d = past_day.get(k)
                if d is None or d >= ICD10_START - timedelta(days=60) or xr.random() >= LEGACY_ICD9_SHARE:
                    continue
                rec_day = d + timedelta(days=xr.randrange(0, 60))
                code = (CONDITIONS["ckd"][5] if k == "ckd" else
                        CONDITIONS["stroke_history"][0] if k == "stroke" else _pick(xr, k))
                cond_list.append((p, -1, past_onset[k], "problem-list-item", code, "icd9",
                                  "confirmed", "active", f"{rec_day.isoformat()}T00:00:00Z", None,
                                  "stroke_history" if k == "stroke" else k))
        for m in range(first_l[p], MONTHS):
            nv = vrow[m]
            if not nv:
                continue
            ms = month_starts[m]
            # The month's visits in time order: the first one registers / diagnoses.
            month_visits = sorted(datetime(ms.year, ms.month, 1 + int(rr() * 28), 7 + int(rr() * 11),
                                           5 * int(rr() * 12), tzinfo=timezone.utc)
                                  for _ in range(nv))
            for v, start in enumerate(month_visits):
                new_dx = [k for k in ("t2d", "ckd", "hf", "stroke") if onset_l[k][p] == m
                          and k not in coded] if v == 0 else []
                cls = "AMB"
                if "hf" in new_dx or "stroke" in new_dx:
                    cls = "IMP" if rnd.random() < 0.6 else "EMER"
                elif rr() < 0.05:
                    cls = "EMER"
                end = min(start + (timedelta(days=rnd.randint(2, 6), hours=rnd.randint(0, 6))
                                   if cls == "IMP" else timedelta(minutes=15 + 5 * int(rr() * 15))),
                          LAST_INSTANT)
                e = len(enc_list)
                enc_list.append((p, start, end, cls))
                start_z = iso_z(start)
                active = [k for k in _CHRONIC if (k == "hld" and hld_flag)
                          or (k != "hld" and onset_l[k][p] <= m)]
                # -- observations
                a, b, g = a1c_l[p][m], bmi_l[p][m], egfr_l[p][m]
                sys_bp = sbp_l[p][m] + 9 * nz()
                if not registered:
                    obs_list.append((p, e, "smoking", float(c.smoking[p]), 0.0))
                if rr() < 0.6:
                    dia_bp = 0.55 * sys_bp + 8 + 5 * nz()
                    if rr() < 0.7:
                        obs_list.append((p, e, "bp_panel", round(sys_bp), round(dia_bp)))
                    else:  # some devices file systolic and diastolic as two observations
                        obs_list.append((p, e, "sbp", round(sys_bp), 0.0))
                        obs_list.append((p, e, "dbp", round(dia_bp), 0.0))
                if rr() < 0.35:
                    obs_list.append((p, e, "bmi", round(b + 0.3 * nz(), 1), 0.0))
                at_risk = a >= 5.7 or b >= 30 or age_l[p] + m / 12 >= 45 or "t2d" in active
                if "t2d" in new_dx or rr() < (0.5 if at_risk else 0.12):
                    obs_list.append((p, e, "hba1c", round(a + 0.08 * nz(), 1), 0.0))
                if rr() < 0.15:
                    # ADAG relation between HbA1c and mean glucose, plus day-to-day noise.
                    obs_list.append((p, e, "glucose", round(max(55.0, 28.7 * a - 46.7 + 12 * nz())),
                                     0.0))
                renal_risk = bool({"t2d", "htn", "ckd"} & set(active)) or age_l[p] + m / 12 >= 65
                if "ckd" in new_dx or rr() < (0.45 if renal_risk else 0.12):
                    # Labs switched from MDRD to CKD-EPI reporting in 2021.
                    kind = "egfr_ckdepi" if m >= 36 or rr() < 0.3 else "egfr_mdrd"
                    obs_list.append((p, e, kind, round(max(4.0, g + 3 * nz())), 0.0))
                cardiac_risk = bool({"htn", "cad", "af", "hf"} & set(active)) or age_l[p] + m / 12 >= 65
                if "hf" in new_dx or rr() < (0.3 if cardiac_risk else 0.03):
                    obs_list.append((p, e, "ntprobnp", round(math.exp(bnp_l[p][m] + 0.1 * nz())), 0.0))

                def add(onset_s: str | None, category: str, code: ConditionCode, style: str,
                        key: str, ver: str = "confirmed", clin: str | None = "active",
                        recorded: str = start_z, abatement: str | None = None) -> None:
                    cond_list.append((p, e, onset_s, category, code, style, ver, clin, recorded,
                                      abatement, key))

                def add_ckd(onset_s: str | None, category: str, code: ConditionCode,
                            recorded: str = start_z) -> None:
                    # A CKD stage record is resolved when the next, different stage is recorded
                    # (as Synthea's kidney module does); the condition itself goes on.
                    nonlocal last_ckd
                    if last_ckd >= 0:
                        old = cond_list[last_ckd]
                        if old[4] is not code and old[4].icd10 != "N18.9" and code.icd10 != "N18.9":
                            cond_list[last_ckd] = old[:7] + ("resolved", old[8], recorded, old[10])
                    last_ckd = len(cond_list)
                    add(onset_s, category, code, _style(rnd), "ckd", recorded=recorded)

                # -- conditions
                dx_today: list[tuple[str, ConditionCode]] = []
                if not registered:
                    # Registration: the problem list; old conditions recorded now, years after
                    # their onset (late recording).
                    for k in active:
                        if k in new_dx:
                            continue
                        if k == "ckd":
                            code = _ckd_variant(g, rnd)
                            add_ckd(past_onset.get(k), "problem-list-item", code)
                        else:
                            code = _pick(rnd, k)
                            add(past_onset.get(k), "problem-list-item", code, _style(rnd), k)
                        coded.add(k)
                        dx_today.append((k, code))
                        if truth_onset[k][p] is None:  # began this month: onset = this visit
                            truth_onset[k][p] = start.date().isoformat()
                    if onset_l["stroke"][p] < m and "stroke" not in new_dx:
                        add(past_onset.get("stroke"), "problem-list-item",
                            CONDITIONS["stroke_history"][0], _style(rnd), "stroke_history")
                        coded.add("stroke")
                        stroke_code_month = -1
                for k in new_dx:
                    code = _ckd_variant(g, rnd) if k == "ckd" else _pick(rnd, k)
                    recorded = start_z
                    if xr.random() < LATE_CODING_SHARE and m + 4 < MONTHS and (
                            death is None or death > (start + timedelta(days=125)).date()):
                        # Coded by the back office weeks to months after the visit: known later.
                        recorded = iso_z(start + timedelta(days=xr.randint(7, 120)))
                    if k == "ckd":
                        add_ckd(start_z, "encounter-diagnosis", code, recorded)
                    else:
                        add(start_z, "encounter-diagnosis", code, _style(rnd), k,
                            recorded=recorded)
                    onset_date[k][p] = start.date()
                    truth_onset[k][p] = start.date().isoformat()
                    coded.add(k)
                    dx_today.append((k, code))
                    if k == "t2d" and rnd.random() < 0.7:
                        add(None, "encounter-diagnosis", Z_ORAL_HYPOGLYCEMIC, "icd10", "z_oral")
                    if k == "stroke":
                        stroke_code_month = m
                registered = True
                # Follow-up visits re-code a share of the active chronic conditions.
                for k in active:
                    if k in coded and k not in new_dx and rr() < 0.15:
                        if k == "ckd":
                            code = _ckd_variant(g, rnd)
                            add_ckd(None, "encounter-diagnosis", code)
                        else:
                            code = _pick(rnd, k)
                            add(None, "encounter-diagnosis", code, _style(rnd), k)
                        dx_today.append((k, code))
                    elif k not in coded:
                        # Onset before registration but not on the first list: coded now.
                        if k == "ckd":
                            add_ckd(past_onset.get(k), "problem-list-item", _ckd_variant(g, rnd))
                        else:
                            add(past_onset.get(k), "problem-list-item", _pick(rnd, k),
                                _style(rnd), k)
                        coded.add(k)
                        if truth_onset[k][p] is None:
                            truth_onset[k][p] = start.date().isoformat()
                if 0 <= stroke_code_month < m and rnd.random() < 0.15:
                    add(None, "encounter-diagnosis", CONDITIONS["stroke_history"][0], "icd10",
                        "stroke_history")
                if b >= 30 and not obesity_coded and rnd.random() < 0.5:
                    obesity_coded = True
                    code = CONDITIONS["obesity"][1 if b >= 40 else 0]
                    add(None, "encounter-diagnosis", code, _style(rnd), "obesity")
                    dx_today.append(("obesity", code))
                    truth_onset["obesity"][p] = start.date().isoformat()
                elif obesity_coded and b >= 30 and rnd.random() < 0.2:
                    add(None, "encounter-diagnosis", CONDITIONS["obesity"][1 if b >= 40 else 0],
                        "icd10", "obesity")
                if "t2d" not in active and 5.7 <= a < 6.5 and rnd.random() < (
                        0.5 if not prediab_coded else 0.3):
                    prediab_coded = True
                    code = CONDITIONS["prediabetes"][0]
                    add(None, "encounter-diagnosis", code, _style(rnd), "prediabetes")
                    dx_today.append(("prediabetes", code))
                if rr() < 0.15:
                    code = ACUTE[int(rr() * len(ACUTE))]
                    ab = start + timedelta(days=rnd.randint(7, 30))
                    if death is not None and ab.date() >= death:
                        ab = datetime(death.year, death.month, death.day, tzinfo=timezone.utc)
                    ab = min(ab, LAST_INSTANT)
                    add(None, "encounter-diagnosis", code, _style(rnd), "acute", clin="resolved",
                        abatement=iso_z(ab))
                    dx_today.append(("acute", code))
                # -- diagnoses not (or not yet) confirmed: a marker points at a target
                # condition the patient does not have; refuted at the next visit or left open.
                suspected: list[str] = []
                for k, code in list(pending_refute.items()):
                    if onset_l[k][p] > m:
                        add(None, "encounter-diagnosis", code, _style(rnd), k, ver="refuted",
                            clin=None)
                    del pending_refute[k]
                for k in _TARGETS:
                    if onset_l[k][p] <= m or k in new_dx:
                        continue
                    hint = (a >= 6.0 if k == "t2d" else g < 70 if k == "ckd"
                            else bnp_l[p][m] > ln_250)
                    if hint and xr.random() < SUSPECT_SHARE:
                        code = CONDITIONS[k][0] if k != "ckd" else CONDITIONS["ckd"][5]
                        ver = xr.choices(("provisional", "differential", "unconfirmed"),
                                         (0.45, 0.35, 0.2))[0]
                        add(None, "encounter-diagnosis", code, _style(rnd), k, ver=ver)
                        suspected.append(k)
                        if xr.random() < REFUTE_SHARE:
                            pending_refute[k] = code
                if xr.random() < ENTERED_IN_ERROR_SHARE:
                    absent = [k for k in _TARGETS if onset_l[k][p] > m]
                    if absent:
                        k = xr.choice(absent)
                        add(None, "encounter-diagnosis", CONDITIONS[k][0], _style(rnd), k,
                            ver="entered-in-error", clin=None)
                # -- notes
                if new_dx or rr() < NOTE_SHARE:
                    ctx = NoteContext(
                        when=start, age_years=age_l[p] + m / 12, sex=c.sex[p], given=c.given[p],
                        family=c.family[p], mrn=c.mrn[p], smoker=c.smoking[p],
                        active=[k for k in active if k in coded or k == "hld"],
                        new_dx=new_dx, dx_today=dx_today, suspected=suspected,
                        absent=[k for k in ("t2d", "ckd", "hf", "af", "stroke", "htn")
                                if onset_l[k][p] > m],
                        stroke_history=onset_l["stroke"][p] < m,
                        sys_bp=sys_bp, bmi=b, hba1c=a, egfr=g)
                    text, spans = write_note(xr, ctx)
                    ni = len(note_list)
                    note_list.append((p, e, text))
                    for group, assertion, s0, s1 in spans:
                        mentions.append((ni, group, assertion, s0, s1))
    c.onset_date = onset_date
    c.truth_onset = truth_onset


def _pick(rnd: random.Random, key: str) -> ConditionCode:
    variants = CONDITIONS[key]
    if key == "t2d":
        return rnd.choices(variants, (0.7, 0.2, 0.1))[0]
    if key == "hf":
        return rnd.choices(variants, (0.5, 0.25, 0.15, 0.1))[0]
    if key == "obesity":
        return variants[0]
    return rnd.choice(variants)


def _ckd_variant(egfr_ml_min: float, rnd: random.Random) -> ConditionCode:
    v = CONDITIONS["ckd"]
    if rnd.random() < 0.12:
        return v[5]  # unspecified stage, as busy clinicians code it
    if egfr_ml_min >= 60:
        return v[0]
    if egfr_ml_min >= 45:
        return v[1] if rnd.random() < 0.7 else v[6]
    if egfr_ml_min >= 30:
        return v[2]
    return v[3] if egfr_ml_min >= 15 else v[4]


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
