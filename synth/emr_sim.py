"""The simulation behind the synthetic EMR: one cohort, rendered as FHIR or OMOP.

Patients live month by month from 2018-01 to 2025-12. Latent HbA1c, BMI, eGFR and
blood pressure drift; chronic conditions start through monthly logistic hazards that
depend on the patient's current state (the planted signal, see ``SIGNAL``); patients die
through a hazard of their own, some leave the hospital's care, some register late; visits
happen at a rate that grows with age and morbidity, and only what is measured, coded or
written at a visit reaches the record (synth.emr_records). The formats (synth.emr_fhir,
synth.emr_omop) only render the ``Cohort`` (synth.emr_cohort) this module returns, so both
formats carry the same patients and signal.
"""
from __future__ import annotations

import random
from datetime import date, timedelta

import numpy as np

from synth.emr_cohort import DATA_END, MONTHS, NEVER, REGISTRATION_MONTHS, START_MONTH, Cohort, month_start
from synth.emr_records import visits_to_records

# Most patients register during the first REGISTRATION_MONTHS; this share registers later.
LATE_REGISTRATION_SHARE = 0.10
CHILD_SHARE = 0.12          # patients aged 0-17 at the start
LEAVE_SHARE = 0.05          # patients who leave the hospital's care (records stop, alive)

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
    visits_to_records(cohort, rnd, visits, first_month, onset, a1c, bmi, egfr, sbp, bnp, age0,
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
