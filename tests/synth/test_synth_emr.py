"""The synthetic EMR generator: reproducible, valid where it should be, bad where it says."""
from __future__ import annotations

import functools
import json
import re
from collections import Counter, defaultdict
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
import simple_icd_10_cm as icd

from synth.emr import generate
from synth.emr_fhir_defects import DATE_FIELDS
from synth_published_codes import ICD9, ICD10, SNOMED, group_of


WELL_FORMED_ICD10 = re.compile(r"^[A-TV-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
CORE = ("Patient", "Encounter", "Condition", "Observation", "DocumentReference")


def _files(out: Path) -> dict[str, list[Path]]:
    by_type: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(out.glob("*.ndjson")):
        by_type[f.name.split(".")[0]].append(f)
    return by_type


def _get(res: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(res, dict) or part not in res:
            return None
        res = res[part]
    return res


@functools.lru_cache(maxsize=None)
def _valid_icd10(code: str) -> bool:
    return icd.is_valid_item(code)


def _verification(res: dict[str, Any]) -> str:
    return res["verificationStatus"]["coding"][0]["code"]


@functools.lru_cache(maxsize=None)  # several tests read the same session export
def _classify(out: Path, transaction_time: str) -> tuple[Counter, dict[str, list[dict]]]:
    """Count bad records by reading the files, independently of the generator's own plan."""
    counts: Counter = Counter()
    good: dict[str, list[dict]] = defaultdict(list)
    files = _files(out)
    patient_ids: set[str] = set()
    order = [t for t in CORE if t in files] + sorted(t for t in files if t not in CORE)
    for rtype in order:
        seen: set[str] = set()
        for f in files[rtype]:
            for line in f.read_text(encoding="utf-8").splitlines():
                try:
                    res = json.loads(line)
                except json.JSONDecodeError:
                    counts["malformed_json"] += 1
                    continue
                assert res["resourceType"] == rtype
                if res["id"] in seen:
                    counts["duplicate_id"] += 1
                    continue
                seen.add(res["id"])
                if rtype not in CORE:
                    counts["unused_resource"] += 1
                    continue
                if rtype == "Patient":
                    patient_ids.add(res["id"])
                    if "extension" in res:
                        counts["extra_extension"] += 1
                    good[rtype].append(res)
                    continue
                if res["subject"]["reference"].removeprefix("Patient/") not in patient_ids:
                    counts["unknown_patient"] += 1
                    continue
                dates = [d for d in (_get(res, fld) for fld in DATE_FIELDS[rtype]) if d]
                if not dates:
                    counts["missing_date"] += 1
                    continue
                if max(dates) > transaction_time:
                    counts["future_date"] += 1
                    continue
                if rtype == "Condition":
                    codes = [c["code"] for c in res["code"]["coding"] if c["system"] == ICD10]
                    if any(not WELL_FORMED_ICD10.match(c) for c in codes):
                        counts["malformed_code"] += 1
                        continue
                    if any(not _valid_icd10(c) for c in codes):
                        counts["invalid_icd10"] += 1
                        continue
                good[rtype].append(res)
    return counts, good


def test_same_seed_gives_byte_identical_files(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", patients=60, seed=3, bad_share=0.05)
    b = generate(tmp_path / "b", patients=60, seed=3, bad_share=0.05)
    assert a == b
    names = sorted(str(p.relative_to(tmp_path / "a")) for p in (tmp_path / "a").rglob("*")
                   if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "b")) for p in (tmp_path / "b").rglob("*")
                           if p.is_file())
    assert "synth_truth/patients.json" in names
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    generate(tmp_path / "c", patients=60, seed=4, bad_share=0.05)
    assert (tmp_path / "c" / "Patient.ndjson").read_bytes() != (tmp_path / "a" / "Patient.ndjson").read_bytes()


def test_rerun_replaces_an_export_and_refuses_foreign_directories(tmp_path: Path) -> None:
    out = tmp_path / "x"
    generate(out, patients=30, seed=1, bad_share=0.05)
    generate(out, patients=20, seed=1, bad_share=0.0)
    assert not (out / "Claim.ndjson").exists()  # the earlier run's files are gone
    assert len((out / "Patient.ndjson").read_text().splitlines()) == 20
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        generate(foreign, patients=5, seed=1)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_manifest_lists_every_file_with_its_line_count(fhir_export) -> None:
    out, summary = fhir_export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["transactionTime"] == summary["transaction_time"]
    listed = {o["url"].rsplit("/", 1)[1]: o for o in manifest["output"]}
    assert set(listed) == {f.name for f in out.glob("*.ndjson")}
    for name, o in listed.items():
        assert o["type"] == name.split(".")[0]
        assert o["count"] == len((out / name).read_text().splitlines())


def test_bad_record_counts_match_the_summary(fhir_export) -> None:
    out, summary = fhir_export
    counts, _ = _classify(out, summary["transaction_time"])
    planted = {k: v for k, v in summary["bad_records"].items() if v}
    assert dict(counts) == planted
    # Every kind is present at a 5 % share, and the total is that share of the good records.
    assert set(planted) == set(summary["bad_records"])
    assert summary["bad_records_total"] == round(0.05 * sum(summary["records"].values()))


def test_good_conditions_carry_valid_billable_icd10_codes(fhir_export, clean_fhir_export) -> None:
    for out, summary in (fhir_export, clean_fhir_export):
        _, good = _classify(out, summary["transaction_time"])
        systems: Counter = Counter()
        icd10_codes: set[str] = set()
        for res in good["Condition"]:
            for c in res["code"]["coding"]:
                systems[c["system"]] += 1
                if c["system"] == ICD10:
                    icd10_codes.add(c["code"])
        for code in icd10_codes:
            assert icd.is_valid_item(code) and icd.is_leaf(code), code
        # As in real mixed exports: SNOMED CT (Synthea, problem lists) first, ICD-10-CM for
        # billing, ICD-9-CM only from the migrated pre-2015 list.
        assert systems[SNOMED] > systems[ICD10] > systems[ICD9] > 0


def test_clean_export_is_all_parseable_and_consistent(clean_fhir_export) -> None:
    out, summary = clean_fhir_export
    assert summary["bad_records_total"] == 0
    assert set(_files(out)) == set(CORE)
    counts, good = _classify(out, summary["transaction_time"])
    assert not counts  # nothing classified as bad
    encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    for f in out.glob("*.ndjson"):  # fragments render exactly what json.dumps would
        for line in f.read_text(encoding="utf-8").splitlines():
            assert encode(json.loads(line)) == line
    for rtype in CORE:
        assert len(good[rtype]) == summary["records"][rtype]
    encounters = {r["id"]: r["subject"]["reference"] for r in good["Encounter"]}
    for rtype in ("Condition", "Observation"):
        for r in good[rtype]:
            if "encounter" in r:  # migrated problem-list entries have none
                assert encounters[r["encounter"]["reference"].removeprefix("Encounter/")] == \
                    r["subject"]["reference"]
    ages = [(date(2018, 1, 1) - date.fromisoformat(p["birthDate"])).days / 365.25
            for p in good["Patient"]]
    assert min(ages) < 1 and max(ages) <= 89  # newborns to the very old
    units = {}
    for r in good["Observation"]:
        for part in [r] + r.get("component", []):
            if "valueQuantity" in part:
                code = part["code"]["coding"][0]["code"]
                units.setdefault(code, set()).add(part["valueQuantity"]["code"])
    assert units["4548-4"] == {"%"} and units["2345-7"] == {"mg/dL"}
    assert units["39156-5"] == {"kg/m2"} and units["8480-6"] == {"mm[Hg]"}
    assert units["8462-4"] == {"mm[Hg]"}
    assert {u for k in ("33914-3", "62238-1") for u in units.get(k, ())} == {"mL/min/{1.73_m2}"}
    for r in good["Observation"]:  # a result is known when issued, never before it is taken
        assert r["issued"] >= r["effectiveDateTime"]


def test_planted_signal_is_visible_in_the_export(clean_fhir_export) -> None:
    """At the demo as-of date each head has enough incident cases (first confirmed diagnosis in
    any vocabulary, known in the year after), and future T2D patients already had higher HbA1c."""
    out, summary = clean_fhir_export
    _, good = _classify(out, summary["transaction_time"])
    as_of = date(2024, 6, 30)
    end = as_of + timedelta(days=365)
    first_dx: dict[str, dict[str, date]] = {g: {} for g in ("t2d", "ckd", "heart_failure")}
    for r in good["Condition"]:
        if _verification(r) != "confirmed":
            continue
        day = date.fromisoformat(r["recordedDate"][:10])
        pid = r["subject"]["reference"]
        for g in {group_of(c["system"], c["code"]) for c in r["code"]["coding"]} - {None}:
            if g in first_dx:
                first_dx[g][pid] = min(day, first_dx[g].get(pid, day))
    dead = {"Patient/" + p["id"] for p in good["Patient"]
            if p.get("deceasedDateTime", "9999")[:10] <= as_of.isoformat()}
    n = len(good["Patient"])
    positives = {}
    for g, firsts in first_dx.items():
        positives[g] = {p for p, d in firsts.items() if as_of < d <= end and p not in dead}
        assert 0.02 <= len(positives[g]) / n <= 0.15, (g, len(positives[g]) / n)
    last_a1c: dict[str, tuple[str, float]] = {}
    for r in good["Observation"]:
        if r["code"]["coding"][0]["code"] == "4548-4" and r["issued"][:10] <= as_of.isoformat():
            pid = r["subject"]["reference"]
            if r["effectiveDateTime"] > last_a1c.get(pid, ("", 0.0))[0]:
                last_a1c[pid] = (r["effectiveDateTime"], r["valueQuantity"]["value"])
    prevalent = {p for p, d in first_dx["t2d"].items() if d <= as_of}
    pos = [v for p, (_, v) in last_a1c.items() if p in positives["t2d"]]
    neg = [v for p, (_, v) in last_a1c.items() if p not in positives["t2d"] and p not in prevalent]
    assert len(pos) >= 10
    assert sum(pos) / len(pos) > sum(neg) / len(neg) + 0.3
    # Learnable: the last HbA1c alone already ranks future T2D cases well (rank AUC).
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert wins / (len(pos) * len(neg)) > 0.75


def test_cli_prints_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from medscreen.cli import main

    out = tmp_path / "cli"
    assert main(["synth", "emr", "--patients", "25", "--seed", "2", "--out", str(out),
                 "--format", "omop", "--bad-share", "0"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "synth_summary.json").read_text())
    assert printed["records"]["person"] == 25 and printed["bad_records_total"] == 0


@pytest.mark.parametrize("kwargs, error, words", [
    ({"fmt": "hl7v2"}, ValueError, "unknown format"),
    ({"bad_share": 0.9}, ValueError, "bad_share must be within"),
    ({"patients": 0}, ValueError, "patients must be >= 1"),
])
def test_bad_arguments_are_refused_with_a_clear_message(tmp_path: Path, kwargs, error, words) -> None:
    args = {"patients": 5, "seed": 1, "bad_share": 0.02, "fmt": "fhir", **kwargs}
    with pytest.raises(error, match=words):
        generate(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        generate(tmp_path / "file", patients=5, seed=1)
