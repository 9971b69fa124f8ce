"""The simulation behind the synthetic EMR: one cohort, rendered as FHIR or OMOP.

Patients live month by month from 2018-01 to 2025-12. Latent HbA1c, BMI, eGFR and
blood pressure drift; chronic conditions start through monthly logistic hazards that
depend on the patient's current state (the planted signal, see ``SIGNAL``); visits
happen at a rate that grows with age and morbidity, and only what is measured or coded
at a visit reaches the record. The formats (synth_emr_fhir, synth_emr_omop) only render
the ``Cohort`` this module returns, so both formats carry the same patients and signal.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

import numpy as np

from medscreen.synth_emr_codes import ACUTE, CONDITIONS, Z_ORAL_HYPOGLYCEMIC, ConditionCode

START_MONTH = date(2018, 1, 1)
MONTHS = 96  # 2018-01 .. 2025-12
# Patients register (first visit) during the first 18 months, so any as-of date from
# 2020 on has every patient's problem list already on record.
REGISTRATION_MONTHS = 18

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
}
NEVER = 10**6  # onset month of a condition that never starts


def month_start(m: int) -> date:
    """First day of simulation month ``m`` (0 = 2018-01)."""
    y, mo = divmod(m, 12)
    return date(START_MONTH.year + y, mo + 1, 1)


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
    # (patient, start_utc, end_utc, class) class: AMB | EMER | IMP
    encounters: list[tuple[int, datetime, datetime, str]] = field(default_factory=list)
    # (patient, encounter, onset date string or None, category, code, style)
    # style: icd10 | icd10+snomed | icd10+icd9 | icd9 | snomed
    conditions: list[tuple[int, int, str | None, str, ConditionCode, str]] = field(default_factory=list)
    # (patient, encounter, kind, value, value2) kind: hba1c glucose bmi bp_panel (value2 =
    # diastolic) sbp dbp egfr_mdrd egfr_ckdepi ntprobnp smoking
    observations: list[tuple[int, int, str, float, float]] = field(default_factory=list)
    # (patient, encounter, note text)
    notes: list[tuple[int, int, str]] = field(default_factory=list)
    # head -> onset month per patient (-1: before registration/prevalent, NEVER: none)
    onset_month: dict[str, np.ndarray] = field(default_factory=dict)
    onset_date: dict[str, list[date | None]] = field(default_factory=dict)


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
    # A hospital population: a younger and an older mode, ages 18-88 at the start so
    # that nobody is older than 95 by the end.
    older = rng.random(n) < 0.6
    age0 = np.where(older, rng.normal(64, 12, n), rng.normal(38, 11, n)).clip(18, 88)
    sex_u = rng.random(n)
    male = sex_u < 0.47
    sex = np.where(male, "male", np.where(sex_u < 0.997, "female", "unknown"))
    bmi0 = rng.normal(28.5, 5.5, n).clip(17, 58)
    bmi_slope = rng.normal(0.1, 0.35, n)                                  # kg/m2 per year
    a1c0 = (5.05 + 0.03 * (bmi0 - 26) + 0.008 * (age0 - 45) + rng.normal(0, 0.3, n)).clip(4.3, 9)
    a1c_slope = (rng.normal(0.03, 0.07, n) + 0.05 * (bmi0 > 30)).clip(-0.1, 0.4)  # % per year
    egfr0 = (124 - 0.75 * age0 + rng.normal(0, 11, n)).clip(8, 130)
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

    onset = {k: np.full(n, NEVER, dtype=np.int64) for k in ("t2d", "ckd", "hf", "htn", "cad", "af",
                                                            "stroke")}
    for k, flag in (("t2d", dm), ("ckd", ckd), ("hf", hf), ("htn", htn), ("cad", cad), ("af", af),
                    ("stroke", stroke)):
        onset[k][flag] = -1

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
    for m in range(MONTHS):
        age = age0 + m / 12.0
        has = {k: onset[k] <= m - 1 for k in onset}  # state entering this month
        obese = cur_bmi >= 30
        hz = rng.random((7, n))
        s = SIGNAL["t2d"]
        logit = (s["intercept"] + s["hba1c_minus_5_9_pct"] * (cur_a1c - 5.9) + s["obese"] * obese
                 + s["hypertension"] * has["htn"] + s["age_minus_55_years"] * (age - 55)
                 + s["hba1c_at_least_6_5"] * (cur_a1c >= 6.5) + frailty)
        new = ~has["t2d"] & (onset["t2d"] == NEVER) & (hz[0] < _sigmoid(logit))
        onset["t2d"][new] = m
        # Diagnosis is made on a lab at or above the 6.5 % threshold.
        cur_a1c = np.where(new, np.maximum(cur_a1c, 6.5) + np.abs(rng.normal(0.5, 0.4, n)), cur_a1c)
        s = SIGNAL["ckd"]
        logit = (s["intercept"] + s["egfr_minus_60"] * (cur_egfr - 60) + s["diabetes"] * has["t2d"]
                 + s["hypertension"] * has["htn"] + frailty)
        new = (onset["ckd"] == NEVER) & (hz[1] < _sigmoid(logit))
        onset["ckd"][new] = m
        s = SIGNAL["hf"]
        logit = (s["intercept"] + s["ln_ntprobnp_minus_ln_300"] * (cur_bnp - np.log(300))
                 + s["hypertension"] * has["htn"] + s["cad"] * has["cad"]
                 + s["af"] * has["af"] + s["age_minus_60_years"] * (age - 60)
                 + s["ckd"] * has["ckd"] + s["diabetes"] * has["t2d"] + frailty)
        new = (onset["hf"] == NEVER) & (hz[2] < _sigmoid(logit))
        onset["hf"][new] = m
        cur_bnp = np.where(new, np.maximum(cur_bnp, np.log(600)) + np.abs(rng.normal(0.5, 0.5, n)),
                           cur_bnp)
        s = SIGNAL["htn"]
        logit = s["intercept"] + s["age_minus_50_years"] * (age - 50) + s["bmi_minus_28"] * (cur_bmi - 28)
        onset["htn"][(onset["htn"] == NEVER) & (hz[3] < _sigmoid(logit))] = m
        s = SIGNAL["cad"]
        logit = (s["intercept"] + s["age_minus_50_years"] * (age - 50) + s["male"] * male
                 + s["hypertension"] * has["htn"] + s["diabetes"] * has["t2d"])
        onset["cad"][(onset["cad"] == NEVER) & (hz[4] < _sigmoid(logit))] = m
        s = SIGNAL["af"]
        logit = (s["intercept"] + s["age_minus_50_years"] * (age - 50)
                 + s["hypertension"] * has["htn"] + s["obese"] * obese)
        onset["af"][(onset["af"] == NEVER) & (hz[5] < _sigmoid(logit))] = m
        s = SIGNAL["stroke"]
        logit = (s["intercept"] + s["af"] * has["af"] + s["age_minus_60_years"] * (age - 60)
                 + s["hypertension"] * has["htn"])
        onset["stroke"][(onset["stroke"] == NEVER) & (hz[6] < _sigmoid(logit))] = m

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
    first_month = rng.integers(0, REGISTRATION_MONTHS, n)
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

    rnd = random.Random(seed * 1_000_003 + 17)
    cohort = Cohort(
        patients=n, seed=seed, sex=sex.tolist(),
        birth_date=[START_MONTH - timedelta(days=int(a * 365.25) + rnd.randrange(365))
                    for a in age0.tolist()],
        given=[_fake_name(rnd, 2) for _ in range(n)],
        family=[_fake_name(rnd, rnd.choice((2, 3))) for _ in range(n)],
        mrn=[f"MRN{rnd.randrange(10**8):08d}" for _ in range(n)],
        smoking=[rnd.choices((0, 1, 2), (0.55, 0.28, 0.17))[0] for _ in range(n)],
    )
    cohort.onset_month = {k: v for k, v in onset.items()}
    _visits_to_records(cohort, rnd, visits, first_month, onset, a1c, bmi, egfr, sbp, bnp, age0)
    return cohort


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


_CHRONIC = ("htn", "hld", "cad", "af", "t2d", "ckd", "hf")
_NOTE_REASONS = ["follow-up of chronic conditions", "annual wellness visit", "medication review",
                 "routine check-up", "lab review", "blood pressure check"]


def _visits_to_records(c: Cohort, rnd: random.Random, visits: np.ndarray, first_month: np.ndarray,
                       onset: dict[str, np.ndarray], a1c: np.ndarray, bmi: np.ndarray,
                       egfr: np.ndarray, sbp: np.ndarray, bnp: np.ndarray, age0: np.ndarray) -> None:
    onset_l = {k: v.tolist() for k, v in onset.items()}
    a1c_l, bmi_l, egfr_l, sbp_l = a1c.tolist(), bmi.tolist(), egfr.tolist(), sbp.tolist()
    bnp_l = bnp.tolist()
    first_l, age_l, visits_l = first_month.tolist(), age0.tolist(), visits.tolist()
    onset_date: dict[str, list[date | None]] = {k: [None] * c.patients for k in onset}
    enc_list, cond_list, obs_list, note_list = c.encounters, c.conditions, c.observations, c.notes
    rr = rnd.random
    # Standard normals drawn once from a seeded stream: per-call gauss() dominates otherwise.
    normals = np.random.default_rng(c.seed + 101).standard_normal(int(visits.sum()) * 8 + 16).tolist()
    nz = iter(normals).__next__
    month_starts = [month_start(m) for m in range(MONTHS)]
    for p in range(c.patients):
        vrow = visits_l[p]
        # Hyperlipidemia is prevalent-only (no hazard): on the problem list or not.
        hld_flag = rnd.random() < min(0.9, 0.2 + 0.006 * max(age_l[p] - 35, 0))
        coded: set[str] = set()           # conditions already on this patient's record
        registered = False                # the first visit writes the problem list
        obesity_coded = prediab_coded = False
        stroke_code_month = NEVER
        # Onsets before registration: a plausible past onset date for the problem list.
        past_onset: dict[str, str] = {}
        for k in onset_l:
            if onset_l[k][p] < first_l[p]:
                years_ago = rnd.randint(1, 12) if onset_l[k][p] == -1 else 0
                d = month_start(max(onset_l[k][p], 0)) - timedelta(days=365 * years_ago
                                                                    + rnd.randrange(28))
                if years_ago and rnd.random() < 0.2:
                    past_onset[k] = f"{d.year:04d}-{d.month:02d}"  # partial date, valid FHIR
                else:
                    past_onset[k] = d.isoformat()
        if hld_flag:
            past_onset["hld"] = (month_start(first_l[p]) - timedelta(days=rnd.randrange(200, 4000))
                                 ).isoformat()
        for m in range(first_l[p], MONTHS):
            nv = vrow[m]
            if not nv:
                continue
            ms = month_starts[m]
            for v in range(nv):
                start = datetime(ms.year, ms.month, 1 + int(rr() * 28), 7 + int(rr() * 11),
                                 5 * int(rr() * 12), tzinfo=timezone.utc)
                new_dx = [k for k in ("t2d", "ckd", "hf", "stroke") if onset_l[k][p] == m
                          and k not in coded] if v == 0 else []
                cls = "AMB"
                if "hf" in new_dx or "stroke" in new_dx:
                    cls = "IMP" if rnd.random() < 0.6 else "EMER"
                elif rr() < 0.05:
                    cls = "EMER"
                end = start + (timedelta(days=rnd.randint(2, 6), hours=rnd.randint(0, 6))
                               if cls == "IMP" else timedelta(minutes=15 + 5 * int(rr() * 15)))
                e = len(enc_list)
                enc_list.append((p, start, end, cls))
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
                # -- conditions
                dx_today: list[str] = []
                if not registered:
                    # Registration: the problem list, including legacy ICD-9 entries.
                    for k in active:
                        if k in new_dx:
                            continue
                        code = _ckd_variant(g, rnd) if k == "ckd" else _pick(rnd, k)
                        cond_list.append((p, e, past_onset.get(k), "problem-list-item", code,
                                          _problem_list_style(rnd, k)))
                        coded.add(k)
                        dx_today.append(code.prose)
                    if onset_l["stroke"][p] < m and "stroke" not in new_dx:
                        cond_list.append((p, e, past_onset.get("stroke"), "problem-list-item",
                                          CONDITIONS["stroke_history"][0],
                                          _problem_list_style(rnd, "stroke")))
                        coded.add("stroke")
                        stroke_code_month = -1
                for k in new_dx:
                    code = _ckd_variant(g, rnd) if k == "ckd" else _pick(rnd, k)
                    cond_list.append((p, e, start.isoformat().replace("+00:00", "Z"),
                                      "encounter-diagnosis", code,
                                      "icd10+snomed" if rnd.random() < 0.3 else "icd10"))
                    onset_date[k][p] = start.date()
                    coded.add(k)
                    dx_today.append(code.prose)
                    if k == "t2d" and rnd.random() < 0.7:
                        cond_list.append((p, e, None, "encounter-diagnosis", Z_ORAL_HYPOGLYCEMIC,
                                          "icd10"))
                    if k == "stroke":
                        stroke_code_month = m
                registered = True
                # Follow-up visits re-code a share of the active chronic conditions.
                for k in active:
                    if k in coded and k not in new_dx and rr() < 0.15:
                        code = _ckd_variant(g, rnd) if k == "ckd" else _pick(rnd, k)
                        cond_list.append((p, e, None, "encounter-diagnosis", code,
                                          _followup_style(rnd, k)))
                        dx_today.append(code.prose)
                    elif k not in coded:
                        # Onset before registration but not on the first list: coded now.
                        code = _ckd_variant(g, rnd) if k == "ckd" else _pick(rnd, k)
                        cond_list.append((p, e, past_onset.get(k), "problem-list-item", code,
                                          "icd10"))
                        coded.add(k)
                if 0 <= stroke_code_month < m and rnd.random() < 0.15:
                    cond_list.append((p, e, None, "encounter-diagnosis",
                                      CONDITIONS["stroke_history"][0], "icd10"))
                if b >= 30 and not obesity_coded and rnd.random() < 0.5:
                    obesity_coded = True
                    code = CONDITIONS["obesity"][1 if b >= 40 else 0]
                    cond_list.append((p, e, None, "encounter-diagnosis", code,
                                      _followup_style(rnd, "obesity")))
                    dx_today.append(code.prose)
                elif obesity_coded and b >= 30 and rnd.random() < 0.2:
                    code = CONDITIONS["obesity"][1 if b >= 40 else 0]
                    cond_list.append((p, e, None, "encounter-diagnosis", code, "icd10"))
                if "t2d" not in active and 5.7 <= a < 6.5 and rnd.random() < (
                        0.5 if not prediab_coded else 0.3):
                    prediab_coded = True
                    code = CONDITIONS["prediabetes"][0]
                    cond_list.append((p, e, None, "encounter-diagnosis", code,
                                      _followup_style(rnd, "prediabetes")))
                    dx_today.append(code.prose)
                if rr() < 0.15:
                    code = ACUTE[int(rr() * len(ACUTE))]
                    cond_list.append((p, e, None, "encounter-diagnosis", code,
                                      _followup_style(rnd, "acute")))
                    dx_today.append(code.prose)
                # -- notes
                if new_dx or rr() < 0.2:
                    note_list.append((p, e, _note(rnd, c, p, start, age_l[p] + m / 12, active,
                                                  dx_today, new_dx, sys_bp, b, a,
                                                  stroke=onset_l["stroke"][p] < m)))
    c.onset_date = onset_date


def _problem_list_style(rnd: random.Random, key: str) -> str:
    u = rnd.random()
    if key in ("t2d", "ckd", "hf"):
        # Target conditions always carry ICD-10-CM so a prevalent case never looks incident.
        return "icd10+icd9" if u < 0.25 else ("icd10+snomed" if u < 0.5 else "icd10")
    if u < 0.25:
        return "icd9"       # legacy problem-list entry migrated from an ICD-9 era system
    if u < 0.35:
        return "snomed"
    return "icd10+snomed" if u < 0.6 else "icd10"


def _followup_style(rnd: random.Random, key: str) -> str:
    u = rnd.random()
    if key in ("t2d", "ckd", "hf"):
        return "icd10+snomed" if u < 0.2 else "icd10"
    if u < 0.05:
        return "snomed"
    return "icd10+snomed" if u < 0.25 else "icd10"


_NEGATABLE = {"hf": ("heart failure", "I50.9"), "t2d": ("diabetes", "E11.9"),
              "ckd": ("chronic kidney disease", "N18.9"), "af": ("atrial fibrillation", "I48.91"),
              "stroke": ("stroke", "I63.9")}
_SYMPTOMS = ["chest pain", "shortness of breath", "polyuria", "leg swelling", "palpitations",
             "syncope"]


def _note(rnd: random.Random, c: Cohort, p: int, when: datetime, age: float, active: list[str],
          dx_today: list[str], new_dx: list[str], sys_bp: float, bmi: float, a1c: float,
          stroke: bool) -> str:
    """A short progress note: prose diagnoses, some with explicit ICD-10-CM codes, negations,
    history and family-history mentions — the cases note extraction must tell apart."""
    sex = {"female": "female", "male": "male"}.get(c.sex[p], "patient")
    lines = ["PROGRESS NOTE", f"Date of service: {when.date().isoformat()}"]
    if rnd.random() < 0.4:
        lines.append(f"Patient: {c.family[p]}, {c.given[p]}  MRN: {c.mrn[p]}")
    lines.append(f"{int(age)}-year-old {sex} seen for {rnd.choice(_NOTE_REASONS)}.")
    lines.append(f"Vitals: BP {round(sys_bp)}/{round(0.55 * sys_bp + 8)} mmHg, BMI {bmi:.1f}.")
    if rnd.random() < 0.5:
        lines.append(f"Labs: HbA1c {a1c:.1f}%.")
    absent = [k for k in _NEGATABLE if k not in active and not (k == "stroke" and stroke)]
    ros = [f"denies {s}" for s in rnd.sample(_SYMPTOMS, 2)]
    if absent and rnd.random() < 0.6:
        name, code = _NEGATABLE[rnd.choice(absent)]
        ros.append(f"no evidence of {name} ({code})" if rnd.random() < 0.6 else f"no {name}")
    lines.append("ROS: " + "; ".join(ros) + ".")
    history = []
    if stroke:
        history.append("history of stroke, I63.9" if rnd.random() < 0.5 else "history of stroke")
    if "cad" in active and rnd.random() < 0.5:
        history.append("history of coronary artery disease (I25.10)")
    if history:
        lines.append("PMH: " + "; ".join(history) + ".")
    if "t2d" not in active and rnd.random() < 0.15:
        lines.append("Family history: mother with type 2 diabetes mellitus (E11.9).")
    assessment = []
    for k in new_dx:
        code = {"t2d": "E11.9", "ckd": "N18.9", "hf": "I50.9", "stroke": "I63.9"}[k]
        assessment.append(f"new diagnosis of {_NEGATABLE.get(k, (k, ''))[0]} ({code})"
                          if rnd.random() < 0.6 else f"new {_NEGATABLE.get(k, (k, ''))[0]}")
    for prose in dx_today:
        if rnd.random() < 0.5:
            assessment.append(prose)
    known = {"type 2 diabetes mellitus without complications": "E11.9",
             "essential hypertension": "I10", "heart failure": "I50.9",
             "chronic kidney disease": "N18.9", "coronary artery disease": "I25.10",
             "atrial fibrillation": "I48.91", "prediabetes": "R73.03", "obesity": "E66.9"}
    assessment = [f"{a} ({known[a]})" if a in known and rnd.random() < 0.5 else a
                  for a in assessment]
    if not assessment:
        assessment = ["stable, no acute issues"]
    lines.append("Assessment: " + "; ".join(assessment) + ".")
    lines.append("Plan: " + rnd.choice(["continue current medications", "recheck labs in 3 months",
                                         "lifestyle counselling, diet and exercise",
                                         "follow up in 6 months"]) + ".")
    return "\n".join(lines) + "\n"
