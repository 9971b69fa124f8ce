"""Synthetic EMR exports for demos, tests and benchmarks: FHIR R4 Bulk Data or OMOP CDM 5.4.

One simulation (medscreen.synth_emr_sim) feeds both formats, so a seed gives the same
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

from medscreen.synth_emr_sim import NEVER, SIGNAL, Cohort, simulate

FORMATS = ("fhir", "omop")
SUMMARY_FILE = "synth_summary.json"
DEMO_AS_OF = date(2024, 6, 30)
HORIZON_DAYS = 365
HEADS = ("t2d", "ckd", "hf")


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
            from medscreen.synth_emr_fhir import write_fhir
            part = write_fhir(cohort, staging, bad_share)
        else:
            from medscreen.synth_emr_omop import write_omop
            part = write_omop(cohort, staging, bad_share)
        summary: dict[str, Any] = {"format": fmt, "patients": patients, "seed": seed,
                                   "bad_share": bad_share, **part,
                                   "signal": signal_summary(cohort)}
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


def incident_labels(cohort: Cohort, as_of: date, horizon_days: int = HORIZON_DAYS
                    ) -> dict[str, np.ndarray]:
    """Ground truth per head: 1 where the first-ever diagnosis is recorded in (as_of, as_of+horizon]."""
    end = as_of + timedelta(days=horizon_days)
    return {h: np.array([d is not None and as_of < d <= end for d in cohort.onset_date[h]],
                        dtype=np.int8) for h in HEADS}


def signal_summary(cohort: Cohort) -> dict[str, Any]:
    """The planted signal's parameters and what it produced at the demo as-of date."""
    labels = incident_labels(cohort, DEMO_AS_OF)
    prevalent = {}
    for h in HEADS:
        on = cohort.onset_date[h]
        prevalent[h] = round(float(np.mean([
            (m != NEVER and (d is None or d <= DEMO_AS_OF))
            for m, d in zip(cohort.onset_month[h].tolist(), on)])), 4)
    return {
        "model": "monthly logistic hazards over latent state (docs/synthetic_emr.md)",
        "coefficients": SIGNAL,
        "demo_as_of": DEMO_AS_OF.isoformat(),
        "horizon_days": HORIZON_DAYS,
        "incident_share_at_demo_as_of": {h: round(float(labels[h].mean()), 4) for h in HEADS},
        "prevalent_share_at_demo_as_of": prevalent,
        "label_codes": {"t2d": "E11.*", "ckd": "N18.*", "hf": "I50.*"},
    }
