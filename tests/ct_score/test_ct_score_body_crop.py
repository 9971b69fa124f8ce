"""Cropping to the body before the sliding window: nothing inside the body is lost, geometry stays exact."""
from __future__ import annotations

import numpy as np

from preprocessing.body_crop import CropToBody, body_box
from preprocessing.components import find_components
from preprocessing.ct_chain import model_input
from preprocessing.volume import Volume
from synth.ct_phantom import make_phantom

# Rows run to patient anterior, columns to patient right, slices inferior: nothing is the identity.
DIRECTION = np.array([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, -1.0]]) @ np.array(
    [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])


def _chest(rng: np.random.Generator) -> tuple[Volume, np.ndarray]:
    """A 1 mm chest phantom with two nodules, 300 mm field of view (the body fills ~84 % × 60 % of it)."""
    shape, spacing = (48, 300, 300), (1.0, 1.0, 1.0)
    nodules = [{"centre_lps_mm": [-60.0, 10.0, 0.0], "diameter_mm": 10.0},
               {"centre_lps_mm": [55.0, -20.0, 8.0], "diameter_mm": 8.0}]
    hu, mask = make_phantom(shape, spacing, nodules, rng)
    origin = (-149.5, -149.5, -23.5)
    return Volume(hu.astype(np.float32), spacing, origin), mask


def test_the_box_holds_every_body_voxel_and_the_nodules_and_drops_air():
    vol, mask = _chest(np.random.default_rng(5))
    box = body_box(vol.hu, vol.spacing_mm, -500.0, 16.0)
    inside = np.zeros(vol.shape, dtype=bool)
    inside[box] = True
    # Every voxel above the threshold (the whole body) and every nodule voxel lies in the box …
    assert not ((vol.hu > -500) & ~inside).any()
    assert mask.any() and not (mask.astype(bool) & ~inside).any()
    # … with the margin kept on each side the body does not touch the volume's edge …
    body_rows = np.flatnonzero((vol.hu > -500).any(axis=(0, 2)))
    assert box[1].start == body_rows[0] - 16 and box[1].stop == body_rows[-1] + 1 + 16
    # … and the air in front of and behind the body is gone (the body is 60 % of the rows).
    assert box[1].stop - box[1].start < 0.75 * vol.shape[1]
    assert box[0] == slice(0, vol.shape[0])  # the body runs through every slice


def test_anything_bright_outside_the_body_only_makes_the_box_larger():
    vol, _ = _chest(np.random.default_rng(6))
    hu = vol.hu.copy()
    hu[:, 290:294, 20:280] = 200.0  # a table under the patient
    plain = body_box(vol.hu, vol.spacing_mm, -500.0, 16.0)
    with_table = body_box(hu, vol.spacing_mm, -500.0, 16.0)
    assert with_table[1].start <= plain[1].start and with_table[1].stop >= min(300, 294 + 16)


def test_a_crop_is_grown_to_one_patch_and_an_empty_volume_is_kept_whole():
    hu = np.full((40, 100, 120), -1000.0, np.float32)
    assert body_box(hu, (1.0, 1.0, 1.0), -500.0, 16.0) == (slice(0, 40), slice(0, 100), slice(0, 120))
    hu[10:14, 5:9, 100:104] = 40.0  # a small bright object near two edges
    z, y, x = body_box(hu, (1.0, 1.0, 1.0), -500.0, 0.0, (32, 64, 64))
    assert (z.stop - z.start, y.stop - y.start, x.stop - x.start) == (32, 64, 64)
    assert z.start <= 10 and z.stop >= 14 and y.start == 0 and x.stop == 120


def test_cropped_voxels_keep_their_patient_positions_and_findings_do_not_move():
    rng = np.random.default_rng(7)
    vol, mask = _chest(rng)
    vol = Volume(vol.hu, (1.0, 0.9, 0.8), (12.5, -40.0, 103.0), DIRECTION)
    cropped = CropToBody(-500.0, 16.0)(vol)
    assert cropped.shape[1] < vol.shape[1]
    first = np.array([s.start for s in body_box(vol.hu, vol.spacing_mm, -500.0, 16.0)])
    idx = np.array([[0, 0, 0], [5, 17, 33], [cropped.shape[0] - 1, cropped.shape[1] - 1, cropped.shape[2] - 1]])
    np.testing.assert_allclose(cropped.index_to_lps(idx), vol.index_to_lps(idx + first), atol=1e-9)
    k, j, i = idx[1] + first
    assert cropped.hu[tuple(idx[1])] == vol.hu[k, j, i]
    # A probability volume (here: the planted nodule mask) gives the same findings, in LPS mm, either way.
    prob = mask.astype(np.float32)
    box = tuple(slice(f, f + n) for f, n in zip(first, cropped.shape))
    whole = find_components(prob, vol.spacing_mm, vol.affine_zyx_to_lps, 0.5, 0.0).findings
    part = find_components(prob[box], cropped.spacing_mm, cropped.affine_zyx_to_lps, 0.5, 0.0).findings
    assert len(whole) == len(part) == 2
    for a, b in zip(sorted(whole, key=lambda f: f.centre_lps_mm), sorted(part, key=lambda f: f.centre_lps_mm)):
        np.testing.assert_allclose(a.centre_lps_mm, b.centre_lps_mm, atol=1e-6)
        assert a.volume_mm3 == b.volume_mm3


def test_the_scoring_chain_crops_after_resampling_and_before_windowing(tiny_ct):
    files = tiny_ct["with_nodule"]["files"]
    t: dict[str, float] = {}
    whole = model_input(1.0, (-1000.0, 400.0), "correct", 4)(files)
    cropped = model_input(1.0, (-1000.0, 400.0), "correct", 4, crop=CropToBody(-500.0, 0.0, (1, 8, 8)))(files, t)
    assert set(t) == {"read_s", "resample_s", "crop_s", "window_s"}
    first = np.rint(whole.volume.lps_to_index(cropped.volume.origin_lps_mm)).astype(int)
    box = tuple(slice(f, f + n) for f, n in zip(first, cropped.image.shape))
    np.testing.assert_array_equal(cropped.image, whole.image[box])
