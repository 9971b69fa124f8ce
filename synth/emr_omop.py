"""Render a simulated cohort as OMOP CDM 5.4 tables: CSV with header rows, lower-case columns."""
from __future__ import annotations

import csv
import io
import random
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from synth.emr_codes import (ACUTE, BMI, CONDITIONS, DBP, EGFR_CKDEPI, EGFR_MDRD,
                                       GLUCOSE, HBA1C, INVALID_ICD10, LOCAL_CONCEPT_BASE,
                                       MALFORMED_CODES, NTPROBNP, SBP, SMOKING, SMOKING_VALUES,
                                       SNOMED_PARENT, Z_ORAL_HYPOGLYCEMIC,
                                       ConditionCode, LoincCode, local_concept_id,
                                       snomed_concept_id)
from synth.emr_fhir import TRANSACTION_TIME, allocate
from synth.emr_cohort import Cohort

__all__ = ["COLUMNS", "CORE_TABLES", "LOCAL_CONCEPT_BASE", "local_concept_id", "write_omop"]

# CDM 5.4 column lists, in the order of the OHDSI DDL.
COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth",
               "birth_datetime", "race_concept_id", "ethnicity_concept_id", "location_id",
               "provider_id", "care_site_id", "person_source_value", "gender_source_value",
               "gender_source_concept_id", "race_source_value", "race_source_concept_id",
               "ethnicity_source_value", "ethnicity_source_concept_id"),
    "visit_occurrence": ("visit_occurrence_id", "person_id", "visit_concept_id", "visit_start_date",
                         "visit_start_datetime", "visit_end_date", "visit_end_datetime",
                         "visit_type_concept_id", "provider_id", "care_site_id",
                         "visit_source_value", "visit_source_concept_id",
                         "admitted_from_concept_id", "admitted_from_source_value",
                         "discharged_to_concept_id", "discharged_to_source_value",
                         "preceding_visit_occurrence_id"),
    "condition_occurrence": ("condition_occurrence_id", "person_id", "condition_concept_id",
                             "condition_start_date", "condition_start_datetime",
                             "condition_end_date", "condition_end_datetime",
                             "condition_type_concept_id", "condition_status_concept_id",
                             "stop_reason", "provider_id", "visit_occurrence_id",
                             "visit_detail_id", "condition_source_value",
                             "condition_source_concept_id", "condition_status_source_value"),
    "measurement": ("measurement_id", "person_id", "measurement_concept_id", "measurement_date",
                    "measurement_datetime", "measurement_time", "measurement_type_concept_id",
                    "operator_concept_id", "value_as_number", "value_as_concept_id",
                    "unit_concept_id", "range_low", "range_high", "provider_id",
                    "visit_occurrence_id", "visit_detail_id", "measurement_source_value",
                    "measurement_source_concept_id", "unit_source_value", "unit_source_concept_id",
                    "value_source_value", "measurement_event_id", "meas_event_field_concept_id"),
    "observation": ("observation_id", "person_id", "observation_concept_id", "observation_date",
                    "observation_datetime", "observation_type_concept_id", "value_as_number",
                    "value_as_string", "value_as_concept_id", "qualifier_concept_id",
                    "unit_concept_id", "provider_id", "visit_occurrence_id", "visit_detail_id",
                    "observation_source_value", "observation_source_concept_id",
                    "unit_source_value", "qualifier_source_value", "value_source_value",
                    "observation_event_id", "obs_event_field_concept_id"),
    "note": ("note_id", "person_id", "note_date", "note_datetime", "note_type_concept_id",
             "note_class_concept_id", "note_title", "note_text", "encoding_concept_id",
             "language_concept_id", "provider_id", "visit_occurrence_id", "visit_detail_id",
             "note_source_value", "note_event_id", "note_event_field_concept_id"),
    "observation_period": ("observation_period_id", "person_id", "observation_period_start_date",
                           "observation_period_end_date", "period_type_concept_id"),
    "death": ("person_id", "death_date", "death_datetime", "death_type_concept_id",
              "cause_concept_id", "cause_source_value", "cause_source_concept_id"),
    # The vocabulary subset, in the CDM's own vocabulary tables.
    "concept": ("concept_id", "concept_name", "domain_id", "vocabulary_id", "concept_class_id",
                "standard_concept", "concept_code", "valid_start_date", "valid_end_date",
                "invalid_reason"),
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id", "valid_start_date",
                             "valid_end_date", "invalid_reason"),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation",
                         "max_levels_of_separation"),
    "cdm_source": ("cdm_source_name", "cdm_source_abbreviation", "cdm_holder",
                   "source_description", "source_documentation_reference", "cdm_etl_reference",
                   "source_release_date", "cdm_release_date", "cdm_version",
                   "cdm_version_concept_id", "vocabulary_version"),
    # Shipped only with bad records: a table medscreen does not read.
    "drug_exposure": ("drug_exposure_id", "person_id", "drug_concept_id",
                      "drug_exposure_start_date", "drug_exposure_start_datetime",
                      "drug_exposure_end_date", "drug_exposure_end_datetime", "verbatim_end_date",
                      "drug_type_concept_id", "stop_reason", "refills", "quantity", "days_supply",
                      "sig", "route_concept_id", "lot_number", "provider_id",
                      "visit_occurrence_id", "visit_detail_id", "drug_source_value",
                      "drug_source_concept_id", "route_source_value", "dose_unit_source_value"),
}
CORE_TABLES = ("person", "visit_occurrence", "condition_occurrence", "measurement", "observation",
               "note")
BAD_KINDS: dict[str, float] = {
    "invalid_icd10": 0.16, "malformed_code": 0.10, "missing_date": 0.15, "future_date": 0.12,
    "duplicate_id": 0.13, "unknown_patient": 0.13, "malformed_line": 0.11, "unused_table": 0.10,
}
_BAD_SOURCES: dict[str, tuple[str, ...]] = {
    "invalid_icd10": ("condition_occurrence",), "malformed_code": ("condition_occurrence",),
    "missing_date": ("visit_occurrence", "condition_occurrence", "measurement"),
    "future_date": ("visit_occurrence", "condition_occurrence", "measurement"),
    "duplicate_id": ("visit_occurrence", "condition_occurrence", "measurement"),
    "unknown_patient": ("visit_occurrence", "condition_occurrence", "measurement"),
    # Measurement rows hold no quoted text, so a cut row stays one physical line.
    "malformed_line": ("measurement",),
}
DATE_COLUMNS: dict[str, tuple[str, ...]] = {
    "visit_occurrence": ("visit_start_date", "visit_start_datetime", "visit_end_date",
                         "visit_end_datetime"),
    "condition_occurrence": ("condition_start_date", "condition_start_datetime"),
    "measurement": ("measurement_date", "measurement_datetime", "measurement_time"),
}
# Real standard concepts for the fixed vocabularies (gender, visit, type, encoding, language).
# Condition concepts: OHDSI's ids where known (synth.emr_codes.SNOMED_CONCEPT_ID), local
# ids above 2e9 otherwise; measurements and observations use local LOINC/SNOMED ids.
GENDER_CONCEPT = {"male": 8507, "female": 8532}
VISIT_CONCEPT = {"AMB": 9202, "EMER": 9203, "IMP": 9201}
EHR_TYPE_CONCEPT = 32817
UTF8_CONCEPT, ENGLISH_CONCEPT = 32678, 4180186
# FHIR statuses an OMOP ETL does not load as condition occurrences.
NOT_LOADED = frozenset({"refuted", "entered-in-error"})


_OBS = {"hba1c": HBA1C, "glucose": GLUCOSE, "bmi": BMI, "sbp": SBP, "dbp": DBP,
        "egfr_mdrd": EGFR_MDRD, "egfr_ckdepi": EGFR_CKDEPI, "ntprobnp": NTPROBNP}


def _source(code: ConditionCode, style: str) -> tuple[str, int]:
    """The source value and source concept of a condition as its source system coded it."""
    if "icd10" in style:
        return code.icd10, local_concept_id("ICD10CM", code.icd10)
    if style == "icd9":
        return code.icd9, local_concept_id("ICD9CM", code.icd9)
    return code.snomed, snomed_concept_id(code.snomed)


class _Table:
    """One CSV table; rows are lists of strings in COLUMNS order."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.cols = COLUMNS[name]
        self._fh = open(out_dir / f"{name}.csv", "w", encoding="utf-8", newline="")
        self._w = csv.writer(self._fh, lineterminator="\n")
        self._w.writerow(self.cols)
        self.rows = 0

    def write(self, row: list[Any]) -> None:
        self._w.writerow(row)
        self.rows += 1

    def write_plain(self, row: list[Any]) -> None:
        """A row known to hold no comma, quote or line break: csv.writer would write the same."""
        self._fh.write(",".join(map(str, row)))
        self._fh.write("\n")
        self.rows += 1

    def write_raw(self, line: str) -> None:
        self._fh.write(line)
        self._fh.write("\n")
        self.rows += 1

    def close(self) -> None:
        self._fh.close()


def write_omop(c: Cohort, out_dir: Path, bad_share: float) -> dict[str, Any]:
    """Write cohort ``c`` as OMOP CDM 5.4 CSV tables into ``out_dir``; return the format summary."""
    obs_rows = [o for o in c.observations if o[2] != "smoking"]
    measurement_count = sum(2 if o[2] == "bp_panel" else 1 for o in obs_rows)
    smoking_rows = [o for o in c.observations if o[2] == "smoking"]
    # (index into c.conditions, record) of the conditions an ETL loads.
    cond_rows = [(i, r) for i, r in enumerate(c.conditions) if r[6] not in NOT_LOADED]
    n_good = {"person": c.patients, "visit_occurrence": len(c.encounters),
              "condition_occurrence": len(cond_rows), "measurement": measurement_count,
              "observation": len(smoking_rows), "note": len(c.notes)}
    n_bad = int(round(bad_share * sum(n_good.values())))
    bad = allocate(n_bad, BAD_KINDS) if n_bad else {k: 0 for k in BAD_KINDS}

    prng = np.random.default_rng(c.seed * 37 + 9)
    plan: dict[str, dict[int, list[str]]] = {t: {} for t in CORE_TABLES}
    icd10_rows = np.array([i for i, (_, row) in enumerate(cond_rows) if "icd10" in row[5]],
                          dtype=np.int64)
    for kind, tables in _BAD_SOURCES.items():
        k = bad[kind]
        if not k:
            continue
        sizes = np.array([n_good[t] for t in tables], dtype=np.float64)
        for ti in prng.choice(len(tables), size=k, p=sizes / sizes.sum()).tolist():
            t = tables[ti]
            idx = (int(icd10_rows[prng.integers(len(icd10_rows))])
                   if kind in ("invalid_icd10", "malformed_code") else int(prng.integers(n_good[t])))
            plan[t].setdefault(idx, []).append(kind)
    brnd = random.Random(c.seed * 89 + 13)
    next_id = {t: n_good[t] + 1 for t in CORE_TABLES}  # ids for bad copies, past the good ones
    unknown_person = c.patients + 1_000_000

    tables = {t: _Table(out_dir, t) for t in CORE_TABLES}

    def emit(t: str, i: int, row: list[Any]) -> None:
        tab = tables[t]
        if t == "note":
            tab.write(row)  # free text: needs csv quoting
        else:
            tab.write_plain(row)
        for kind in plan[t].get(i, ()):
            if kind == "duplicate_id":
                tab.write(row)  # the same row twice, as a re-run extract appends it
                continue
            b = [str(x) for x in row]
            b[0] = str(next_id[t])  # a fresh id, so each bad row is bad in one way only
            next_id[t] += 1
            if kind == "malformed_line":
                # A row cut short (an interrupted extract): too few fields, no value.
                buf = io.StringIO()
                csv.writer(buf, lineterminator="").writerow(b)
                tab.write_raw(",".join(buf.getvalue().split(",")[: 3 + brnd.randrange(3)]))
                continue
            cols = tab.cols
            if kind in ("invalid_icd10", "malformed_code"):
                b[cols.index("condition_source_value")] = brnd.choice(
                    INVALID_ICD10 if kind == "invalid_icd10" else MALFORMED_CODES)
                # An ETL maps a code it cannot find in the vocabulary to concept 0.
                b[cols.index("condition_concept_id")] = "0"
                b[cols.index("condition_source_concept_id")] = "0"
            elif kind == "unknown_patient":
                b[1] = str(unknown_person + brnd.randrange(1_000_000))
            elif kind == "missing_date":
                for col in DATE_COLUMNS[t]:
                    b[cols.index(col)] = ""
            elif kind == "future_date":
                day = f"{brnd.randint(2026, 2031):04d}-{brnd.randint(6, 12):02d}-{brnd.randint(1, 28):02d}"
                for col in DATE_COLUMNS[t]:
                    i_col = cols.index(col)
                    if b[i_col]:
                        b[i_col] = day if col.endswith("_date") else (
                            f"{day} 09:00:00" if col.endswith("datetime") else "09:00:00")
            tab.write(b)

    for p in range(c.patients):
        bd = c.birth_date[p]
        emit("person", p, [p + 1, GENDER_CONCEPT.get(c.sex[p], 0), bd.year, bd.month, bd.day,
                           f"{bd.isoformat()} 00:00:00", 0, 0, "", "", "", c.mrn[p],
                           {"male": "M", "female": "F"}.get(c.sex[p], "U"), 0, "", 0, "", 0])
    start_pairs = [_day_and_time(e[1]) for e in c.encounters]
    starts_d = [d for d, _ in start_pairs]
    starts_dt = [t for _, t in start_pairs]
    for i, (p, start, end, cls) in enumerate(c.encounters):
        emit("visit_occurrence", i, [i + 1, p + 1, VISIT_CONCEPT[cls], starts_d[i], starts_dt[i],
                                     *_day_and_time(end),
                                     EHR_TYPE_CONCEPT, "", "", cls, 0, 0, "", 0, "", ""])
    condition_ids: list[int | None] = [None] * len(c.conditions)
    for i, (ci, (p, e, onset, category, code, style, ver, _clin, recorded, abatement,
                 _key)) in enumerate(cond_rows):
        condition_ids[ci] = i + 1
        src, src_concept = _source(code, style)
        # OMOP dates a problem-list entry by its onset where known (recorded date otherwise).
        if onset and len(onset) >= 10:
            d, dtm = onset[:10], (onset[:10] + " " + onset[11:19] if len(onset) > 10
                                  else onset[:10] + " 00:00:00")
        elif onset:  # partial date: start of the period, as OMOP ETLs do
            d = (onset + "-01-01")[:10] if len(onset) == 4 else onset + "-01"
            dtm = d + " 00:00:00"
        else:
            d, dtm = starts_d[e], starts_dt[e]
        end_d, end_dt = (abatement[:10], abatement[:10] + " " + abatement[11:19]) if abatement \
            else ("", "")
        # The FHIR verification status survives only as the status source value: OMOP has
        # no standard concept for "provisional" or "differential".
        status = category if ver == "confirmed" else ver
        emit("condition_occurrence", i, [
            i + 1, p + 1, snomed_concept_id(code.snomed), d, dtm, end_d, end_dt,
            EHR_TYPE_CONCEPT, 0, "", "", e + 1 if e >= 0 else "",
            "", src, src_concept, status])
    mi = 0
    for p, e, kind, v1, v2 in obs_rows:
        parts = [(SBP, v1), (DBP, v2)] if kind == "bp_panel" else [(_OBS[kind], v1)]
        for loinc, value in parts:
            emit("measurement", mi, _measurement_row(mi + 1, p, e, loinc, value, starts_d[e],
                                                      starts_dt[e]))
            mi += 1
    for i, (p, e, _kind, v1, _v2) in enumerate(smoking_rows):
        sct, disp = SMOKING_VALUES[int(v1)]
        emit("observation", i, [i + 1, p + 1, local_concept_id("LOINC", SMOKING.code), starts_d[e],
                                starts_dt[e], EHR_TYPE_CONCEPT, "", disp,
                                local_concept_id("SNOMED", sct), 0, 0, "", e + 1, "",
                                SMOKING.code, local_concept_id("LOINC", SMOKING.code), "", "",
                                disp, "", ""])
    for i, (p, e, text) in enumerate(c.notes):
        emit("note", i, [i + 1, p + 1, *_day_and_time(c.encounters[e][2]),
                         EHR_TYPE_CONCEPT, 0, "Progress note", text, UTF8_CONCEPT, ENGLISH_CONCEPT,
                         "", e + 1, "", "11506-3", "", ""])
    for t in tables.values():
        t.close()

    files = {f"{t}.csv": tables[t].rows for t in CORE_TABLES}
    for name, rows in (("observation_period", _observation_periods(c)), ("death", _deaths(c)),
                       *_vocabulary(c)):
        tab = _Table(out_dir, name)
        for row in rows:
            tab.write(row)
        tab.close()
        files[f"{name}.csv"] = tab.rows
    src = _Table(out_dir, "cdm_source")
    src.write(["medscreen synthetic EMR", "MEDSCREEN_SYNTH", "medscreen",
               f"synthetic cohort, seed {c.seed}", "", "", TRANSACTION_TIME[:10],
               TRANSACTION_TIME[:10], "v5.4", 0, "synthetic"])
    src.close()
    files["cdm_source.csv"] = 1
    if bad["unused_table"]:
        drugs = _Table(out_dir, "drug_exposure")
        for i in range(bad["unused_table"]):
            e = brnd.randrange(len(c.encounters))
            p = c.encounters[e][0]
            drugs.write([i + 1, p + 1, local_concept_id("RxNorm", "860975"), starts_d[e],
                         starts_dt[e], "", "", "", EHR_TYPE_CONCEPT, "", 2, 60, 30,
                         "take 1 tablet twice daily", 0, "", "", e + 1, "",
                         "metformin 500 MG Oral Tablet", 0, "oral", "mg"])
        drugs.close()
        files["drug_exposure.csv"] = drugs.rows
    return {
        "transaction_time": TRANSACTION_TIME,
        "records": n_good,
        "files": files,
        "bad_records": bad,
        "bad_records_total": sum(bad.values()),
        "_ids": {"patient": list(range(1, c.patients + 1)), "condition": condition_ids,
                 "note": list(range(1, len(c.notes) + 1))},
    }


def _observation_periods(c: Cohort) -> list[list[Any]]:
    """One period per registered person: from the first record known (the migrated ICD-9-CM
    list or the registration visit) to death, leaving care, or the data's end."""
    first: dict[int, str] = {}
    for r in c.conditions:
        if r[1] < 0:
            day = r[8][:10]
            if r[0] not in first or day < first[r[0]]:
                first[r[0]] = day
    rows = []
    for p in range(c.patients):
        reg = c.registration_date[p]
        if reg is None:
            continue
        start = min(first.get(p, reg.isoformat()), reg.isoformat())
        rows.append([len(rows) + 1, p + 1, start, c.observation_end[p].isoformat(),
                     EHR_TYPE_CONCEPT])
    return rows


def _deaths(c: Cohort) -> list[list[Any]]:
    return [[p + 1, d.isoformat(), f"{d.isoformat()} 00:00:00", EHR_TYPE_CONCEPT, 0, "", 0]
            for p, d in enumerate(c.death_date) if d is not None]


_VALID = ("1970-01-01", "2099-12-31", "")


def _vocabulary(c: Cohort) -> list[tuple[str, list[list[Any]]]]:
    """The subset of the OMOP vocabulary the export's concepts need: condition concepts
    (standard SNOMED CT, non-standard ICD-10-CM / ICD-9-CM source concepts with 'Maps to'),
    their SNOMED hierarchy in concept_ancestor, and the fixed type/visit/gender concepts."""
    codes: list[ConditionCode] = [cd for v in CONDITIONS.values() for cd in v]
    codes += [*ACUTE, Z_ORAL_HYPOGLYCEMIC]
    concept: dict[int, list[Any]] = {}
    rel: set[tuple[int, int, str]] = set()
    mapped: set[int] = set()  # a source concept maps to one standard concept

    def add(cid: int, name: str, domain: str, vocab: str, cls: str, std: str, code: str) -> None:
        concept.setdefault(cid, [cid, name[:255], domain, vocab, cls, std, code, *_VALID])

    # The most general SNOMED name first, so a source code shared by several stages
    # (ICD-9-CM 585.3) maps to the general concept (CKD stage 3), not one sub-stage.
    for cd in sorted(codes, key=lambda cd: (len(cd.snomed_display), cd.snomed, cd.icd10)):
        sid = snomed_concept_id(cd.snomed)
        add(sid, cd.snomed_display.rsplit(" (", 1)[0], "Condition", "SNOMED", "Clinical Finding",
            "S", cd.snomed)
        rel.add((sid, sid, "Maps to"))
        rel.add((sid, sid, "Mapped from"))
        for vocab, code, name in (("ICD10CM", cd.icd10, cd.display), ("ICD9CM", cd.icd9,
                                                                        cd.icd9_display)):
            src = local_concept_id(vocab, code)
            # Every code here is billable (a leaf), named as OHDSI's concept classes are.
            digits = len(code.replace(".", ""))
            add(src, name, "Condition", vocab, f"{digits}-char billing code" if vocab == "ICD10CM"
                else f"{digits}-dig billing code", "", code)
            if src not in mapped:
                mapped.add(src)
                rel.add((src, sid, "Maps to"))
                rel.add((sid, src, "Mapped from"))
    # Parents named in SNOMED_PARENT that no condition code uses directly.
    for child, parent in SNOMED_PARENT.items():
        pid = snomed_concept_id(parent)
        if pid not in concept:
            add(pid, {"433144002": "Chronic kidney disease stage 3"}.get(parent, parent),
                "Condition", "SNOMED", "Clinical Finding", "S", parent)
        cid = snomed_concept_id(child)
        rel.add((cid, pid, "Is a"))
        rel.add((pid, cid, "Subsumes"))
    for cid, name, domain, vocab, cls in (
            (8507, "MALE", "Gender", "Gender", "Gender"), (8532, "FEMALE", "Gender", "Gender", "Gender"),
            (9201, "Inpatient Visit", "Visit", "Visit", "Visit"),
            (9202, "Outpatient Visit", "Visit", "Visit", "Visit"),
            (9203, "Emergency Room Visit", "Visit", "Visit", "Visit"),
            (EHR_TYPE_CONCEPT, "EHR", "Type Concept", "Type Concept", "Type Concept")):
        add(cid, name, domain, vocab, cls, "S", str(cid))
    for loinc in _OBS.values():
        add(local_concept_id("LOINC", loinc.code), loinc.display, "Measurement", "LOINC",
            "Lab Test", "S", loinc.code)
    # concept_ancestor: every standard concept is its own ancestor at level 0; is-a chains
    # give the rest (the levels are the path lengths).
    ancestors: list[list[Any]] = []
    for cid, row in sorted(concept.items()):
        if row[5] != "S" or row[2] != "Condition":
            continue
        ancestors.append([cid, cid, 0, 0])
        code, level = row[6], 0
        while code in SNOMED_PARENT:
            code, level = SNOMED_PARENT[code], level + 1
            ancestors.append([snomed_concept_id(code), cid, level, level])
    rels = [[a, b, r, *_VALID] for a, b, r in sorted(rel)]
    return [("concept", [concept[k] for k in sorted(concept)]), ("concept_relationship", rels),
            ("concept_ancestor", ancestors)]


def _day_and_time(when: datetime) -> tuple[str, str]:
    """OMOP's ``YYYY-MM-DD`` and ``YYYY-MM-DD HH:MM:SS`` of a UTC time (isoformat: no strftime cost)."""
    s = when.isoformat()
    return s[:10], f"{s[:10]} {s[11:19]}"


def _measurement_row(mid: int, p: int, e: int, loinc: LoincCode, value: float, day: str,
                     when: str) -> list[Any]:
    return [mid, p + 1, local_concept_id("LOINC", loinc.code), day, when, when[11:],
            EHR_TYPE_CONCEPT, 0, value, 0, 0, "", "", "", e + 1, "", loinc.code,
            local_concept_id("LOINC", loinc.code), loinc.unit, 0, str(value), "", ""]
