"""Series → volume geometry against analytic phantoms (real DICOM files written with pydicom)."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from preprocessing.dicom_series import SeriesError, load_volume
from preprocessing.resample import resample_to_spacing, resampled_shape, window_to_unit
from preprocessing.volume import Volume

from ct_index_cases import NODULE, segment_centre_lps, write_case, z_variable


@pytest.mark.parametrize("case", ["axial", "variable_spacing", "gantry_tilt", "rle"])
def test_nodule_centre_recovered_after_load_and_resample(tmp_path: Path, case: str) -> None:
    spec = {"axial": {}, "variable_spacing": {"z_positions_mm": z_variable()},
            "gantry_tilt": {"tilt_deg": 20.0}, "rle": {"rle": True, "rows": 64}}[case]
    rec = write_case(tmp_path / case, seed=1, **spec)
    volume = load_volume(rec["paths"])
    iso = resample_to_spacing(volume, 1.0)
    assert iso.spacing_mm == (1.0, 1.0, 1.0)
    found = segment_centre_lps(iso, NODULE["centre_lps_mm"], NODULE["diameter_mm"])
    error_mm = float(np.linalg.norm(found - np.asarray(NODULE["centre_lps_mm"])))
    # Within one voxel of the resampled grid (√3 mm diagonal of a 1 mm voxel).
    assert error_mm <= np.sqrt(3.0), f"{case}: centre off by {error_mm:.2f} mm"


def test_tilted_stack_lands_on_an_orthogonal_grid(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "tilt", seed=2, tilt_deg=20.0)
    volume = load_volume(rec["paths"])
    d = volume.direction
    assert np.allclose(d.T @ d, np.eye(3), atol=1e-6)
    # The slice axis is the plane normal (tilted 20° from z), and spacing is measured along it.
    assert np.degrees(np.arccos(d[2, 2])) == pytest.approx(20.0, abs=0.01)
    assert volume.spacing_mm[0] == pytest.approx(2.5 * np.cos(np.radians(20.0)), rel=1e-4)
    assert any(n.startswith("gantry_tilt_corrected") for n in volume.notes)
    with pytest.raises(SeriesError) as err:
        load_volume(rec["paths"], gantry_tilt="reject")
    assert err.value.reason == "gantry_tilt"


def test_variable_spacing_resampled_onto_regular_grid(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "var", seed=3, z_positions_mm=z_variable())
    volume = load_volume(rec["paths"])
    assert volume.spacing_mm[0] == pytest.approx(1.25)
    assert volume.shape[0] == 49  # 60 mm of z at 1.25 mm, both ends included
    assert volume.origin_lps_mm[2] == pytest.approx(-30.0, abs=1e-3)


def test_volume_independent_of_file_names_order_and_instance_numbers(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "a", seed=4)
    reference = load_volume(rec["paths"])
    other = tmp_path / "b"
    other.mkdir()
    rng = np.random.default_rng(0)
    renamed = []
    for n, p in enumerate(rng.permutation(len(rec["paths"]))):
        ds = pydicom.dcmread(rec["paths"][p])
        ds.InstanceNumber = int(rng.integers(1, 1000))  # meaningless order on purpose
        target = other / f"IMG{n:04d}.dcm"
        ds.save_as(target)
        renamed.append(target)
    again = load_volume(list(reversed(renamed)))
    np.testing.assert_array_equal(again.hu, reference.hu)
    assert again.origin_lps_mm == reference.origin_lps_mm
    assert again.spacing_mm == reference.spacing_mm


def test_hu_from_rescale_and_rle_lossless_roundtrip(tmp_path: Path) -> None:
    plain = load_volume(write_case(tmp_path / "u16", seed=5, rows=48)["paths"])
    signed = load_volume(write_case(tmp_path / "i16", seed=5, rows=48, signed=True)["paths"])
    rle = load_volume(write_case(tmp_path / "rle", seed=5, rows=48, rle=True)["paths"])
    np.testing.assert_array_equal(plain.hu, signed.hu)
    np.testing.assert_array_equal(plain.hu, rle.hu)
    ds = pydicom.dcmread(sorted((tmp_path / "rle").iterdir())[0], stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    # Air outside the body and lung inside it, in HU rather than stored values.
    assert plain.hu[:, 0, 0].mean() == pytest.approx(-1000, abs=15)
    assert -900 < float(np.median(plain.hu[:, 48 // 2, 48 // 2 - 9])) < -780


def test_missing_slice_and_inconsistent_series_raise_reasons(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "gap", seed=6, rows=32)
    by_z = sorted(rec["paths"], key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    # Two adjacent slices of a 2.5 mm run missing: a 7.5 mm hole, beyond the 5 mm tolerance.
    with pytest.raises(SeriesError) as err:
        load_volume(by_z[:10] + by_z[12:])
    assert err.value.reason == "missing_slices" and "7.5 mm" in str(err.value)
    ds = pydicom.dcmread(by_z[3])
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.save_as(by_z[3])
    with pytest.raises(SeriesError) as err:
        load_volume(by_z)
    assert err.value.reason == "inconsistent_orientation"


def test_resampling_is_exact_on_a_linear_ramp() -> None:
    z, y, x = np.meshgrid(np.arange(12), np.arange(10), np.arange(9), indexing="ij")
    spacing = (2.5, 0.8, 0.7)
    ramp = (3.0 * z * spacing[0] - 2.0 * y * spacing[1] + 1.5 * x * spacing[2]).astype(np.float32)
    vol = Volume(hu=ramp, spacing_mm=spacing, origin_lps_mm=(10.0, -5.0, 30.0))
    iso = resample_to_spacing(vol, 1.0)
    assert iso.shape == resampled_shape(vol.shape, spacing, (1.0, 1.0, 1.0)) == (28, 8, 6)
    kz, ky, kx = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in iso.shape), indexing="ij")
    expected = 3.0 * kz - 2.0 * ky + 1.5 * kx
    np.testing.assert_allclose(iso.hu, expected, atol=1e-3)
    # Same patient point before and after: the origin is kept.
    np.testing.assert_allclose(iso.index_to_lps([5, 3, 2]), vol.index_to_lps([2.0, 3.75, 2 / 0.7]), atol=1e-9)


def test_window_maps_hu_to_unit_interval() -> None:
    hu = np.array([-2000, -1000, -300, 400, 3000], dtype=np.int16)
    np.testing.assert_allclose(window_to_unit(hu, (-1000, 400)), [0, 0, 0.5, 1, 1], atol=1e-6)
    with pytest.raises(ValueError, match="window_hu"):
        window_to_unit(hu, (400, -1000))


def test_load_volume_names_unreadable_file(tmp_path: Path) -> None:
    rec = write_case(tmp_path / "bad", seed=7, rows=32)
    broken = tmp_path / "bad" / "not-a-slice"
    broken.write_text("hello")
    with pytest.raises(SeriesError, match="not-a-slice"):
        load_volume(rec["paths"] + [broken])
    shutil.rmtree(tmp_path / "bad")


def test_separable_resampling_equals_trilinear_affine_transform() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(5)
    hu = rng.normal(0, 300, size=(9, 17, 13)).astype(np.float32)
    vol = Volume(hu=hu, spacing_mm=(2.5, 0.7, 0.9), origin_lps_mm=(0.0, 0.0, 0.0))
    iso = resample_to_spacing(vol, 1.0)
    ratio = np.array([1 / 2.5, 1 / 0.7, 1 / 0.9])
    ref = ndimage.affine_transform(hu, ratio, output_shape=iso.shape, order=1, mode="nearest", output=np.float32)
    np.testing.assert_allclose(iso.hu, ref, atol=1e-3)
