"""What each simulated visit writes into the synthetic record: encounters, measurements, coded
diagnoses (styles, statuses, late coding, legacy ICD-9 lists) and progress notes."""
from __future__ import annotations

import math
import random
from datetime import date, datetime, timedelta, timezone

import numpy as np

from synth.emr_codes import ACUTE, CONDITIONS, Z_ORAL_HYPOGLYCEMIC, ConditionCode
from synth.emr_cohort import (ICD10_START, LAST_INSTANT, MONTHS, NEVER, REGISTRATION_MONTHS, Cohort, iso_z,
                              month_start)
from synth.emr_notes import NoteContext, write_note


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


def visits_to_records(c: Cohort, rnd: random.Random, visits: np.ndarray, first_month: np.ndarray,
                       onset: dict[str, np.ndarray], a1c: np.ndarray, bmi: np.ndarray,
                       egfr: np.ndarray, sbp: np.ndarray, bnp: np.ndarray, age0: np.ndarray,
                       child: np.ndarray) -> None:
    """Fill ``c``'s encounters, conditions, observations, notes and onset dates from the visits
    per patient and month and the latent state the simulation drew (one ``rnd`` stream)."""
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
