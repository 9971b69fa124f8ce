"""The export is the contract: indexed tilted series → `medscreen dicom export --stage raw` → NIfTI
whose affine puts every voxel where the scanner put it (checked against dcm2niix and the planted
nodules), and CT scoring's findings at the planted LPS position within 1 mm through the same geometry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pyarrow as pa
import pydicom
import pytest

from lake.keys import pseudonymise
from medscreen.cli import main as cli_main
from synth.ct_phantom import ChestAnatomy
from preprocessing.dicom_series import load_volume
from preprocessing.nifti import ras_affine
from preprocessing.resample import resample_to_spacing

from ct_geometry_cases import (NODULES, PIXEL_MM, StackCase, dcm2niix_reference, nodule_centre_ras,
                               nodules_misplaced_mm, world_agreement, write_stack)
from ct_index_cases import SESSION_KEY, index_folder

# The two vendor reports: a Philips stack (header +16.5°, table stepping +z, column cosine with a
# positive z component) and a GE stack with tilt and a missing slice, numbered against the normal,
# whose header carries the other sign.
EXPORT_CASES = {"philips": StackCase(16.5, "agree", 1, "with_normal", "variable"),
                "ge_gap": StackCase(-16.5, "opposite", -1, "against_normal", "uniform_gap")}


@pytest.fixture(scope="module")
def tilted_index(spark, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = tmp_path_factory.mktemp("tilted_dicom")
    paths = {name: write_stack(src / name, case, seed=i) for i, (name, case) in enumerate(EXPORT_CASES.items())}
    # A tilted series with two adjacent slices gone: a 7.5 mm hole along the table, beyond tolerance.
    holed = write_stack(src / "holed", StackCase(16.5), seed=9)
    by_z = sorted(holed, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    for p in by_z[9:11]:
        p.unlink()
    paths["holed"] = by_z[:9] + by_z[11:]
    return {**index_folder(spark, src, tmp_path_factory.mktemp("tilted_lake")), "paths": paths}


def test_index_takes_tilted_and_gapped_series_and_quarantines_a_long_gap(tilted_index: dict[str, Any]) -> None:
    from preprocessing.imaging_index import read_series_table

    rows = {r["series_key"]: r for r in read_series_table(tilted_index["lake"]).to_pylist()}
    for name in EXPORT_CASES:
        row = rows[_series_key(tilted_index["paths"][name])]
        assert row["verdict"] == "eligible", (name, row["detail"])
        assert row["tilt_deg"] == pytest.approx(16.5, abs=0.01)
    holed = rows[_series_key(tilted_index["paths"]["holed"])]
    assert holed["verdict"] == "missing_slices" and not holed["eligible"]
    assert f"{7.5 * np.cos(np.radians(16.5)):.3g} mm" in holed["detail"], holed["detail"]
    counts = tilted_index["summary"]["counts"]
    assert counts["series"] == 3 and counts["series_verdicts"] == {"eligible": 2, "missing_slices": 1}


def _series_key(paths: list[Path]) -> str:
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return pseudonymise(SESSION_KEY.encode(), uid)


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_raw_export_of_tilted_series_sits_where_the_scanner_put_it(name: str, tilted_index: dict[str, Any],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", SESSION_KEY)
    paths = tilted_index["paths"][name]
    out = tmp_path / f"{name}.nii.gz"
    assert cli_main(["dicom", "export", "--lake", str(tilted_index["lake"]), "--series-key", _series_key(paths),
                     "--stage", "raw", "--out", str(out)]) == 0
    ours = nib.load(str(out))
    assert ours.get_data_dtype() == np.int16
    # The planted nodules, read through the file's own affine, are where they were planted.
    assert nodules_misplaced_mm(ours, NODULES) <= PIXEL_MM / 2
    ref = dcm2niix_reference(paths, tmp_path / "dcm2niix", NODULES, PIXEL_MM / 2)
    r = world_agreement(ours, ref["image"], EXPORT_CASES[name].frames())
    assert r["corr"] >= 0.99, (r["corr"], ref["kind"])
    assert np.all(np.abs(r["shift_vox"]) < 0.5), r["shift_vox"]


# The scoring test images a 128 mm window of a full-size chest at 1 mm (one model patch after
# resampling), like the CT scoring tests, so the committed U-Net sees anatomy at its real scale.
CHEST = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0), fov_mm=(340.0, 340.0, 64.0))
LUNG_X, LUNG_Y = CHEST.lung_centres_mm()[0]
SCORED_NODULE = {"centre_lps_mm": [LUNG_X + 9.0, LUNG_Y - 14.0, 5.0], "diameter_mm": 10.0, "kind": "solid"}
SCORE_CASES = {"philips": StackCase(16.5, "agree", 1, "with_normal"),
               "ge_gap": StackCase(-16.5, "opposite", -1, "against_normal")}


@pytest.mark.parametrize("name", sorted(SCORE_CASES))
def test_ct_scoring_finds_a_nodule_planted_in_a_tilted_series_within_1mm(name: str, tmp_path: Path) -> None:
    from conf.settings import load_settings
    from engines.source import ReferenceEngine
    from inference.ct_stages import FindNodules, PrepareSeries, SegmentSeries

    zs = [-31.0 + 2.0 * k for k in range(32)]
    if name == "ge_gap":
        del zs[14]  # a 4 mm hole next to the nodule, within the gap tolerance
    paths = write_stack(tmp_path / "dicom", SCORE_CASES[name], nodules=[SCORED_NODULE], rows=128, pixel_mm=1.0,
                        anatomy=CHEST, centre_xy_mm=(LUNG_X, LUNG_Y), z_positions_mm=zs)
    im = load_settings({"lake.root": str(tmp_path / "lake")}).imaging
    # The scoring stages themselves (read + resample + window, the U-Net on ONNX Runtime, components),
    # called one after another as the Ray pipeline calls them.
    rows = pa.table({"series_key": ["s"], "study_key": ["t"], "patient_key": ["p"],
                     "paths": [[str(p) for p in paths]]})
    prepared = PrepareSeries(im.target_spacing_mm, im.window_hu, im.gantry_tilt, 4)(rows)
    assert prepared.column("status")[0].as_py() == "ok", prepared.column("reason")[0].as_py()
    segment = SegmentSeries(ReferenceEngine(load_settings({"lake.root": str(tmp_path / "lake")})), "fp32",
                            tuple(im.patch_size), tuple(im.patch_stride), 1)
    found = FindNodules(im.probability_threshold, im.min_finding_volume_mm3)(segment(prepared))
    findings = json.loads(found.column("findings")[0].as_py())
    truth = np.asarray(SCORED_NODULE["centre_lps_mm"])
    best = min(findings, key=lambda f: float(np.linalg.norm(np.subtract(f["centre_lps_mm"], truth))))
    error_mm = float(np.linalg.norm(np.subtract(best["centre_lps_mm"], truth)))
    assert error_mm <= 1.0, f"nearest finding {error_mm:.2f} mm from the planted nodule"
    assert abs(best["diameter_mm"] - SCORED_NODULE["diameter_mm"]) <= 2.0

    # One geometry: the scorer's grid is the raw export's grid resampled, and the raw export's
    # affine (the NIfTI a reader opens) puts the same nodule at the finding's position.
    raw = load_volume(paths)
    np.testing.assert_allclose(np.asarray(prepared.column("affine")[0].as_py()).reshape(4, 4),
                               resample_to_spacing(raw, im.target_spacing_mm).affine_zyx_to_lps, atol=1e-9)
    hu = np.transpose(raw.hu, (2, 1, 0)).astype(np.int16)
    blob_ras = nodule_centre_ras(nib.Nifti1Image(hu, ras_affine(raw)), SCORED_NODULE["centre_lps_mm"],
                                 SCORED_NODULE["diameter_mm"])
    finding_ras = np.asarray(best["centre_lps_mm"]) * [-1.0, -1.0, 1.0]
    assert float(np.linalg.norm(blob_ras - finding_ras)) <= 1.0
