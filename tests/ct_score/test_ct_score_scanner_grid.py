"""Read tasks that ship the scanner grid (int16) and actors that resample it give what the host chain gives.

On a GPU the actor runs these steps on CuPy arrays; here numpy stands in for it
(the steps are written once against the array API: preprocessing.array_module).
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from conf.settings import load_settings
from engines.source import ReferenceEngine
from inference.ct_stages import (GRID_MODEL, GRID_SCANNER, FindNodules, PrepareSeries, SegmentSeries, body_crop,
                                 volume_from_row)
from preprocessing.ct_chain import to_model_input
from preprocessing.volume import Volume
from synth.ct_phantom import make_phantom

WINDOW = (-1000.0, 400.0)


def test_a_scanner_grid_row_carries_its_geometry_exactly():
    direction = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    vol = Volume(np.zeros((5, 6, 7), np.int16), (2.5, 0.7, 0.8), (10.0, -20.0, 30.0), direction)
    back = volume_from_row(vol.hu, [float(v) for v in vol.affine_zyx_to_lps.ravel()], list(vol.spacing_mm))
    np.testing.assert_allclose(back.affine_zyx_to_lps, vol.affine_zyx_to_lps, atol=1e-12)
    assert back.spacing_mm == vol.spacing_mm


def test_int16_scanner_hu_resampled_cropped_and_windowed_equals_the_float_chain():
    rng = np.random.default_rng(11)
    hu, _ = make_phantom((30, 220, 220), (2.5, 0.8, 0.8), [{"centre_lps_mm": [-30.0, 0.0, 0.0],
                                                            "diameter_mm": 9.0}], rng)
    settings = load_settings({})
    chain = to_model_input(1.0, WINDOW, body_crop(settings.imaging))
    from_float = chain(Volume(hu.astype(np.float32), (2.5, 0.8, 0.8), (-88.0, -88.0, -36.0)))
    from_int16 = chain(Volume(hu, (2.5, 0.8, 0.8), (-88.0, -88.0, -36.0)))
    assert from_float.image.shape[1] < 176  # the crop took air off the 176 mm field of view
    np.testing.assert_array_equal(from_int16.image, from_float.image)
    np.testing.assert_array_equal(from_int16.volume.affine_zyx_to_lps, from_float.volume.affine_zyx_to_lps)


def test_both_ways_of_shipping_a_series_give_the_same_findings_and_the_scanner_grid_moves_fewer_bytes(
        tiny_ct, tmp_path):
    settings = load_settings({"lake.root": str(tmp_path / "lake")})
    im = settings.imaging
    rec = tiny_ct["with_nodule"]
    rows = pa.table({"series_key": ["s1"], "study_key": ["st1"], "patient_key": pa.nulls(1, pa.string()),
                     "paths": pa.array([rec["files"]], pa.list_(pa.string()))})
    crop = body_crop(im)
    actor = SegmentSeries(ReferenceEngine(settings, "ct_nodule", intra_op_threads=1), "fp32",
                          tuple(im.patch_size), tuple(im.patch_stride), 8, 8, "auto",
                          to_model_input(im.target_spacing_mm, im.window_hu, crop))
    find = FindNodules(im.probability_threshold, im.min_finding_volume_mm3)
    out = {}
    try:
        for ship in (GRID_MODEL, GRID_SCANNER):
            prepared = PrepareSeries(im.target_spacing_mm, im.window_hu, im.gantry_tilt, 4, None, crop, ship)(rows)
            assert prepared.column("status").to_pylist() == ["ok"]
            image_bytes = len(prepared.column("image")[0].as_py())
            segmented = actor(prepared)
            out[ship] = {"bytes": image_bytes, "seg": segmented.to_pylist()[0],
                         "found": find(segmented).to_pylist()[0]}
    finally:
        actor.close()
    model, scanner = out[GRID_MODEL], out[GRID_SCANNER]
    # The actor hands on the model grid's geometry either way: FindNodules cannot tell the difference.
    for col in ("shape", "affine", "spacing_mm"):
        np.testing.assert_allclose(scanner["seg"][col], model["seg"][col], atol=1e-9)
    np.testing.assert_array_equal(np.frombuffer(scanner["seg"]["prob"], np.float16),
                                  np.frombuffer(model["seg"]["prob"], np.float16))
    assert json.loads(scanner["found"]["findings"]) == json.loads(model["found"]["findings"])
    assert len(json.loads(model["found"]["findings"])) >= 1  # the planted nodule
    # 2 mm slices as int16 against 1 mm float32: a quarter of the bytes through the object store.
    assert scanner["bytes"] * 3 < model["bytes"]
    assert scanner["seg"]["arrays_on"] == model["seg"]["arrays_on"] == "host"
