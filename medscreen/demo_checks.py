"""What ``medscreen demo`` checks of its own outputs against what the generators planted (AUC per
head, operating points, CT detection, notes), the verdicts, and the summary it prints."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from conf.settings import HEADS, Settings


# Agreement the demo demands of its own outputs. AUC is only compared with enough
# labelled positives for the difference to mean something (its standard error
# at 200 positives is about 0.02).
AUC_TOLERANCE = 0.05
AUC_MIN_POSITIVES = 200
CT_MIN_SENSITIVITY = 0.8


def verdicts(s: dict[str, Any]) -> list[dict[str, Any]]:
    """Each check: passed True/False, or None when the data are too few to judge."""
    checks: list[dict[str, Any]] = []
    emr = s.get("emr_check") or {}
    for head in HEADS:
        auc, card, pos = emr.get(f"auc_{head}"), emr.get(f"card_auc_{head}"), emr.get(f"positives_{head}", 0)
        name = f"AUC {head} within {AUC_TOLERANCE} of the model card"
        if auc is None or card is None or pos < AUC_MIN_POSITIVES:
            checks.append({"check": name, "passed": None,
                           "detail": f"not judged: {pos} labelled positives (< {AUC_MIN_POSITIVES}) or no card AUC"})
        else:
            checks.append({"check": name, "passed": abs(auc - card) <= AUC_TOLERANCE,
                           "detail": f"{auc} vs card {card}"})
    ops = s.get("operating_points") or {}
    if ops:
        young = ops.get("listed_below_min_age", {})
        checks.append({"check": "nobody below a head's minimum age or without an encounter on its list",
                       "passed": not any(young.values()) and not any(ops.get("listed_without_encounter", {}).values()),
                       "detail": f"below minimum age per head {young}; without an encounter per head "
                                 f"{ops.get('listed_without_encounter')}"})
    ct = s.get("ct_check")
    if ct is not None:
        sens = ct.get("sensitivity")
        checks.append({"check": f"CT sensitivity >= {CT_MIN_SENSITIVITY} for nodules >= 6 mm within 5 mm",
                       "passed": None if sens is None else sens >= CT_MIN_SENSITIVITY,
                       "detail": f"{ct.get('found_within_5mm')}/{ct.get('nodules_ge_6mm')}"})
    phi = s.get("phi_audit")
    if phi is not None:
        checks.append({"check": "PHI audit: no input identifier in the lake", "passed": not phi["findings"],
                       "detail": f"{len(phi['findings'])} findings; {phi['identifiers']} identifiers, "
                                 f"{phi['files_scanned']} files scanned"})
    return checks


def notes_diagnoses(settings: Settings) -> dict[str, int]:
    """Diagnosis events the ingest found in notes (kind dx_text), by assertion and by how they were
    written (words: code_system text; literal ICD-10-CM codes); ``counted`` = affirmed + history."""
    import pyarrow.parquet as pq

    from lake.paths import LakePaths

    out = {a: 0 for a in ("affirmed", "history", "negated", "possible", "family", "hypothetical",
                          "counted", "words", "codes")}
    for f in sorted(LakePaths(settings.lake.root).events.glob("*.parquet")):
        t = pq.read_table(f, columns=["kind", "code_system", "assertion"], filters=[("kind", "=", "dx_text")])
        for system, assertion in zip(t.column("code_system").to_pylist(), t.column("assertion").to_pylist()):
            if assertion in out:
                out[assertion] += 1
            if assertion in ("affirmed", "history"):
                out["counted"] += 1
                out["words" if system == "text" else "codes"] += 1
    return out


def check_emr(settings: Settings, as_of: str) -> dict[str, Any]:
    """AUC of the committed scores against the labels, next to the model card's held-out AUC."""
    import yaml

    from engines.metrics import roc_auc
    from lake.commit import is_committed, read_partition
    from lake.paths import LakePaths

    lp = LakePaths(settings.lake.root)
    scores = read_partition(lp.scores("emr_risk", as_of), columns=[
        "patient_key", "score_t2d", "score_ckd", "score_hf"]).to_pandas()
    labels = read_partition(lp.timelines(as_of), columns=[
        "patient_key", "label_t2d", "label_ckd", "label_hf"]).to_pandas()
    merged = scores.merge(labels, on="patient_key")
    card = yaml.safe_load(Path(settings.models["emr_risk"]).read_text())
    out: dict[str, Any] = {"scored": int(len(scores))}
    for head in HEADS:
        m = merged[merged[f"label_{head}"].notna()]
        y, p = m[f"label_{head}"].to_numpy(dtype=int), m[f"score_{head}"].to_numpy()
        out[f"auc_{head}"] = round(roc_auc(y, p), 4) if 0 < y.sum() < len(y) else None
        out[f"positives_{head}"] = int(y.sum())
        card_auc = (((card.get("metrics") or {}).get("heads") or {}).get(head) or {}).get("auc")
        out[f"card_auc_{head}"] = card_auc
    screening = lp.screening(as_of)
    out["screening_rows"] = read_partition(screening).num_rows if is_committed(screening) else 0
    return out


def operating_points(settings: Settings, as_of: str) -> dict[str, Any]:
    """Per head: the list's size against the eligible, the threshold and where it came from (with the
    card's held-out sensitivity/PPV), and who on the list the eligibility rules should have kept off."""
    import numpy as np
    import pyarrow.compute as pc

    from lake.commit import is_committed, read_manifest, read_partition
    from lake.paths import LakePaths
    from preprocessing.vocabulary import default_vocabulary

    lp = LakePaths(settings.lake.root)
    if not is_committed(lp.screening(as_of)):
        return {}
    manifest = read_manifest(lp.screening(as_of))
    listed = read_partition(lp.screening(as_of), columns=["patient_key", "head"])
    timelines = read_partition(lp.timelines(as_of), columns=["patient_key", "age_years", "tokens"])
    index = pc.index_in(listed.column("patient_key"), value_set=timelines.column("patient_key"))
    ages = timelines.column("age_years").take(index).to_numpy(zero_copy_only=False)
    encounter = default_vocabulary().id_of("encounter")
    has_encounter = np.array([encounter in (t or []) for t in timelines.column("tokens").take(index).to_pylist()])
    heads = np.asarray(listed.column("head").to_pylist())
    out: dict[str, Any] = {"heads": {}, "listed_below_min_age": {}, "listed_without_encounter": {}}
    for head, e in ((manifest.get("eligibility") or {}).get("heads") or {}).items():
        t = ((manifest.get("criterion") or {}).get("thresholds") or {}).get(head) or {}
        holdout = t.get("holdout") or {}
        out["heads"][head] = {"listed": e.get("flagged"), "eligible": (e.get("counts") or {}).get("eligible"),
                              "per_1000_eligible": e.get("flagged_per_1000_eligible"),
                              "threshold": t.get("threshold"), "source": t.get("source"),
                              "rule": (t.get("rule") or {}).get("name"), "target": (t.get("rule") or {}).get("target"),
                              "holdout_sensitivity": holdout.get("sensitivity"), "holdout_ppv": holdout.get("ppv"),
                              "holdout_per_1000_eligible": holdout.get("per_1000_eligible")}
        mine = heads == head
        out["listed_below_min_age"][head] = int((np.floor(ages[mine]) < e["min_age_years"]).sum())
        out["listed_without_encounter"][head] = int((~has_encounter[mine]).sum())
    return out


def check_ct(settings: Settings, as_of: str, dicom_dir: Path) -> dict[str, Any]:
    """Sensitivity for planted nodules ≥ 6 mm (a finding within 5 mm) and false positives per series."""
    import numpy as np

    from lake.commit import read_partition
    from lake.keys import load_key, pseudonymise
    from lake.paths import LakePaths

    truth = json.loads((dicom_dir / "ground_truth.json").read_text())
    key = load_key(settings.pseudonym)
    findings = read_partition(LakePaths(settings.lake.root).findings("ct_nodule", as_of)).to_pandas()
    hit = total = fp = 0
    series_n = 0
    for s in truth["series"]:
        sk = pseudonymise(key, s["series_instance_uid"])
        f = findings[findings.series_key == sk]
        if not s["nodules"] and f.empty:
            series_n += 1
            continue
        series_n += 1
        centres = f[["centre_x_mm", "centre_y_mm", "centre_z_mm"]].to_numpy()
        matched = np.zeros(len(f), dtype=bool)
        for n in s["nodules"]:
            if len(centres):
                dist = np.linalg.norm(centres - np.asarray(n["centre_lps_mm"]), axis=1)
                near = dist <= 5.0
                matched |= near
            else:
                near = np.array([False])
            if n["diameter_mm"] >= 6:
                total += 1
                hit += int(near.any())
        fp += int((~matched).sum())
    return {"nodules_ge_6mm": total, "found_within_5mm": hit,
            "sensitivity": round(hit / total, 3) if total else None,
            "false_positives_per_series": round(fp / max(series_n, 1), 2),
            "findings": int(len(findings))}


def print_summary(settings: Settings, s: dict[str, Any]) -> None:
    """Print the demo's summary: counts per stage, quarantine reasons, outputs and every verdict."""
    from lake.paths import LakePaths

    lp = LakePaths(settings.lake.root)
    w = sys.stdout.write
    w("\n=== medscreen demo summary ===\n")
    synth = s.get("synth_emr") or {}
    if synth.get("files"):
        w(f"synthetic EMR     {sum(synth['files'].values()):>10,} NDJSON lines in {len(synth['files'])} files "
          f"for {synth.get('patients', 0):,} patients ({synth.get('bad_records_total', 0):,} planted bad records)\n")
    ing = (s.get("ingest") or {}).get("counts") or {}
    main = ing.get("emr_ingest") or {}
    if main:
        w(f"ingest            {main['records_in']:>10,} records in = {main['records_out']:,} out "
          f"+ {main.get('quarantined_total', 0):,} quarantined + {main.get('ignored_total', 0):,} ignored "
          f"({'balanced' if main.get('balanced') else 'NOT BALANCED'})\n")
        for label, key in (("quarantined", "quarantined"), ("ignored by rule", "ignored")):
            for reason, n in sorted((main.get(key) or {}).items(), key=lambda kv: -kv[1]):
                w(f"    {label:<16} {reason:<24} {n:>8,}\n")
    for stage, led in ing.items():
        if stage != "emr_ingest" and isinstance(led, dict) and "records_out" in led:
            w(f"    {stage:<41} {led['records_out']:>8,} {led.get('unit', 'rows')}\n")
    # Coded diagnoses per vocabulary: in a disease group (conf/code_groups.yaml) or in none.
    dx_counts = (s.get("ingest") or {}).get("diagnoses") or {}
    for system, c in sorted((dx_counts.get("by_vocabulary") or {}).items()):
        w(f"    diagnoses {system:<10} {c.get('in_group', 0):>10,} in a code group, "
          f"{c.get('no_group', 0):,} in none\n")
    if dx_counts.get("standard_concept"):
        std = dx_counts["standard_concept"]
        w(f"    OMOP conditions  {std.get('mapped', 0):>10,} with a standard concept, "
          f"{std.get('not_mapped', 0):,} without\n")
    feat = s.get("features") or {}
    if feat:
        length = feat.get("length") or {}
        w(f"timelines         {feat.get('rows', 0):>10,} patients as of {s['as_of']} from "
          f"{feat.get('events_out', 0):,} of {feat.get('events_in', 0):,} events "
          f"(length p50 {length.get('p50')}, p95 {length.get('p95')})\n")
        for reason, n in sorted((feat.get("events_ignored") or {}).items(), key=lambda kv: -kv[1]):
            w(f"    {'events ignored':<16} {reason:<24} {n:>8,}\n")
        for reason, n in (feat.get("not_in_population") or {}).items():
            w(f"    {'not in as-of population':<24} {reason:<16} {n:>8,}\n")
    notes = s.get("notes") or {}
    if notes:
        w(f"from notes        {notes['counted']:>10,} diagnoses counted (affirmed {notes['affirmed']:,}, history "
          f"{notes['history']:,}; {notes['words']:,} in words, {notes['codes']:,} literal codes); not counted: "
          + ", ".join(f"{a} {notes[a]:,}" for a in ("negated", "possible", "family", "hypothetical")) + "\n")
    w(f"engine            {Path(str(s.get('engine_emr'))).name}\n")
    chk = s.get("emr_check") or {}
    if chk:
        w(f"scores            {chk.get('scored', 0):>10,} patients; screening list {chk.get('screening_rows', 0):,} rows\n")
        for head in HEADS:
            w(f"    AUC {head:<4} against the labels {chk.get(f'auc_{head}')}  "
              f"(model card, held out: {chk.get(f'card_auc_{head}')})\n")
    for head, op in ((s.get("operating_points") or {}).get("heads") or {}).items():
        at = f"threshold {op['threshold']:.4g}" if op.get("threshold") is not None else "top k"
        w(f"    list {head:<4} {op['listed'] or 0:>6,} of {op['eligible'] or 0:,} eligible ({op['per_1000_eligible']} "
          f"per 1000) at {at} ({op['source']}"
          + (f"; rule {op['rule']} {op['target']:g}: held out {op['holdout_per_1000_eligible']} per 1000, "
             f"sensitivity {op['holdout_sensitivity']}, PPV {op['holdout_ppv']}" if op.get("rule") else "")
          + ")\n")
    if "ct_check" in s:
        idx = (s.get("dicom_index") or {}).get("counts") or {}
        w(f"DICOM index       {idx.get('files', 0):>10,} files, {idx.get('series', 0)} series: "
          f"{', '.join(f'{k} {v}' for k, v in (idx.get('series_verdicts') or {}).items())}; "
          f"files quarantined: {', '.join(f'{k} {v}' for k, v in (idx.get('quarantined_files') or {}).items())}\n")
        ct = s["ct_check"]
        w(f"CT findings       {ct.get('findings', 0):>10,}; planted nodules >= 6 mm found within 5 mm: "
          f"{ct.get('found_within_5mm')}/{ct.get('nodules_ge_6mm')} (sensitivity {ct.get('sensitivity')}), "
          f"false positives per series {ct.get('false_positives_per_series')}\n")
        link = s.get("imaging_link") or {}
        w(f"imaging ↔ EMR     {link.get('linked', 0):>10,} of {link.get('series', 0):,} series linked to an EMR "
          f"patient by MRN; unlinked: {', '.join(f'{k} {v}' for k, v in (link.get('unlinked') or {}).items()) or 'none'}\n")
        wl = s.get("worklist") or {}
        w(f"worklist          {wl.get('rows', 0):>10,} patients: {wl.get('with_risk_heads', 0):,} with risk heads, "
          f"{wl.get('with_ct_findings', 0):,} with open CT findings, {wl.get('with_both', 0):,} both; "
          f"{wl.get('unlinked_findings', 0):,} findings on unlinked series\n")
    phi = s.get("phi_audit")
    if phi is not None:
        w(f"PHI audit         {phi['identifiers']:>10,} identifiers from the inputs "
          f"({', '.join(f'{k} {v}' for k, v in phi['kinds'].items())}); {phi['files_scanned']} lake files "
          f"scanned: {len(phi['findings'])} findings\n")
        for f in phi["findings"][:20]:
            w(f"    {f['kind']:<22} {f['masked']:<28} {f['file']} ({f['where']}) x{f['count']}\n")
    for c in s.get("checks") or []:
        verdict = {True: "ok", False: "FAILED", None: "not judged"}[c["passed"]]
        w(f"check             {verdict:<10} {c['check']}: {c['detail']}\n")
    w("outputs\n")
    for label, path in (("events", lp.events), ("quarantine", lp.emr_quarantine),
                        ("timelines", lp.timelines(s["as_of"])),
                        ("scores", lp.scores("emr_risk", s["as_of"])),
                        ("screening list", lp.screening(s["as_of"])),
                        ("findings", lp.findings("ct_nodule", s["as_of"]) if "ct_check" in s else None),
                        ("EMR scoring run", s.get("score_emr_run")),
                        ("run report", Path(s["score_emr_run"]) / "report.html" if s.get("score_emr_run") else None),
                        ("CT scoring run", s.get("score_ct_run")),
                        ("summary", Path(s["workdir"]) / "summary.json")):
        if path is not None:
            w(f"    {label:<16} {path}\n")
