"""The synthetic FHIR export looks like a real (Synthea-style) one, and its ground truth says
what was planted: statuses, late recording, partial dates, deaths, children, late
registration, and note mentions with their assertions."""
from __future__ import annotations

import base64
import functools
import json
import re
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path
from typing import Any

from synth_published_codes import GROUP_WORDS, ICD9, SNOMED, group_of

from synth.emr import read_truth

V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
CLINICAL = {"active", "recurrence", "relapse", "inactive", "remission", "resolved"}
VERIFICATION = {"unconfirmed", "provisional", "differential", "confirmed", "refuted",
                "entered-in-error"}
AS_OF = "2024-06-30"
FHIR_DATE = re.compile(r"^\d{4}(-\d{2}(-\d{2}(T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2}))?)?)?$")


@functools.lru_cache(maxsize=None)
def _read(out: Path) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in sorted(out.glob("*.ndjson")):
        by[f.name.split(".")[0]] += [json.loads(line) for line in f.read_text().splitlines()]
    return by


def _truth(out: Path, name: str) -> list[dict[str, Any]]:
    return read_truth(out, name)


def _ver(res: dict[str, Any]) -> str:
    return res["verificationStatus"]["coding"][0]["code"]


def test_patients_carry_a_typed_mrn_and_deaths_as_synthea_writes_them(clean_fhir_export) -> None:
    out, _ = clean_fhir_export
    truth = {r["patient"]: r for r in _truth(out, "patients")}
    patients = _read(out)["Patient"]
    assert len(patients) == len(truth)
    flagged = 0
    for p in patients:
        t = truth[p["id"]]
        mr = [i for i in p["identifier"]
              if any(c["system"] == V2_0203 and c["code"] == "MR" for c in i.get("type", {}).get("coding", []))]
        assert len(mr) == 1 and mr[0]["value"] == t["mrn"] and mr[0]["system"].startswith("http")
        assert p["name"][0]["family"] and p["name"][0]["given"]
        assert p["telecom"][0]["system"] == "phone" and p["address"][0]["country"] == "US"
        assert p["birthDate"] == t["birth_date"] and p["gender"] == t["sex"]
        if t["death_date"] is None:
            assert "deceasedDateTime" not in p and "deceasedBoolean" not in p
        elif "deceasedBoolean" in p:  # only flagged: the last update says when it was learnt
            assert p["deceasedBoolean"] is True and "deceasedDateTime" not in p
            assert p["meta"]["lastUpdated"][:10] == t["death_date"]
            flagged += 1
        else:
            assert p["deceasedDateTime"][:10] == t["death_date"]
    mrns = [t["mrn"] for t in truth.values()]
    assert len(set(mrns)) == len(mrns)
    assert 0.02 < sum(t["death_date"] is not None for t in truth.values()) / len(truth) < 0.2
    assert flagged > 0


def test_records_stop_at_death_and_after_leaving_care(clean_fhir_export) -> None:
    out, _ = clean_fhir_export
    truth = {r["patient"]: r for r in _truth(out, "patients")}
    res = _read(out)
    last: dict[str, str] = {}
    first: dict[str, str] = {}
    for rtype, field in (("Encounter", "period"), ("Observation", "effectiveDateTime"),
                         ("Condition", "recordedDate"), ("DocumentReference", "date")):
        for r in res[rtype]:
            pid = r["subject"]["reference"].removeprefix("Patient/")
            day = (r[field]["end"] if field == "period" else r[field])[:10]
            last[pid] = max(last.get(pid, ""), day)
            if rtype == "Encounter":
                first[pid] = min(first.get(pid, "9999"), r["period"]["start"][:10])
    for pid, t in truth.items():
        if t["death_date"]:
            assert last[pid] <= t["death_date"], pid
        if t["left_care"]:
            assert last[pid] <= t["observation_end_date"] < "2025-12-31"
        assert first[pid] == t["registration_date"]


def test_population_mixes_children_deaths_and_late_registration(clean_fhir_export) -> None:
    out, summary = clean_fhir_export
    truth = _truth(out, "patients")
    ages = [(date.fromisoformat(AS_OF) - date.fromisoformat(t["birth_date"])).days / 365.25
            for t in truth]
    children = [a for a in ages if a < 18]
    assert min(children) < 2 and max(children) > 15 and 0.05 < len(children) / len(ages) < 0.25
    late = [t for t in truth if t["registration_date"] > AS_OF]
    assert late, "some patients register after the demo as-of date"
    assert summary["truth"]["registered_after_demo_as_of"] == len(late)
    # A late registrant's old conditions are recorded at registration, years after onset.
    conds = _read(out)["Condition"]
    late_ids = {"Patient/" + t["patient"] for t in late}
    gaps = [int(c["recordedDate"][:4]) - int(c["onsetDateTime"][:4]) for c in conds
            if c["subject"]["reference"] in late_ids]
    assert max(gaps) >= 5


def test_conditions_follow_fhir_status_rules_and_dates(clean_fhir_export) -> None:
    out, _ = clean_fhir_export
    conds = _read(out)["Condition"]
    seen: Counter = Counter()
    partial: Counter = Counter()
    for c in conds:
        ver = _ver(c)
        assert ver in VERIFICATION
        seen[ver] += 1
        if ver in ("entered-in-error", "refuted"):
            assert "clinicalStatus" not in c  # nothing clinical to say about a non-diagnosis
        else:
            clin = c["clinicalStatus"]["coding"][0]["code"]
            assert clin in CLINICAL
            if "abatementDateTime" in c:  # FHIR con-4: abated means no longer active
                assert clin in ("inactive", "resolved", "remission")
                assert c["abatementDateTime"] >= c["onsetDateTime"][:10]
        for fld in ("onsetDateTime", "recordedDate", "abatementDateTime"):
            if fld in c:
                assert FHIR_DATE.match(c[fld]), c[fld]
        onset = c["onsetDateTime"]
        partial[len(onset)] += 1
        assert onset[:len(onset)] <= c["recordedDate"][:len(onset)]  # never recorded before onset
        for cd in c["code"]["coding"]:
            if cd["system"] == SNOMED:
                assert re.search(r" \((disorder|finding|situation)\)$", cd["display"]), cd
            if cd["system"] == ICD9:
                # ICD-9-CM only before ICD-10-CM took over, and then alone.
                assert c["recordedDate"] < "2015-10-01" and len(c["code"]["coding"]) == 1
    for ver in VERIFICATION:
        assert seen[ver] > 0, ver
    assert seen["confirmed"] > 0.9 * sum(seen.values())
    assert partial[4] > 0 and partial[7] > 0 and partial[10] > 0  # "2019", "2019-03", "2019-03-04"
    snomed_only = sum(all(cd["system"] == SNOMED for cd in c["code"]["coding"]) for c in conds)
    assert snomed_only > 0.5 * len(conds)
    # Synthea's kidney module: an earlier CKD stage is resolved when the next is recorded.
    assert any(group_of(cd["system"], cd["code"]) == "ckd" and "abatementDateTime" in c
               for c in conds for cd in c["code"]["coding"])


def test_truth_known_dates_match_the_confirmed_records(clean_fhir_export) -> None:
    """The truth's first-known day per target group is what the records say, read with the
    published code systems' own group membership, counting confirmed diagnoses only."""
    out, _ = clean_fhir_export
    first: dict[tuple[str, str], str] = {}
    unconfirmed: list[tuple[str, str, str]] = []
    late_coded = 0
    for c in _read(out)["Condition"]:
        pid = c["subject"]["reference"].removeprefix("Patient/")
        groups = {group_of(cd["system"], cd["code"]) for cd in c["code"]["coding"]} - {None}
        for g in groups:
            if _ver(c) == "confirmed":
                key = (pid, g)
                first[key] = min(first.get(key, "9999"), c["recordedDate"][:10])
                if c["onsetDateTime"][:10] < c["recordedDate"][:10] and "encounter" in c \
                        and c["category"][0]["coding"][0]["code"] == "encounter-diagnosis":
                    late_coded += 1
            else:
                unconfirmed.append((pid, g, c["recordedDate"][:10]))
    truth = {r["patient"]: r for r in _truth(out, "patients")}
    for g in ("t2d", "ckd", "heart_failure"):
        for pid, t in truth.items():
            assert t[f"known_{g}"] == first.get((pid, g)), (pid, g)
    # A suspected, refuted or mistaken diagnosis is never written for a patient who has it.
    for pid, g, day in unconfirmed:
        known = truth[pid][f"known_{g}"]
        assert known is None or known > day, (pid, g, day)
    assert late_coded > 0  # diagnoses coded weeks after the visit: known later than they happened


def test_notes_are_in_synthea_layout_and_every_planted_mention_is_where_the_truth_says(
        clean_fhir_export) -> None:
    out, _ = clean_fhir_export
    docs = {d["id"]: d for d in _read(out)["DocumentReference"]}
    texts = {i: base64.b64decode(d["content"][0]["attachment"]["data"]).decode() for i, d in docs.items()}
    assert all(d["category"][0]["coding"][0]["code"] == "clinical-note" for d in docs.values())
    for t in texts.values():
        assert re.match(r"^\d{4}-\d{2}-\d{2}\n", t)
        for header in ("# Chief Complaint", "# History of Present Illness", "# Assessment and Plan"):
            assert header in t
    assert sum("Patient is presenting with" in t for t in texts.values()) > 50
    assert any(re.search(r"Patient has a history of [a-z ,]+\(disorder\)", t) for t in texts.values())
    truth_p = {r["patient"]: r for r in _truth(out, "patients")}
    mentions = _truth(out, "mentions")
    kinds: Counter = Counter()
    words: set[str] = set()
    for m in mentions:
        doc = docs[m["note"]]
        assert doc["subject"]["reference"] == "Patient/" + m["patient"]
        span = texts[m["note"]][m["start"]:m["end"]]
        assert GROUP_WORDS[m["group"]].search(span), (m, span)
        kinds[m["assertion"]] += 1
        words.add(span)
        # True to the patient: asserted present only once it started, absent only before.
        onset = truth_p[m["patient"]][f"onset_{m['group']}"]
        day = doc["context"]["period"]["start"][:10]
        if m["assertion"] in ("affirmed", "history"):
            assert onset is not None and onset[:len(onset)] <= day[:len(onset)], (m, onset, day)
        elif m["assertion"] in ("negated", "possible", "hypothetical"):
            assert onset is None or onset > day, (m, onset, day)
    assert set(kinds) == {"affirmed", "history", "negated", "possible", "family", "hypothetical"}
    for abbreviation in ("T2DM", "CKD", "CHF", "HFrEF"):
        assert abbreviation in words, abbreviation
