"""Synthetic EMR exports for demos, tests and benchmarks: FHIR R4 Bulk Data or OMOP CDM 5.4.

One simulation (synth.emr_sim) feeds both formats, so a seed gives the same
patients, visits and planted signal whichever format is written. The planted signal and
the bad records are described in docs/synthetic_emr.md.
"""
from __future__ import annotations

import json
import os
import shutil
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from conf.settings import HEADS
from synth.emr_codes import TRUTH_GROUP
from synth.emr_cohort import Cohort, countable, first_known
from synth.emr_sim import SIGNAL, simulate

FORMATS = ("fhir", "omop")
SUMMARY_FILE = "synth_summary.json"
# The ground truth beside the export: JSON (no reader of EMR exports takes *.json as input).
TRUTH_DIR = "synth_truth"
# Assertion of a coded diagnosis by its FHIR verification status (the events contract).
VERIFICATION_ASSERTION = {"confirmed": "affirmed", "provisional": "possible",
                          "differential": "possible", "unconfirmed": "possible",
                          "refuted": "negated", "entered-in-error": "ignored"}
DEMO_AS_OF = date(2024, 6, 30)
HORIZON_DAYS = 365


def generate(out_dir: Path, patients: int, seed: int, bad_share: float = 0.02,
             fmt: str = "fhir") -> dict[str, Any]:
    """Write a synthetic EMR export of ``patients`` patients into ``out_dir``.

    ``fmt="fhir"`` writes a FHIR R4 Bulk Data export (``<Type>.ndjson`` + ``manifest.json``),
    ``fmt="omop"`` OMOP CDM 5.4 CSV tables. ``bad_share`` of the records are realistic bad
    records (0 disables them). Same arguments give byte-identical files. The directory is
    written whole and swapped in: a rerun replaces a previous synthetic export there, and a
    non-empty directory that is not one is refused.

    Returns a summary: counts per resource type / table, bad records per kind under
    ``"bad_records"``, and the planted signal's parameters and observed rates under
    ``"signal"``. The same summary is written to ``synth_summary.json`` next to the data.
    """
    out_dir = Path(out_dir)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not 0.0 <= bad_share <= 0.5:
        raise ValueError(f"bad_share must be within [0, 0.5] (got {bad_share}); "
                         "0 disables bad records, the demo uses 0.02")
    if patients < 1:
        raise ValueError(f"patients must be >= 1 (got {patients})")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file; --out must name a directory to write "
                                 "the export into")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / SUMMARY_FILE).exists():
        raise FileExistsError(f"{out_dir} is not empty and holds no earlier synthetic export "
                              f"({SUMMARY_FILE} missing); choose an empty or new directory")

    cohort = simulate(patients, seed)
    staging = out_dir.parent / f".{out_dir.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        if fmt == "fhir":
            from synth.emr_fhir import write_fhir
            part = write_fhir(cohort, staging, bad_share)
        else:
            from synth.emr_omop import write_omop
            part = write_omop(cohort, staging, bad_share)
        ids = part.pop("_ids")
        summary: dict[str, Any] = {"format": fmt, "patients": patients, "seed": seed,
                                   "bad_share": bad_share, **part,
                                   "signal": signal_summary(cohort),
                                   "truth": write_truth(cohort, staging / TRUTH_DIR, ids)}
        (staging / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")
        # Swap in whole: readers never see a half-written export.
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            staging.rename(out_dir)
            shutil.rmtree(old)
        else:
            staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


_HEAD_GROUP = {"t2d": "t2d", "ckd": "ckd", "hf": "heart_failure"}


def in_population(cohort: Cohort, as_of: date) -> np.ndarray:
    """Patients alive, registered and under observation on ``as_of`` (the as-of population)."""
    return np.array([reg is not None and reg <= as_of and cohort.observation_end[p] >= as_of
                     and (cohort.death_date[p] is None or cohort.death_date[p] > as_of)
                     for p, reg in enumerate(cohort.registration_date)], dtype=bool)


def incident_labels(cohort: Cohort, as_of: date, horizon_days: int = HORIZON_DAYS
                    ) -> dict[str, np.ndarray]:
    """Ground truth per head: 1 where the patient's first confirmed diagnosis (any vocabulary)
    became known in (as_of, as_of + horizon]; patients outside the as-of population are 0."""
    end = as_of + timedelta(days=horizon_days)
    known = first_known(cohort)
    pop = in_population(cohort, as_of)
    return {h: np.array([bool(pop[p]) and d is not None and as_of < d <= end
                         for p, d in enumerate(known[_HEAD_GROUP[h]])], dtype=np.int8)
            for h in HEADS}


def signal_summary(cohort: Cohort) -> dict[str, Any]:
    """The planted signal's parameters and what it produced at the demo as-of date."""
    labels = incident_labels(cohort, DEMO_AS_OF)
    known = first_known(cohort)
    pop = in_population(cohort, DEMO_AS_OF)
    prevalent = {h: round(float(np.mean([bool(pop[p]) and d is not None and d <= DEMO_AS_OF
                                         for p, d in enumerate(known[_HEAD_GROUP[h]])])), 4)
                 for h in HEADS}
    return {
        "model": "monthly logistic hazards over latent state (docs/synthetic_emr.md)",
        "coefficients": SIGNAL,
        "demo_as_of": DEMO_AS_OF.isoformat(),
        "horizon_days": HORIZON_DAYS,
        "incident_share_at_demo_as_of": {h: round(float(labels[h].mean()), 4) for h in HEADS},
        "prevalent_share_at_demo_as_of": prevalent,
        "population_share_at_demo_as_of": round(float(pop.mean()), 4),
        "label_groups": _HEAD_GROUP,
        "label_rule": "first confirmed diagnosis of the group, any vocabulary, known "
                      "(recordedDate) in (as_of, as_of + horizon], among the as-of population",
    }


def write_truth(cohort: Cohort, out_dir: Path, ids: dict[str, list[Any]]) -> dict[str, Any]:
    """Write the ground truth of the export under ``out_dir``: what was planted, per patient,
    per coded diagnosis and per note mention, keyed by the ids the export uses.

    Files are column-oriented JSON objects (``{"column": [values...]}``):

    * ``patients.json``: patient (FHIR Patient.id / OMOP person_id), mrn, birth_date, sex,
      registration_date, first_record_date, observation_end_date, death_date, left_care, and per concept group
      ``onset_<group>`` (clinical onset as written, partial dates kept; null: none on record)
      and ``known_<group>`` (day the first confirmed diagnosis was recorded).
    * ``conditions.json``: condition (resource / row id; null where the format does not load
      it), patient, group (null: no target group), verification, assertion, counts, onset,
      recorded, coding.
    * ``mentions.json``: note (DocumentReference.id / note_id), patient, group, assertion,
      start, end (character offsets into the decoded note text).
    """
    out_dir.mkdir(parents=True)
    n = cohort.patients
    groups = sorted(set(TRUTH_GROUP.values()))
    known = first_known(cohort)
    onset: dict[str, list[str | None]] = {g: [None] * n for g in groups}
    for key, per in cohort.truth_onset.items():
        g = TRUTH_GROUP.get(key)
        if g is None:
            continue
        for p, v in enumerate(per):
            if v is not None and (onset[g][p] is None or v < onset[g][p]):
                onset[g][p] = v
    iso = lambda d: d.isoformat() if d is not None else None  # noqa: E731
    first_record = [iso(d) for d in cohort.registration_date]
    for r in cohort.conditions:  # the migrated ICD-9-CM list predates the first visit
        day = r[8][:10]
        if first_record[r[0]] is None or day < first_record[r[0]]:
            first_record[r[0]] = day
    patients: dict[str, list[Any]] = {
        "patient": ids["patient"], "mrn": cohort.mrn,
        "birth_date": [d.isoformat() for d in cohort.birth_date], "sex": cohort.sex,
        "registration_date": [iso(d) for d in cohort.registration_date],
        "first_record_date": first_record,
        "observation_end_date": [iso(d) for d in cohort.observation_end],
        "death_date": [iso(d) for d in cohort.death_date], "left_care": cohort.left_care,
    }
    for g in groups:
        patients[f"onset_{g}"] = onset[g]
        patients[f"known_{g}"] = [iso(d) for d in known[g]]
    conds: dict[str, list[Any]] = {k: [] for k in ("condition", "patient", "group", "verification",
                                                   "assertion", "counts", "onset", "recorded",
                                                   "coding")}
    pid = ids["patient"]
    for i, r in enumerate(cohort.conditions):
        conds["condition"].append(ids["condition"][i])
        conds["patient"].append(pid[r[0]])
        conds["group"].append(TRUTH_GROUP.get(r[10]))
        conds["verification"].append(r[6])
        conds["assertion"].append(VERIFICATION_ASSERTION[r[6]])
        conds["counts"].append(countable(r[6]))
        conds["onset"].append(r[2])
        conds["recorded"].append(r[8])
        conds["coding"].append(r[5])
    mentions: dict[str, list[Any]] = {k: [] for k in ("note", "patient", "group", "assertion",
                                                      "start", "end")}
    for ni, group, assertion, s0, s1 in cohort.mentions:
        mentions["note"].append(ids["note"][ni])
        mentions["patient"].append(pid[cohort.notes[ni][0]])
        mentions["group"].append(group)
        mentions["assertion"].append(assertion)
        mentions["start"].append(s0)
        mentions["end"].append(s1)
    for name, table in (("patients", patients), ("conditions", conds), ("mentions", mentions)):
        (out_dir / f"{name}.json").write_text(json.dumps(table, separators=(",", ":")) + "\n",
                                              encoding="utf-8")
    return {"dir": TRUTH_DIR, "patients": n, "conditions": len(cohort.conditions),
            "mentions": len(cohort.mentions),
            "deceased": sum(d is not None for d in cohort.death_date),
            "left_care": sum(cohort.left_care),
            "registered_after_demo_as_of": sum(d is not None and d > DEMO_AS_OF
                                               for d in cohort.registration_date),
            "children_at_demo_as_of": sum(0 <= (DEMO_AS_OF - b).days < 18 * 365.25
                                          for b in cohort.birth_date)}


def read_truth(export_dir: Path, name: str) -> list[dict[str, Any]]:
    """One ground-truth table of a synthetic export as a list of row dicts."""
    path = Path(export_dir) / TRUTH_DIR / f"{name}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {export_dir} is not a synthetic EMR export "
                                "written by this version (medscreen synth emr)")
    cols = json.loads(path.read_text(encoding="utf-8"))
    keys = list(cols)
    return [dict(zip(keys, row)) for row in zip(*(cols[k] for k in keys))]
