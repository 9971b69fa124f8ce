"""Patch grid, stitching and components against known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from preprocessing.components import find_components, sphere_diameter_mm
from preprocessing.patches import PatchExtractor, extract_patches, pad_to_grid, patch_grid
from preprocessing.stitching import Stitcher, importance_map, stitch


@pytest.mark.parametrize("shape", [(20, 37, 41), (64, 128, 128), (70, 130, 200), (5, 3, 2), (97, 64, 65)])
def test_grid_covers_every_voxel(shape):
    patch, stride = (16, 32, 32), (8, 16, 16)
    grid = patch_grid(shape, patch, stride)
    hits = np.zeros(grid.padded_shape, dtype=np.int32)
    for i in range(len(grid)):
        hits[grid.slices(i)] += 1
        assert all(s + p <= n for s, p, n in zip(grid.starts[i], patch, grid.padded_shape))
    z, y, x = shape
    assert (hits[:z, :y, :x] >= 1).all()
    # Padding only where an axis is shorter than the patch.
    assert grid.padded_shape == tuple(max(n, p) for n, p in zip(shape, patch))


def test_grid_rejects_stride_beyond_patch():
    with pytest.raises(ValueError, match="stride"):
        patch_grid((64, 64, 64), (16, 16, 16), (32, 8, 8))


def test_extract_then_stitch_identity_roundtrip():
    rng = np.random.default_rng(0)
    vol = rng.random((30, 50, 45), dtype=np.float32)
    grid, patches = PatchExtractor((16, 32, 32), (8, 16, 16))(vol)
    assert patches.shape == (len(grid), 1, 16, 32, 32)
    # Each patch holds exactly the voxels under its window.
    np.testing.assert_array_equal(patches[-1, 0], vol[tuple(slice(s, s + p) for s, p in zip(grid.starts[-1], (16, 32, 32)))])
    np.testing.assert_allclose(stitch(patches, grid), vol, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("value", [0.0, 0.37, 1.0])
def test_constant_prediction_stitches_to_the_constant(mode, value):
    grid = patch_grid((40, 70, 90), (16, 32, 32), (8, 16, 16))
    preds = np.full((len(grid), 1, 16, 32, 32), value, dtype=np.float32)
    out = stitch(preds, grid, mode=mode)
    assert out.shape == (40, 70, 90)
    np.testing.assert_allclose(out, value, rtol=1e-6, atol=1e-7)


def test_gaussian_weights_peak_in_the_centre_and_stay_positive():
    w = importance_map((16, 32, 32), "gaussian", sigma_scale=0.125)
    assert w.dtype == np.float32 and w.shape == (16, 32, 32)
    assert w.max() == pytest.approx(1.0) and w.min() > 0
    assert w[7:9, 15:17, 15:17].min() == pytest.approx(w.max(), rel=0.02)
    # Symmetric, and decreasing from the centre along each axis.
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)
    line = w[8, 16, 16:]
    assert (np.diff(line) < 0).all()
    # σ = 0.125·32 = 4 voxels, centre at 15.5: voxels 16 and 20 lie 0.5 and 4.5 voxels out.
    assert w[8, 16, 20] / w[8, 16, 16] == pytest.approx(math.exp(-(4.5 ** 2 - 0.5 ** 2) / (2 * 4 ** 2)), rel=1e-4)
    np.testing.assert_array_equal(importance_map((4, 4, 4), "constant"), 1.0)


def test_gaussian_blend_favours_the_patch_centre():
    grid = patch_grid((16, 16, 48), (16, 16, 32), (16, 16, 16))
    assert len(grid) == 2
    # Patch 0 says 1, patch 1 says 0; in the overlap the voxel nearer patch 0's centre leans to 1.
    preds = np.stack([np.ones((16, 16, 32)), np.zeros((16, 16, 32))]).astype(np.float32)
    out = stitch(preds, grid)
    assert out[8, 8, 0] == pytest.approx(1.0)
    assert out[8, 8, 47] == pytest.approx(0.0, abs=1e-6)
    assert out[8, 8, 18] > 0.5 > out[8, 8, 29]
    assert np.all(np.diff(out[8, 8, 16:32]) <= 0)


def test_stitcher_refuses_missing_patches():
    grid = patch_grid((20, 20, 20), (16, 16, 16), (8, 8, 8))
    s = Stitcher(grid)
    s.add(np.zeros((1, 16, 16, 16), np.float32), [0])
    with pytest.raises(ValueError, match="never added"):
        s.result()


def _sphere(shape, centre_zyx, radius_vox):
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    d2 = sum((a - c) ** 2 for a, c in zip((zz, yy, xx), centre_zyx))
    return d2 <= radius_vox ** 2


def test_components_on_analytic_spheres():
    spacing = (1.25, 0.8, 0.8)
    shape = (48, 96, 96)
    # Affine: x_L = -100 + 0.8·x, y_P = 50 + 0.8·y, z_S = 300 - 1.25·z (feet-first stacking).
    affine = np.array([[0, 0, 0.8, -100.0],
                       [0, 0.8, 0, 50.0],
                       [-1.25, 0, 0, 300.0],
                       [0, 0, 0, 1]])
    prob = np.zeros(shape, np.float32)
    big_c, big_r_mm = (20.0, 40.0, 30.0), 8.0
    small_c, small_r_mm = (35.0, 70.0, 70.0), 3.0
    zz, yy, xx = np.indices(shape, dtype=np.float64)
    for c, r, p in ((big_c, big_r_mm, 0.9), (small_c, small_r_mm, 0.7)):
        d2 = ((zz - c[0]) * spacing[0]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[2]) ** 2
        prob[d2 <= r * r] = p
    prob[0, 0, 0] = 0.95   # a one-voxel speck, below the size floor
    s = find_components(prob, spacing, affine, threshold=0.5, min_volume_mm3=15.0)
    assert s.components == 3 and s.dropped_small == 1 and len(s.findings) == 2
    big, small = s.findings
    assert big.finding_id == 1 and small.finding_id == 2
    exp_centre = (-100 + 0.8 * big_c[2], 50 + 0.8 * big_c[1], 300 - 1.25 * big_c[0])
    assert np.linalg.norm(np.subtract(big.centre_lps_mm, exp_centre)) < 0.8
    assert abs(big.diameter_mm - 2 * big_r_mm) < 1.25
    assert abs(big.volume_mm3 - 4 / 3 * math.pi * big_r_mm ** 3) / (4 / 3 * math.pi * big_r_mm ** 3) < 0.1
    assert big.max_prob == pytest.approx(0.9) and big.mean_prob == pytest.approx(0.9)
    exp_small = (-100 + 0.8 * small_c[2], 50 + 0.8 * small_c[1], 300 - 1.25 * small_c[0])
    assert np.linalg.norm(np.subtract(small.centre_lps_mm, exp_small)) < 0.8
    assert abs(small.diameter_mm - 2 * small_r_mm) < 1.25
    assert sphere_diameter_mm(4 / 3 * math.pi * 27) == pytest.approx(6.0)


def test_components_empty_volume():
    s = find_components(np.zeros((8, 8, 8), np.float32), (1, 1, 1), np.eye(4))
    assert s.components == 0 and s.findings == []


def test_short_axes_are_padded_with_edge_voxels_by_default():
    vol = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    grid = patch_grid(vol.shape, (8, 6, 4), (4, 3, 2))
    assert grid.padded_shape == (8, 6, 7)
    padded = pad_to_grid(vol, grid)
    # The padded slab repeats the last real slice rather than inventing air.
    np.testing.assert_array_equal(padded[5:], np.broadcast_to(vol[-1], (3, 6, 7)))
    np.testing.assert_array_equal(pad_to_grid(vol, grid, "constant", 0.0)[5:], 0.0)
    # Already padded volumes pass through; patches cut from either agree.
    assert pad_to_grid(padded, grid) is padded
    np.testing.assert_array_equal(extract_patches(padded, grid), extract_patches(vol, grid))
    with pytest.raises(ValueError, match="pad mode"):
        pad_to_grid(vol, grid, "reflect-ish")


def test_components_match_whole_volume_statistics_away_from_the_origin():
    """The bounding-box shortcut gives what whole-volume scipy statistics give, wherever the blobs are."""
    from scipy import ndimage

    rng = np.random.default_rng(3)
    prob = rng.random((40, 50, 60), dtype=np.float32) * 0.4
    for z, y, x in ((12, 30, 41), (30, 9, 20), (33, 40, 52)):
        prob[z - 2:z + 3, y - 1:y + 3, x - 3:x + 2] = rng.uniform(0.6, 1.0, (5, 4, 5))
    affine = np.array([[0, 0, 0.7, -120.0], [0, 0.7, 0, 80.0], [-2.5, 0, 0, 40.0], [0, 0, 0, 1]])
    s = find_components(prob, (2.5, 0.7, 0.7), affine, threshold=0.5)
    mask = prob >= 0.5
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    idx = np.arange(1, n + 1)
    ref = sorted(
        (-(float((labels == k).sum()) * 2.5 * 0.7 * 0.7),
         tuple((affine @ np.append(c, 1.0))[:3]), mx, mn)
        for k, c, mx, mn in zip(idx, ndimage.center_of_mass(mask, labels, idx),
                                ndimage.maximum(prob, labels, idx), ndimage.mean(prob, labels, idx)))
    assert s.components == n == 3 and len(s.findings) == 3
    for f, (neg_vol, centre, mx, mn) in zip(s.findings, ref):
        assert f.volume_mm3 == pytest.approx(-neg_vol)
        np.testing.assert_allclose(f.centre_lps_mm, centre, atol=1e-6)
        assert f.max_prob == pytest.approx(mx) and f.mean_prob == pytest.approx(mn, rel=1e-5)


def test_ct_qc_flags_non_finite_and_out_of_range_findings():
    import pyarrow as pa

    from conf.settings import CTQCSettings
    from inference.qc import evaluate_ct
    from lake.schemas import FINDINGS

    def table(values):
        cols = {f.name: [None] * len(values) for f in FINDINGS}
        for col in ("centre_x_mm", "centre_y_mm", "centre_z_mm", "diameter_mm", "volume_mm3", "mean_prob"):
            cols[col] = [1.0] * len(values)
        cols["max_prob"] = values
        return pa.Table.from_pydict(cols, schema=FINDINGS)

    cfg = CTQCSettings()
    assert evaluate_ct(table([0.9, 0.7]), 2, 0, cfg)["passed"]
    bad = evaluate_ct(table([float("nan"), 1.5]), 2, 0, cfg)
    assert not bad["passed"] and bad["reasons"] == ["1 findings with a non-finite max_prob",
                                                    "1 findings with max_prob outside [0, 1]"]
    assert evaluate_ct(table([]), 0, 0, cfg)["passed"]  # nothing eligible is not a failure
    assert not evaluate_ct(table([]), 1, 3, cfg)["passed"]  # 3 of 4 series failed
