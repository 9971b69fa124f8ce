"""Every gantry-tilt sign, stacking direction and spacing pattern, against dcm2niix in world space.

Each case is one physical acquisition written as real DICOM files (see
``ct_geometry_cases``). Our volume, written as NIfTI, is compared with
dcm2niix's most corrected output (``_Tilt_`` and/or ``_Eq_``) point by point
in world space: each image is read through its own affine at the same world
points. Voxels must correlate ≥ 0.99 and the residual shift between the two
must stay under half a voxel on every axis; the planted nodules must sit where
they were planted.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from preprocessing.ct_geometry import MAX_GAP_MM
from preprocessing.dicom_header import judge_series, read_instance_header
from preprocessing.dicom_series import SeriesError, load_volume
from preprocessing.nifti import to_nifti

from ct_geometry_cases import (NODULES, PIXEL_MM, SPACINGS, StackCase, dcm2niix_reference,
                               nodules_misplaced_mm, world_agreement, write_stack)

# Half the coarsest voxel edge of these series (3 mm pixels; slices 2.5 mm or less along the normal).
HALF_VOXEL_MM = PIXEL_MM / 2

CASES = [StackCase(tilt, "agree", column, instances, spacing)
         for tilt, column, instances, spacing in itertools.product(
             (16.5, -16.5, 0.0), (1, -1), ("with_normal", "against_normal"), SPACINGS)]


def _compare(case: StackCase, tmp_path: Path) -> dict:
    paths = write_stack(tmp_path / "dicom", case)
    volume = load_volume(paths)
    ours = to_nifti(volume)
    ref = dcm2niix_reference(paths, tmp_path / "dcm2niix", NODULES, HALF_VOXEL_MM)
    agreement = world_agreement(ours, ref["image"], case.frames())
    return {"volume": volume, "ours": ours, "ref": ref, **agreement}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_volume_matches_dcm2niix_in_world_space(case: StackCase, tmp_path: Path) -> None:
    r = _compare(case, tmp_path)
    expected_kind = {(True, True): "Tilt_Eq", (True, False): "Tilt", (False, True): "Eq", (False, False): ""}[
        (case.tilt_deg != 0, case.spacing != "uniform")]
    assert r["ref"]["kind"] == expected_kind, f"dcm2niix wrote {r['ref']['kind']!r}: {r['ref']['tried']}"
    assert r["n"] > 10000, "too few points in the common field to compare"
    assert r["corr"] >= 0.99, f"{case.name}: correlation {r['corr']:.4f} against dcm2niix {r['ref']['kind']}"
    assert np.all(np.abs(r["shift_vox"]) < 0.5), f"{case.name}: shift {r['shift_vox']} voxels against dcm2niix"
    # And both sit at the truth: the planted nodules where they were planted.
    assert nodules_misplaced_mm(r["ours"], NODULES) <= HALF_VOXEL_MM
    # The grid is orthogonal, its slice axis the plane normal, whatever the tilt.
    d = r["volume"].direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-6)
    assert abs(float(d[2, 2])) == pytest.approx(np.cos(np.radians(case.tilt_deg)), abs=1e-4)
    assert any(n.startswith("gantry_tilt_corrected") for n in r["volume"].notes) == (case.tilt_deg != 0)


@pytest.mark.parametrize(("tilt", "header"), [(16.5, "opposite"), (16.5, "zero"), (-16.5, "opposite"),
                                              (-16.5, "zero"), (0.0, "spurious")])
def test_gantry_tilt_header_never_moves_a_voxel(tilt: float, header: str, tmp_path: Path) -> None:
    """GantryDetectorTilt with the other sign, 0, or a tilt the positions do not show: same volume."""
    base = load_volume(write_stack(tmp_path / "agree", StackCase(tilt, "agree")))
    other = load_volume(write_stack(tmp_path / header, StackCase(tilt, header)))
    np.testing.assert_array_equal(other.hu, base.hu)
    np.testing.assert_allclose(other.affine_zyx_to_lps, base.affine_zyx_to_lps, atol=1e-9)


@pytest.mark.parametrize("tilt", (16.5, -16.5))
def test_tilted_series_with_header_disagreeing_matches_dcm2niix(tilt: float, tmp_path: Path) -> None:
    case = StackCase(tilt, "opposite", -1, "against_normal", "variable_gap")
    r = _compare(case, tmp_path)
    assert r["corr"] >= 0.99 and np.all(np.abs(r["shift_vox"]) < 0.5), (r["corr"], r["shift_vox"])


@pytest.mark.parametrize("tilt", (16.5, 0.0))
def test_gap_beyond_tolerance_is_quarantined(tilt: float, tmp_path: Path) -> None:
    case = StackCase(tilt, "agree", 1, "with_normal", "uniform")
    paths = write_stack(tmp_path / "dicom", case)
    # Drop two adjacent slices from the 2.5 mm run: a 7.5 mm hole along the table.
    by_z = sorted(paths, key=lambda p: read_instance_header(p)["position_lps_mm"][2])
    kept = by_z[:9] + by_z[11:]
    hole_mm = 7.5 * np.cos(np.radians(tilt))  # measured along the normal
    assert hole_mm > MAX_GAP_MM
    with pytest.raises(SeriesError) as err:
        load_volume(kept)
    assert err.value.reason == "missing_slices"
    verdict = judge_series([read_instance_header(p) for p in kept], min_slices=4, gantry_tilt="correct")
    assert verdict["verdict"] == "missing_slices"
    assert f"{hole_mm:.3g} mm" in verdict["detail"], verdict["detail"]


@pytest.mark.parametrize("case", [StackCase(16.5, column=1), StackCase(-16.5, column=-1, instances="against_normal")],
                         ids=lambda c: c.name)
def test_tilted_grid_keeps_every_acquired_pixel_where_it_was_acquired(case: StackCase, tmp_path: Path) -> None:
    """Every pixel of every file lies inside the corrected grid, and the grid holds its value there."""
    import pydicom
    from scipy import ndimage

    paths = write_stack(tmp_path / "dicom", case)
    volume = load_volume(paths)
    assert volume.shape[1] > 40, "the grid must widen by the drift of the slice origins"
    got, want = [], []
    for p in paths:
        ds = pydicom.dcmread(p)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        j, i = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
        lps = ipp + (i[..., None] * iop[:3] + j[..., None] * iop[3:]) * PIXEL_MM
        idx = volume.lps_to_index(lps.reshape(-1, 3))
        # (positions are written to 0.1 µm: a voxel index can exceed an integer by 1e-5)
        assert np.all(idx > -1e-3) and np.all(idx < np.asarray(volume.shape) - 1 + 1e-3), p.name
        got.append(ndimage.map_coordinates(volume.hu, idx.T, order=1, mode="nearest"))
        want.append(ds.pixel_array.astype(np.float64).reshape(-1) + float(ds.RescaleIntercept))
    got, want = np.concatenate(got), np.concatenate(want)
    # Read back through two linear interpolations (the shear, then this sampling) of 3 mm pixels across
    # sharp tissue edges: close, not equal (most pixels exact); a misplaced slice decorrelates far more
    # (0.27-0.95 for dcm2niix's misplaced outputs).
    corr, median_hu = float(np.corrcoef(got, want)[0, 1]), float(np.median(np.abs(got - want)))
    assert corr >= 0.99 and median_hu <= 1.0, (corr, median_hu)


@pytest.mark.parametrize("axis", (0, 1, 2))
def test_world_comparison_sees_a_shift_of_more_than_half_a_voxel(axis: int, tmp_path: Path) -> None:
    """The comparison itself can fail: the same image moved by 0.6 voxel is reported as moved."""
    import nibabel as nib

    case = StackCase(16.5, "agree", 1, "with_normal", "uniform")
    ours = to_nifti(load_volume(write_stack(tmp_path / "dicom", case)))
    moved = ours.affine.copy()
    moved[:3, 3] += 0.6 * ours.affine[:3, axis]
    r = world_agreement(ours, nib.Nifti1Image(np.asarray(ours.dataobj), moved), case.frames())
    assert abs(r["shift_vox"][axis]) == pytest.approx(0.6, abs=0.1), r["shift_vox"]
    same = world_agreement(ours, ours, case.frames())
    assert same["corr"] == pytest.approx(1.0) and np.all(np.abs(same["shift_vox"]) < 1e-6)
