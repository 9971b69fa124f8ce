"""`medscreen synth ct` through the CLI: the variations the CT work needs are under the user's control."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom

from medscreen import cli


def _series_z_steps_mm(study: Path) -> dict[str, list[float]]:
    """SeriesDescription → distinct steps between slice positions, read back from the DICOM files."""
    z: dict[str, list[float]] = defaultdict(list)
    for f in study.iterdir():
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        z[str(ds.SeriesDescription)].append(float(ds.ImagePositionPatient[2]))
    return {k: sorted({round(float(d), 4) for d in np.diff(sorted(v))}) for k, v in z.items()}


def test_synth_ct_flags_reach_the_files(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ct"
    rc = cli.main(["synth", "ct", "--studies", "1", "--seed", "3", "--out", str(out), "--rows", "24",
                   "--slices", "64", "--slice-spacing", "0.625", "--variable-spacing", "--gantry-tilt",
                   "--no-broken-files"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    truth = json.loads((out / "ground_truth.json").read_text())
    assert summary["broken_files"] == 0 and truth["broken_files"] == []
    assert {r["label"] for r in truth["series"]} == {"axial_chest", "localizer", "thick_rle",
                                                     "variable_spacing", "gantry_tilt"}
    assert {r["rows"] for r in truth["series"]} == {24}
    # Every file left is a DICOM instance of one of those series (nothing broken planted).
    steps = _series_z_steps_mm(out / "study_000")
    assert steps["AXIAL CHEST"] == [0.625]
    assert steps["THICK RLE"] == [5.0]
    assert steps["VARIABLE SPACING"] == [0.3125, 1.25]
    axial = next(r for r in truth["series"] if r["label"] == "axial_chest")
    assert axial["slices"] == 64 and 0.6 * 512 / 24 <= axial["pixel_spacing_mm"] <= 0.9 * 512 / 24


def test_synth_ct_defaults_plant_broken_files_and_refuse_a_bad_spacing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "ct"
    assert cli.main(["synth", "ct", "--studies", "1", "--seed", "3", "--out", str(out), "--rows", "24",
                     "--slices", "6"]) == 0
    truth = json.loads((out / "ground_truth.json").read_text())
    assert sorted(b["expected"] for b in truth["broken_files"]) == [
        "incomplete_header", "not_dicom", "not_dicom", "truncated"]
    axial = next(r for r in truth["series"] if r["label"] == "axial_chest")
    assert len(axial["files"]) == 6
    capsys.readouterr()
    assert cli.main(["synth", "ct", "--studies", "1", "--out", str(tmp_path / "bad"),
                     "--slice-spacing", "0"]) == 2
    assert "slice spacing" in capsys.readouterr().err


def test_synth_ct_images_patients_of_the_synthetic_emr(tmp_path: Path, capsys) -> None:
    """With --emr, DICOM PatientID is the MRN a FHIR Patient carries as its MR identifier, of a
    patient registered, alive and under observation on the study date; birth date and sex agree."""
    from synth.emr import generate as synth_emr

    emr = tmp_path / "emr"
    synth_emr(emr, patients=300, seed=5, bad_share=0.0, fmt="fhir")
    patients = {}
    for line in (emr / "Patient.ndjson").read_text().splitlines():
        p = json.loads(line)
        for ident in p["identifier"]:
            if any(c["code"] == "MR" for c in ident.get("type", {}).get("coding", [])):
                patients[ident["value"]] = p
    first_visit: dict[str, str] = {}
    for line in (emr / "Encounter.ndjson").read_text().splitlines():
        e = json.loads(line)
        pid = e["subject"]["reference"].removeprefix("Patient/")
        first_visit[pid] = min(first_visit.get(pid, "9999"), e["period"]["start"][:10])
    out = tmp_path / "ct"
    assert cli.main(["synth", "ct", "--studies", "2", "--seed", "3", "--out", str(out), "--rows", "24",
                     "--slices", "6", "--no-broken-files", "--emr", str(emr)]) == 0
    assert json.loads(capsys.readouterr().out)["linked_to_emr"] == 2
    seen = set()
    for study in sorted(out.glob("study_*")):
        for f in study.iterdir():
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            p = patients[str(ds.PatientID)]
            day = f"{ds.StudyDate[:4]}-{ds.StudyDate[4:6]}-{ds.StudyDate[6:]}"
            assert first_visit[p["id"]] <= day
            assert p.get("deceasedDateTime", "9999") > day
            assert str(ds.PatientBirthDate) == p["birthDate"].replace("-", "")
            assert str(ds.PatientSex) == {"female": "F", "male": "M"}.get(p["gender"], "O")
            seen.add(str(ds.PatientID))
    assert len(seen) == 2
    truth = json.loads((out / "ground_truth.json").read_text())
    assert {s["patient_id"] for s in truth["studies"]} == seen
    # Without an EMR, the CT stands alone: synthetic PatientIDs that match no MRN.
    alone = tmp_path / "alone"
    assert cli.main(["synth", "ct", "--studies", "1", "--seed", "3", "--out", str(alone), "--rows", "24",
                     "--slices", "6", "--no-broken-files"]) == 0
    ids = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientID) for f in (alone / "study_000").iterdir()}
    assert len(ids) == 1 and not ids & set(patients)
