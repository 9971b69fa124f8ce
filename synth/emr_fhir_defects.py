"""The defects the synthetic FHIR export plants: bad records of each kind ingest must quarantine,
and resource types (Claim, Immunization) real exports carry and ingest does not use."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from synth.emr_codes import INVALID_ICD10, MALFORMED_CODES, SYSTEM_ICD10CM, SYSTEM_SNOMED
from synth.emr_cohort import Cohort


def _future(brnd: random.Random) -> str:
    return (f"{brnd.randint(2026, 2031):04d}-{brnd.randint(6, 12):02d}-{brnd.randint(1, 28):02d}"
            f"T{brnd.randint(0, 23):02d}:00:00Z")


def bad_line(kind: str, rtype: str, line: str, new_id: Callable[[], str],
              brnd: random.Random, dumps: Callable[[Any], str]) -> str:
    """One good NDJSON ``line`` of type ``rtype`` turned into a bad record of ``kind`` (as ingest must
    quarantine it): a duplicate, a cut-off line, an invalid or malformed code, an unknown patient,
    dates missing or after the export."""
    if kind == "duplicate_id":
        return line  # the same resource twice, as a retried page of an export produces
    if kind == "malformed_json":
        return line[: max(10, int(len(line) * (0.3 + 0.5 * brnd.random())))]
    bad = json.loads(line)
    bad["id"] = new_id()
    if kind == "invalid_icd10":
        for cd in bad["code"]["coding"]:
            if cd["system"] == SYSTEM_ICD10CM:
                cd["code"] = brnd.choice(INVALID_ICD10)
    elif kind == "malformed_code":
        for cd in bad["code"]["coding"]:
            if cd["system"] == SYSTEM_ICD10CM:
                cd["code"] = brnd.choice(MALFORMED_CODES)
    elif kind == "unknown_patient":
        bad["subject"]["reference"] = f"Patient/{new_id()}"
    elif kind in ("missing_date", "future_date"):
        when = _future(brnd) if kind == "future_date" else None
        for fld in DATE_FIELDS[rtype]:
            if when is None:
                _drop(bad, fld)
            else:
                _set(bad, fld, when)
    else:
        raise ValueError(f"unknown bad-record kind {kind!r}")
    return dumps(bad)


# Dotted paths of the date fields per type: all removed (missing_date) or all moved past
# the export's transactionTime (future_date).
DATE_FIELDS: dict[str, tuple[str, ...]] = {
    "Encounter": ("period.start", "period.end"),
    "Condition": ("onsetDateTime", "abatementDateTime", "recordedDate"),
    "Observation": ("effectiveDateTime", "issued"),
    "DocumentReference": ("date",),
}


def _drop(d: dict[str, Any], path: str) -> None:
    *head, last = path.split(".")
    for h in head:
        d = d[h]
    d.pop(last, None)


def _set(d: dict[str, Any], path: str, value: str) -> None:
    *head, last = path.split(".")
    for h in head:
        d = d[h]
    d[last] = value


def write_unused(c: Cohort, out_dir: Path, n: int, pids: list[str], eids: list[str],
                  starts: list[str], new_id: Callable[[], str], brnd: random.Random,
                  dumps: Callable[[Any], str]) -> list[tuple[str, str, int]]:
    """Claim and Immunization resources: real Synthea-style exports carry them; we don't use them."""
    if n <= 0 or not c.encounters:
        return []
    n_claim = n // 2
    out = []
    for rtype, count in (("Claim", n_claim), ("Immunization", n - n_claim)):
        if not count:
            continue
        with open(out_dir / f"{rtype}.ndjson", "w", encoding="utf-8", newline="\n") as fh:
            for _ in range(count):
                e = brnd.randrange(len(c.encounters))
                p = c.encounters[e][0]
                if rtype == "Claim":
                    res = {"resourceType": "Claim", "id": new_id(), "status": "active",
                           "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/claim-type",
                                                "code": "professional"}]},
                           "use": "claim", "patient": {"reference": f"Patient/{pids[p]}"},
                           "created": starts[e], "provider": {"display": "Example Clinic"},
                           "priority": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/processpriority",
                                                    "code": "normal"}]},
                           "item": [{"sequence": 1,
                                     "encounter": [{"reference": f"Encounter/{eids[e]}"}],
                                     "productOrService": {"coding": [{"system": SYSTEM_SNOMED,
                                                                      "code": "185349003"}]}}],
                           "total": {"value": round(80 + 400 * brnd.random(), 2), "currency": "USD"}}
                else:
                    res = {"resourceType": "Immunization", "id": new_id(), "status": "completed",
                           "vaccineCode": {"coding": [{"system": "http://hl7.org/fhir/sid/cvx",
                                                       "code": "140",
                                                       "display": "Influenza, seasonal, injectable, preservative free"}]},
                           "patient": {"reference": f"Patient/{pids[p]}"},
                           "encounter": {"reference": f"Encounter/{eids[e]}"},
                           "occurrenceDateTime": starts[e], "primarySource": True}
                fh.write(dumps(res))
                fh.write("\n")
        out.append((rtype, f"{rtype}.ndjson", count))
    return out
