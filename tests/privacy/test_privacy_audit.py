"""No identifier reaches the lake, and the PHI audit proves it (and catches a leak).

The inputs carry a planted patient the way real ones do: a DICOM archive laid
out by patient name, MRN and accession number, headers with the name, MRN,
accession and institution, and a FHIR export whose Patient has a name, MRN,
address, phone and birth date and whose progress note repeats them. Real
EMR ingest and DICOM index (local Spark) write the lake; the audit must find
nothing there, and must find every kind of identifier once a leak is forced.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from lake.commit import read_manifest
from lake.keys import LakeKeyMismatch, key_fingerprint, lake_key_fingerprint
from lake.paths import LakePaths
from medscreen.phi_audit import audit, format_table

REPO = Path(__file__).resolve().parents[2]
FAMILY, GIVEN = "Doe", "Jane"
MRN = "MRN00420042"
ACCESSION = "ACC7654321"
INSTITUTION = "Saint Elsewhere General Hospital"
STREET, CITY, PHONE, BIRTH = "12 Quarry Lane", "Springfield", "555-867-5309", "1961-02-03"
NOTE = (f"PROGRESS NOTE\nPatient: {FAMILY}, {GIVEN}  MRN: {MRN}\nAddress: {STREET}, {CITY}. "
        f"Phone {PHONE}. DOB {BIRTH}.\nHistory of type 2 diabetes mellitus (E11.9). Denies chest pain.\n")
PATIENT_FOLDER = f"{FAMILY.upper()}_{GIVEN.upper()}_{MRN}"


def _plant_fhir(emr: Path) -> None:
    """The subject of the first progress note becomes the planted patient; that note names them."""
    doc_file = sorted(emr.glob("DocumentReference*.ndjson"))[0]
    docs = doc_file.read_text().splitlines()
    first = json.loads(docs[0])
    pid = first["subject"]["reference"].split("/", 1)[1]
    first["content"][0]["attachment"]["data"] = base64.b64encode(NOTE.encode()).decode()
    doc_file.write_text("\n".join([json.dumps(first), *docs[1:]]) + "\n")
    for pat_file in sorted(emr.glob("Patient*.ndjson")):
        lines = pat_file.read_text().splitlines()
        for i, line in enumerate(lines):
            res = json.loads(line)
            if res.get("id") == pid:
                res.update(identifier=[{"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203",
                                                             "code": "MR"}]},
                                        "system": "http://hospital.example.org/mrn", "value": MRN}],
                           name=[{"use": "official", "family": FAMILY, "given": [GIVEN]}],
                           telecom=[{"system": "phone", "value": PHONE, "use": "home"}],
                           address=[{"line": [STREET], "city": CITY, "state": "MA", "postalCode": "01101"}],
                           birthDate=BIRTH)
                lines[i] = json.dumps(res)
                pat_file.write_text("\n".join(lines) + "\n")
                return
    raise AssertionError("the note's patient is not in the export")


def _plant_dicom(synth: Path, archive: Path) -> None:
    """The synthetic study moved under name/MRN/accession folders, its headers naming the patient."""
    study = archive / PATIENT_FOLDER / ACCESSION
    study.parent.mkdir(parents=True)
    shutil.move(str(synth / "study_000"), str(study))
    for path in sorted(p for p in study.iterdir() if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            continue  # the generator's planted broken files stay broken
        ds.PatientName = f"{FAMILY.upper()}^{GIVEN.upper()}"
        ds.PatientID = MRN
        ds.AccessionNumber = ACCESSION
        ds.InstitutionName = INSTITUTION
        ds.StudyDescription = f"CT CHEST {FAMILY.upper()} {GIVEN.upper()}"
        ds.ImageComments = f"for {GIVEN} {FAMILY} {MRN}"
        ds.save_as(path)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory, spark) -> dict[str, Any]:
    from conf.settings import load_settings
    from jobs import dicom_index, emr_ingest
    from synth.ct import generate as synth_ct
    from synth.emr import generate as synth_emr

    root = tmp_path_factory.mktemp("privacy")
    emr, synth, archive, lake = root / "emr", root / "synth", root / "archive", root / "lake"
    synth_emr(emr, patients=30, seed=5, bad_share=0.0, fmt="fhir")
    _plant_fhir(emr)
    truth = synth_ct(synth, studies=1, seed=5, rows=32, slices=24)
    _plant_dicom(synth, archive)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", "privacy-audit-test-key-not-for-production-01")
        settings = load_settings({"lake.root": str(lake), "spark.master": "local[2]",
                                  "spark.shuffle_partitions": 2, "inputs.dicom_dir": str(archive)})
        ingest = emr_ingest.run(settings, emr, "fhir")
        index = dicom_index.run(settings, archive, spark=spark)
    return {"emr": emr, "archive": archive, "lake": lake, "settings": settings, "ingest": ingest,
            "index": index, "truth": truth}


def test_inputs_hold_every_kind_of_identifier_the_audit_reads(planted) -> None:
    result = audit(planted["lake"], [planted["emr"], planted["archive"]])
    kinds = set(result.identifier_kinds)
    assert {"fhir.id", "fhir.identifier", "fhir.name", "fhir.address", "fhir.phone", "fhir.birthDate",
            "dicom.PatientName", "dicom.PatientID", "dicom.AccessionNumber", "dicom.InstitutionName",
            "dicom.path"} <= kinds, kinds
    # The runs did read the planted data: the note and the study are in the lake, keyed.
    assert planted["index"]["counts"]["series_verdicts"].get("eligible", 0) >= 1
    assert planted["ingest"]["counts"]["emr_ingest"]["records_out"] > 30


def test_normal_output_holds_no_identifier(planted) -> None:
    result = audit(planted["lake"], [planted["emr"], planted["archive"]])
    assert result.clean, format_table(result)
    assert result.files_scanned >= 10 and not [p for p in result.not_scanned if p.endswith(".parquet")]
    # Belt and braces, independent of the audit's tokenising: the raw strings in no lake file.
    for path in (p for p in planted["lake"].rglob("*") if p.is_file()):
        data = path.read_bytes()
        for raw in (PATIENT_FOLDER, MRN, ACCESSION, INSTITUTION, STREET, PHONE):
            assert raw.encode() not in data, (raw, path)


def _force_leaks(lake: Path, archive: Path) -> dict[str, str]:
    """Outputs a careless stage could write: raw paths, a note, header values in a log, report, manifest."""
    raw_paths = sorted(str(p) for p in archive.rglob("*") if p.is_file())
    leaky = lake / "imaging" / "series_leaky"
    leaky.mkdir(parents=True)
    pq.write_table(pa.table({"series_key": ["k1"], "paths": pa.array([raw_paths], pa.list_(pa.string()))}),
                   leaky / "part-0.parquet")
    notes = lake / "emr" / "notes_leaky"
    notes.mkdir(parents=True)
    pq.write_table(pa.table({"patient_key": ["p1"], "text": [NOTE]}), notes / "part-0.parquet")
    run = lake / "runs" / "leaky-run"
    run.mkdir(parents=True)
    (run / "job.log").write_text(f"INFO decode failed for {FAMILY.upper()}^{GIVEN.upper()}\n")
    (run / "report.html").write_text(f"<table><tr><td>{INSTITUTION}</td></tr></table>\n")
    (run / "manifest.json").write_text(json.dumps({"accession": ACCESSION}))
    return {"imaging/series_leaky/part-0.parquet": "dicom.path", "emr/notes_leaky/part-0.parquet": "fhir.phone",
            "runs/leaky-run/job.log": "dicom.PatientName", "runs/leaky-run/report.html": "dicom.InstitutionName",
            "runs/leaky-run/manifest.json": "dicom.AccessionNumber"}


def test_forced_leaks_are_found_and_fail_the_command(planted, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(planted["lake"], lake)
    expected = _force_leaks(lake, planted["archive"])
    result = audit(lake, [planted["emr"], planted["archive"]])
    found: dict[str, set[str]] = {}
    for f in result.findings:
        found.setdefault(f.file.split("/", 1)[1], set()).add(f.kind)
    assert set(found) == set(expected), found
    for file, kind in expected.items():
        assert kind in found[file], (file, found[file])
    assert {"fhir.name", "fhir.identifier", "fhir.address", "fhir.birthDate"} <= found["emr/notes_leaky/part-0.parquet"]
    assert {"dicom.PatientID", "dicom.AccessionNumber"} <= found["imaging/series_leaky/part-0.parquet"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "medscreen", "audit", "phi", "--input", str(planted["emr"]),
            str(planted["archive"]), "--lake"]
    leak = subprocess.run(base + [str(lake)], capture_output=True, text=True, env=env, timeout=300)
    assert leak.returncode == 1, leak.stderr[-2000:]
    assert "series_leaky/part-0.parquet" in leak.stdout and "dicom.InstitutionName" in leak.stdout
    # The report names kinds and places, never the identifiers themselves.
    for raw in (MRN, ACCESSION, INSTITUTION, PHONE, GIVEN, PATIENT_FOLDER):
        assert raw.lower() not in leak.stdout.lower(), raw
    clean = subprocess.run(base + [str(planted["lake"])], capture_output=True, text=True, env=env, timeout=300)
    assert clean.returncode == 0 and "no identifier found" in clean.stdout, clean.stdout + clean.stderr[-2000:]


def test_ct_reader_finds_keyed_files_under_the_archive_root(planted, tmp_path: Path) -> None:
    import nibabel as nib

    from medscreen.ct_export import export_series
    from preprocessing.imaging_index import read_series_table

    manifest = read_manifest(LakePaths(planted["lake"]).dicom_series)
    assert manifest["archive_root"] == str(planted["archive"].resolve())
    series = read_series_table(planted["lake"], eligible_only=True).to_pylist()
    assert series and all(not os.path.isabs(p) for s in series for p in s["paths"])
    axial = max(series, key=lambda s: s["slice_count"])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", "privacy-audit-test-key-not-for-production-01")
        out = export_series(planted["settings"], axial["series_key"], tmp_path / "axial.nii.gz")
    image = nib.load(out["out"])
    assert image.shape[2] == axial["slice_count"] and image.shape[:2] == (axial["cols"], axial["rows"])


def test_a_lake_written_with_another_key_is_refused_by_both_jobs(planted, monkeypatch) -> None:
    from conf.settings import load_settings
    from jobs import dicom_index, emr_ingest

    lake = planted["lake"]
    before = read_manifest(LakePaths(lake).events)["run_id"]
    fp = lake_key_fingerprint(lake)
    assert fp == key_fingerprint(b"privacy-audit-test-key-not-for-production-01")
    assert read_manifest(LakePaths(lake).dicom_series)["key_fingerprint"] == fp
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", "a-different-key-for-the-same-lake-000000000")
    settings = load_settings({"lake.root": str(lake), "spark.master": "local[2]"})
    with pytest.raises(LakeKeyMismatch, match=f"written with the pseudonym key of fingerprint {fp}"):
        emr_ingest.run(settings, planted["emr"], "fhir")
    with pytest.raises(LakeKeyMismatch, match="never join"):
        dicom_index.run(settings, planted["archive"])
    assert read_manifest(LakePaths(lake).events)["run_id"] == before
    assert lake_key_fingerprint(lake) == fp
