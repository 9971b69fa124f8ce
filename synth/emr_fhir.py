"""Render a simulated cohort as a FHIR R4 Bulk Data export (NDJSON per type + manifest.json),
with the defects of synth.emr_fhir_defects planted among the good records."""
from __future__ import annotations

import base64
import json
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from synth.emr_codes import (BMI, BP_PANEL, DBP, EGFR_CKDEPI, EGFR_MDRD, GLUCOSE, HBA1C, NTPROBNP, SBP,
                             SMOKING, SMOKING_VALUES, SYSTEM_ICD9CM, SYSTEM_ICD10CM, SYSTEM_LOINC, SYSTEM_SNOMED,
                             SYSTEM_UCUM, ConditionCode, LoincCode)
from synth.emr_cohort import START_MONTH, Cohort
from synth.emr_fhir_defects import bad_line, write_unused

TRANSACTION_TIME = "2026-01-02T04:00:00Z"
BASE_URL = "https://ehr.example.org/fhir"
MAX_LINES_PER_FILE = 100_000
CORE_TYPES = ("Patient", "Encounter", "Condition", "Observation", "DocumentReference")
# Bad-record kinds and their share of the bad records (docs/synthetic_emr.md).
BAD_KINDS: dict[str, float] = {
    "invalid_icd10": 0.15, "malformed_code": 0.10, "missing_date": 0.14, "future_date": 0.12,
    "duplicate_id": 0.12, "unknown_patient": 0.12, "malformed_json": 0.10,
    "unused_resource": 0.09, "extra_extension": 0.06,
}
# Which resource types a bad kind is planted in (copied from a good record of that type).
_BAD_SOURCES: dict[str, tuple[str, ...]] = {
    "invalid_icd10": ("Condition",), "malformed_code": ("Condition",),
    "missing_date": ("Encounter", "Condition", "Observation", "DocumentReference"),
    "future_date": ("Encounter", "Condition", "Observation", "DocumentReference"),
    "duplicate_id": ("Encounter", "Condition", "Observation"),
    "unknown_patient": ("Encounter", "Condition", "Observation", "DocumentReference"),
    "malformed_json": ("Condition", "Observation"),
}

OBS_LOINC: dict[str, LoincCode] = {"hba1c": HBA1C, "glucose": GLUCOSE, "bmi": BMI, "sbp": SBP,
                                   "dbp": DBP, "egfr_mdrd": EGFR_MDRD, "egfr_ckdepi": EGFR_CKDEPI,
                                   "ntprobnp": NTPROBNP}
_ENC_CLASS = {"AMB": ("ambulatory", "185349003", "Encounter for check up"),
              "EMER": ("emergency", "50849002", "Emergency room admission"),
              "IMP": ("inpatient encounter", "32485007", "Hospital admission")}
_OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
_COND_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
_CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
_VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
_CATEGORY_DISPLAY = {"problem-list-item": "Problem List Item",
                     "encounter-diagnosis": "Encounter Diagnosis"}
_V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
DECEASED_BOOLEAN_SHARE = 0.2  # of the dead: deceasedBoolean + meta.lastUpdated, no date
# Patient.identifier as Synthea writes it: its own id, then typed identifiers. The MR entry
# carries the hospital's medical record number, the key DICOM PatientID shares.
MRN_SYSTEM = "http://hospital.smarthealthit.org"
_ID_TYPES = {"MR": "Medical Record Number", "SS": "Social Security Number",
             "DL": "Driver's license number"}
_CITIES = (("Boston", "02108"), ("Worcester", "01601"), ("Springfield", "01103"),
           ("Lowell", "01850"), ("Cambridge", "02139"), ("Quincy", "02169"))
_STREETS = ("Rath Wynd", "Kuhn Mill", "Schulist Highlands", "Conn Well", "Bogan Park", "Lind Lane")


class IdStream:
    """Deterministic UUID-shaped ids (FHIR servers hand out UUIDs; ours come from the seed)."""

    _VARIANT = {h: "89ab"[int(h, 16) & 3] for h in "0123456789abcdef"}

    def __init__(self, seed: int) -> None:
        self._rnd = random.Random(seed * 7919 + 3)
        self._buf: list[str] = []

    def __call__(self) -> str:
        if not self._buf:
            # Bytes in bulk: one big hex string, sliced, is far cheaper than an int per id.
            h, v = self._rnd.randbytes(16 * 4096).hex(), self._VARIANT
            self._buf = [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-4{h[i + 13:i + 16]}-{v[h[i + 16]]}"
                         f"{h[i + 17:i + 20]}-{h[i + 20:i + 32]}" for i in range(0, len(h), 32)]
            self._buf.reverse()
        return self._buf.pop()


def allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Split ``total`` over ``weights`` by largest remainder (deterministic, sums exactly)."""
    wsum = sum(weights.values())
    raw = {k: total * w / wsum for k, w in weights.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: (-(raw[k] - out[k]), k))[: total - sum(out.values())]:
        out[k] += 1
    return out


def _z(dt: Any) -> str:
    return dt.isoformat().replace("+00:00", "Z")


def _coding(code: ConditionCode, style: str) -> list[dict[str, str]]:
    out = []
    if "icd10" in style:
        out.append({"system": SYSTEM_ICD10CM, "code": code.icd10, "display": code.display})
    if "icd9" in style:
        out.append({"system": SYSTEM_ICD9CM, "code": code.icd9, "display": code.icd9_display})
    if "snomed" in style:
        out.append({"system": SYSTEM_SNOMED, "code": code.snomed, "display": code.snomed_display})
    return out


def _qty(value: float, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": SYSTEM_UCUM, "code": unit}


def _loinc(l: LoincCode) -> dict[str, Any]:
    return {"coding": [{"system": SYSTEM_LOINC, "code": l.code, "display": l.display}],
            "text": l.short}


def _category(l: LoincCode) -> list[dict[str, Any]]:
    return [{"coding": [{"system": _OBS_CATEGORY, "code": l.category}]}]


class _Sink:
    """Writes one resource type, splitting into ``<Type>.000.ndjson`` … past the line limit."""

    def __init__(self, out_dir: Path, rtype: str, total_lines: int) -> None:
        self.out_dir, self.rtype = out_dir, rtype
        self.split = total_lines > MAX_LINES_PER_FILE
        self.files: list[tuple[str, int]] = []
        self._fh = None
        self._n = 0

    def _open(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.files[-1] = (self.files[-1][0], self._n)
        name = (f"{self.rtype}.{len(self.files):03d}.ndjson" if self.split
                else f"{self.rtype}.ndjson")
        self._fh = open(self.out_dir / name, "w", encoding="utf-8", newline="\n")
        self.files.append((name, 0))
        self._n = 0

    def write(self, line: str) -> None:
        if self._fh is None or self._n >= MAX_LINES_PER_FILE:
            self._open()
        self._fh.write(line)
        self._fh.write("\n")
        self._n += 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.files[-1] = (self.files[-1][0], self._n)


def write_fhir(c: Cohort, out_dir: Path, bad_share: float) -> dict[str, Any]:
    """Write the Bulk Data export of cohort ``c`` into ``out_dir`` (which must exist, empty).

    Returns the format part of the summary: record counts per type, lines per file, and
    the bad records planted per kind.
    """
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    new_id = IdStream(c.seed)
    pids = [new_id() for _ in range(c.patients)]
    eids = [new_id() for _ in range(len(c.encounters))]
    n_good = {"Patient": c.patients, "Encounter": len(c.encounters),
              "Condition": len(c.conditions), "Observation": len(c.observations),
              "DocumentReference": len(c.notes)}
    total_good = sum(n_good.values())
    n_bad = int(round(bad_share * total_good))
    bad = allocate(n_bad, BAD_KINDS) if n_bad else {k: 0 for k in BAD_KINDS}
    if bad["extra_extension"] > c.patients:  # extensions go on patients, one each at most
        bad["unused_resource"] += bad["extra_extension"] - c.patients
        bad["extra_extension"] = c.patients

    # Plan: which good record each bad copy follows. Seeded separately from the simulation
    # so changing the bad share never changes the good records.
    prng = np.random.default_rng(c.seed * 31 + 5)
    plan: dict[str, dict[int, list[str]]] = {t: {} for t in CORE_TYPES}
    icd10_conditions = np.array([i for i, row in enumerate(c.conditions) if "icd10" in row[5]],
                                dtype=np.int64)
    for kind, types in _BAD_SOURCES.items():
        k = bad[kind]
        if not k:
            continue
        sizes = np.array([n_good[t] for t in types], dtype=np.float64)
        tchoice = prng.choice(len(types), size=k, p=sizes / sizes.sum())
        for ti in tchoice.tolist():
            t = types[ti]
            if kind in ("invalid_icd10", "malformed_code"):
                idx = int(icd10_conditions[prng.integers(len(icd10_conditions))])
            else:
                idx = int(prng.integers(n_good[t]))
            plan[t].setdefault(idx, []).append(kind)
    ext_patients = set(prng.choice(c.patients, size=bad["extra_extension"], replace=False).tolist())
    bad_lines = {t: sum(len(v) for v in plan[t].values()) for t in CORE_TYPES}

    brnd = random.Random(c.seed * 97 + 11)

    def emit(sink: _Sink, rtype: str, i: int, line: str) -> None:
        sink.write(line)
        for kind in plan[rtype].get(i, ()):
            sink.write(bad_line(kind, rtype, line, new_id, brnd, dumps))

    sinks = {t: _Sink(out_dir, t, n_good[t] + bad_lines[t]) for t in CORE_TYPES}
    s = sinks["Patient"]
    prnd = random.Random(c.seed * 131 + 7)  # addresses, phones: their own stream
    for p in range(c.patients):
        res = _patient(c, p, pids[p], prnd)
        if p in ext_patients:
            # Fields a Synthea-style export carries that medscreen does not use.
            res["extension"] = [
                {"url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex",
                 "valueCode": {"female": "F", "male": "M"}.get(c.sex[p], "UNK")},
                {"url": "http://synthetichealth.github.io/synthea/disability-adjusted-life-years",
                 "valueDecimal": round(brnd.random() * 3, 4)}]
        emit(s, "Patient", p, dumps(res))

    # The bulk types are rendered from pre-encoded JSON fragments (json.dumps of the
    # constant parts): the same bytes json.dumps of the whole resource would give,
    # several times faster. Ids, dates and numbers need no escaping.
    starts = [_z(e[1]) for e in c.encounters]
    s = sinks["Encounter"]
    enc_frag = {cls: (dumps({"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                             "code": cls, "display": disp}),
                      dumps([{"coding": [{"system": SYSTEM_SNOMED, "code": sct,
                                          "display": sct_disp}]}]))
                for cls, (disp, sct, sct_disp) in _ENC_CLASS.items()}
    for i, (p, _start, end, cls) in enumerate(c.encounters):
        cls_j, type_j = enc_frag[cls]
        emit(s, "Encounter", i,
             f'{{"resourceType":"Encounter","id":"{eids[i]}","status":"finished",'
             f'"class":{cls_j},"type":{type_j},"subject":{{"reference":"Patient/{pids[p]}"}},'
             f'"period":{{"start":"{starts[i]}","end":"{_z(end)}"}}}}')

    s = sinks["Condition"]
    cat_j = {cat: dumps([{"coding": [{"system": _COND_CATEGORY, "code": cat,
                                      "display": disp}]}])
             for cat, disp in _CATEGORY_DISPLAY.items()}
    clin_j = {k: dumps({"coding": [{"system": _CLINICAL_SYSTEM, "code": k}]})
              for k in ("active", "resolved", "inactive")}
    ver_j = {k: dumps({"coding": [{"system": _VERIFICATION_SYSTEM, "code": k}]})
             for k in ("confirmed", "provisional", "differential", "unconfirmed", "refuted",
                       "entered-in-error")}
    code_j: dict[tuple[ConditionCode, str], str] = {}
    condition_ids: list[str] = []
    for i, (p, e, onset, category, code, style, ver, clin, recorded, abatement,
            _key) in enumerate(c.conditions):
        cj = code_j.get((code, style))
        if cj is None:
            codings = _coding(code, style)
            cj = code_j[(code, style)] = dumps({"coding": codings, "text": codings[0]["display"]})
        cid = new_id()
        condition_ids.append(cid)
        status = (f'"clinicalStatus":{clin_j[clin]},' if clin else "") + \
            f'"verificationStatus":{ver_j[ver]},'
        enc = f'"encounter":{{"reference":"Encounter/{eids[e]}"}},' if e >= 0 else ""
        when = onset if onset is not None else starts[e]
        abate = f',"abatementDateTime":"{abatement}"' if abatement else ""
        emit(s, "Condition", i,
             f'{{"resourceType":"Condition","id":"{cid}",{status}'
             f'"category":{cat_j[category]},"code":{cj},'
             f'"subject":{{"reference":"Patient/{pids[p]}"}},{enc}'
             f'"onsetDateTime":"{when}"{abate},"recordedDate":"{recorded}"}}')

    s = sinks["Observation"]
    head_j = {kind: f'"category":{dumps(_category(l))},"code":{dumps(_loinc(l))}'
              for kind, l in [*OBS_LOINC.items(), ("bp_panel", BP_PANEL), ("smoking", SMOKING)]}
    unit_j = {kind: dumps(_qty(0, l.unit))[len('{"value":0,'):-1] for kind, l in OBS_LOINC.items()}
    sbp_j, dbp_j = dumps(_loinc(SBP)), dumps(_loinc(DBP))
    smoking_j = [dumps({"coding": [{"system": SYSTEM_SNOMED, "code": sct, "display": disp}],
                        "text": disp}) for sct, disp in SMOKING_VALUES]
    ornd = random.Random(c.seed * 173 + 3)  # lab turnaround: its own stream
    for i, (p, e, kind, v1, v2) in enumerate(c.observations):
        # Vital signs are known when taken; a lab result when the lab issues it, hours later.
        issued = starts[e] if kind in _VITALS else _z(c.encounters[e][1] + timedelta(
            minutes=30 + int(ornd.random() * 2880)))
        if kind == "bp_panel":
            value = (f'"component":[{{"code":{sbp_j},"valueQuantity":{{"value":{v1!r},'
                     f'{unit_j["sbp"]}}}}},{{"code":{dbp_j},"valueQuantity":{{"value":{v2!r},'
                     f'{unit_j["dbp"]}}}}}]')
        elif kind == "smoking":
            value = f'"valueCodeableConcept":{smoking_j[int(v1)]}'
        else:
            value = f'"valueQuantity":{{"value":{v1!r},{unit_j[kind]}}}'
        emit(s, "Observation", i,
             f'{{"resourceType":"Observation","id":"{new_id()}","status":"final",{head_j[kind]},'
             f'"subject":{{"reference":"Patient/{pids[p]}"}},'
             f'"encounter":{{"reference":"Encounter/{eids[e]}"}},'
             f'"effectiveDateTime":"{starts[e]}","issued":"{issued}",{value}}}')

    s = sinks["DocumentReference"]
    # As Synthea writes its notes: two LOINC note types, the US Core clinical-note category,
    # the text base64-encoded in one text/plain attachment.
    note_type_j = dumps({"coding": [
        {"system": SYSTEM_LOINC, "code": "34117-2", "display": "History and physical note"},
        {"system": SYSTEM_LOINC, "code": "51847-2", "display": "Evaluation + Plan note"}]})
    note_cat_j = dumps([{"coding": [{
        "system": "http://hl7.org/fhir/us/core/CodeSystem/us-core-documentreference-category",
        "code": "clinical-note", "display": "Clinical Note"}]}])
    note_ids: list[str] = []
    for i, (p, e, text) in enumerate(c.notes):
        data = base64.b64encode(text.encode("utf-8")).decode("ascii")
        nid = new_id()
        note_ids.append(nid)
        emit(s, "DocumentReference", i,
             f'{{"resourceType":"DocumentReference","id":"{nid}","status":"current",'
             f'"type":{note_type_j},"category":{note_cat_j},'
             f'"subject":{{"reference":"Patient/{pids[p]}"}},'
             f'"date":"{_z(c.encounters[e][2])}",'
             f'"content":[{{"attachment":{{"contentType":"text/plain; charset=utf-8",'
             f'"data":"{data}"}}}}],'
             f'"context":{{"encounter":[{{"reference":"Encounter/{eids[e]}"}}],'
             f'"period":{{"start":"{starts[e]}","end":"{_z(c.encounters[e][2])}"}}}}}}')
    for sink in sinks.values():
        sink.close()

    files = [(t, name, n) for t in CORE_TYPES for name, n in sinks[t].files]
    files += write_unused(c, out_dir, bad["unused_resource"], pids, eids, starts, new_id, brnd,
                           dumps)
    manifest = {
        "transactionTime": TRANSACTION_TIME,
        "request": f"{BASE_URL}/$export?_type=" + ",".join(dict.fromkeys(f[0] for f in files)),
        "requiresAccessToken": True,
        "output": [{"type": t, "url": f"{BASE_URL}/bulkdata/{name}", "count": n}
                   for t, name, n in files],
        "error": [],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return {
        "transaction_time": TRANSACTION_TIME,
        "records": n_good,
        "files": {name: n for _t, name, n in files},
        "bad_records": bad,
        "bad_records_total": sum(bad.values()),
        "_ids": {"patient": pids, "condition": condition_ids, "note": note_ids},
    }


_VITALS = frozenset({"bmi", "sbp", "dbp", "bp_panel", "smoking"})


def _patient(c: Cohort, p: int, pid: str, prnd: random.Random) -> dict[str, Any]:
    """A Patient as Synthea writes it: typed identifiers (MR among them), name, telecom,
    address, and ``deceasedDateTime`` for the dead."""
    ident: list[dict[str, Any]] = [{"system": "https://github.com/synthetichealth/synthea",
                                    "value": pid}]
    ssn = f"999-{prnd.randrange(10, 100)}-{prnd.randrange(1000, 10000)}"
    for code, value, system in (("MR", c.mrn[p], MRN_SYSTEM),
                                ("SS", ssn, "http://hl7.org/fhir/sid/us-ssn"),
                                ("DL", f"S{prnd.randrange(10**7, 10**8)}",
                                 "urn:oid:2.16.840.1.113883.4.3.25")):
        if code == "DL" and _age_at_start(c, p) < 16:  # no driver's licence for children
            continue
        ident.append({"type": {"coding": [{"system": _V2_0203, "code": code,
                                           "display": _ID_TYPES[code]}],
                               "text": _ID_TYPES[code]},
                      "system": system, "value": value})
    name: dict[str, Any] = {"use": "official", "family": c.family[p], "given": [c.given[p]]}
    if _age_at_start(c, p) >= 18:
        name["prefix"] = [{"female": "Ms.", "male": "Mr."}.get(c.sex[p], "Mx.")]
    city, zip_code = _CITIES[prnd.randrange(len(_CITIES))]
    res: dict[str, Any] = {
        "resourceType": "Patient", "id": pid, "identifier": ident, "name": [name],
        "telecom": [{"system": "phone", "value": f"555-{prnd.randrange(100, 1000)}-"
                                                  f"{prnd.randrange(1000, 10000)}", "use": "home"}],
        "gender": c.sex[p], "birthDate": c.birth_date[p].isoformat(),
    }
    if c.death_date[p] is not None:
        when = f"{c.death_date[p].isoformat()}T{prnd.randrange(24):02d}:{prnd.randrange(60):02d}:00Z"
        if prnd.random() < DECEASED_BOOLEAN_SHARE:
            # Some systems only flag the death: the record's last update is when it was learnt.
            res = {"resourceType": "Patient", "id": pid, "meta": {"lastUpdated": when},
                   **{k: v for k, v in res.items() if k not in ("resourceType", "id")},
                   "deceasedBoolean": True}
        else:
            res["deceasedDateTime"] = when
    res["address"] = [{"line": [f"{prnd.randrange(1, 2000)} {_STREETS[prnd.randrange(len(_STREETS))]}"],
                       "city": city, "state": "MA", "postalCode": zip_code, "country": "US"}]
    res["communication"] = [{"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": "en-US",
                                                      "display": "English (United States)"}],
                                          "text": "English (United States)"}}]
    return res


def _age_at_start(c: Cohort, p: int) -> float:
    return (START_MONTH - c.birth_date[p]).days / 365.25
