"""NIfTI export: affine and voxels checked against dcm2niix on the same series."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from lake.keys import pseudonymise
from medscreen.cli import main as cli_main
from preprocessing.dicom_series import load_volume
from preprocessing.nifti import ras_affine, write_nifti
from preprocessing.resample import resample_to_spacing

from ct_geometry_cases import dcm2niix_exe
from ct_index_cases import SESSION_KEY, write_case


def _reference(files: list[Path], work: Path) -> nib.Nifti1Image:
    src = work / "dicom"
    src.mkdir(parents=True)
    for f in files:
        shutil.copy(f, src / f.name)
    subprocess.run([dcm2niix_exe(), "-z", "n", "-f", "ref", "-o", str(work), str(src)],
                   check=True, capture_output=True, timeout=120)
    return nib.load(str(next(work.glob("ref*.nii"))))


def _same_image(ours: nib.Nifti1Image, ref: nib.Nifti1Image) -> None:
    # dcm2niix may store rows flipped; compare both in the closest canonical (RAS) orientation.
    a, b = nib.as_closest_canonical(ours), nib.as_closest_canonical(ref)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), atol=0.5)


@pytest.mark.parametrize("spec", [{}, {"rle": True}, {"signed": True}])
def test_raw_export_matches_dcm2niix(tmp_path: Path, spec: dict[str, Any]) -> None:
    rec = write_case(tmp_path / "s", seed=31, rows=40, **spec)
    out = write_nifti(load_volume(rec["paths"]), tmp_path / "ours.nii.gz", dtype=np.int16)
    _same_image(nib.load(str(out)), _reference(rec["paths"], tmp_path / "ref"))


def test_cli_export_of_indexed_series_matches_dcm2niix(indexed: dict[str, Any], synth_dir: Path,
                                                       truth: dict[str, Any], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", SESSION_KEY)
    s = next(r for r in truth["series"] if r["label"] == "axial_chest")
    key = pseudonymise(SESSION_KEY.encode(), s["series_instance_uid"])
    lake = str(indexed["lake"])
    assert cli_main(["dicom", "export", "--lake", lake, "--series-key", key,
                     "--out", str(tmp_path / "raw.nii.gz")]) == 0
    files = [synth_dir / s["study"] / f for f in s["files"]]
    _same_image(nib.load(str(tmp_path / "raw.nii.gz")), _reference(files, tmp_path / "ref"))

    assert cli_main(["dicom", "export", "--lake", lake, "--series-key", key, "--stage", "resampled",
                     "--out", str(tmp_path / "iso.nii.gz")]) == 0
    iso = nib.load(str(tmp_path / "iso.nii.gz"))
    assert np.allclose(iso.header.get_zooms(), (1.0, 1.0, 1.0))
    raw = nib.load(str(tmp_path / "raw.nii.gz"))
    # Same first voxel centre, same axes: only the spacing changed.
    np.testing.assert_allclose(iso.affine[:3, 3], raw.affine[:3, 3], atol=1e-4)
    np.testing.assert_allclose(iso.affine[:3, :3] @ np.diag(1 / np.asarray(iso.header.get_zooms())),
                               raw.affine[:3, :3] @ np.diag(1 / np.asarray(raw.header.get_zooms())), atol=1e-6)

    with pytest.raises(SystemExit):
        cli_main(["dicom", "export", "--lake", lake, "--series-key", key, "--stage", "bogus",
                  "--out", str(tmp_path / "x.nii.gz")])
    assert cli_main(["dicom", "export", "--lake", lake, "--series-key", "0" * 32,
                     "--out", str(tmp_path / "x.nii.gz")]) == 2


def test_tilted_volume_affine_maps_voxels_to_their_patient_position(tmp_path: Path) -> None:
    volume = resample_to_spacing(load_volume(write_case(tmp_path / "t", seed=32, rows=32, tilt_deg=15.0)["paths"]), 2.0)
    img = nib.load(str(write_nifti(volume, tmp_path / "t.nii.gz")))
    k, j, i = 3, 7, 11
    ras = img.affine @ np.array([i, j, k, 1.0])
    lps = volume.index_to_lps([k, j, i])
    np.testing.assert_allclose(ras[:3], [-lps[0], -lps[1], lps[2]], atol=1e-6)
    np.testing.assert_allclose(img.affine, ras_affine(volume))
    np.testing.assert_allclose(np.asarray(img.dataobj)[i, j, k], volume.hu[k, j, i])
