"""The shared CT core: one preprocessing chain for training and scoring, one sliding window for any
predictor, an engine actor that holds its engine exactly once, a segmentation gate handed its data,
and device batches bounded by free memory."""
from __future__ import annotations

import numpy as np
import pytest

from conf.settings import load_settings
from engines import gate, samples
from engines.model_card import load_card
from engines.runner import activated
from engines.source import ReferenceEngine
from inference.actors import EngineActor
from inference.ct_stages import SegmentSeries, device_batch
from preprocessing.ct_chain import Compose, ResampleToSpacing, WindowToUnit, model_input
from preprocessing.sliding_window import runner_predictor, sliding_window_inference


def test_scoring_chain_gives_the_training_chain_s_input_and_times_each_stage(tiny_ct):
    from preprocessing.dicom_series import load_volume

    files = tiny_ct["with_nodule"]["files"]
    timings: dict[str, float] = {}
    scored = model_input(1.0, (-1000.0, 400.0), "correct", 4)(files, timings)
    # Training starts from a HU volume in memory; after loading, the two chains must agree voxel for voxel.
    trained = Compose(ResampleToSpacing(1.0), WindowToUnit((-1000.0, 400.0)))(load_volume(files))
    np.testing.assert_array_equal(scored.image, trained.image)
    assert scored.volume.spacing_mm == (1.0, 1.0, 1.0)
    assert float(scored.image.min()) >= 0.0 and float(scored.image.max()) <= 1.0
    assert set(timings) == {"read_s", "resample_s", "window_s"} and all(v >= 0 for v in timings.values())


def test_sliding_window_result_does_not_depend_on_the_batch():
    rng = np.random.default_rng(3)
    image = rng.random((40, 70, 90), dtype=np.float32)

    def square(patches: np.ndarray) -> np.ndarray:  # a pointwise "model": the blend must give it back
        return patches * patches

    one = sliding_window_inference(image, square, (16, 32, 32), (8, 16, 16), 1)
    many = sliding_window_inference(image, square, (16, 32, 32), (8, 16, 16), 7)
    np.testing.assert_allclose(one, many, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(one, image * image, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="batch_patches"):
        sliding_window_inference(image, square, (16, 32, 32), (8, 16, 16), 0)


def test_engine_actor_activates_its_engine_once_and_releases_it(tmp_path):
    settings = load_settings({"lake.root": str(tmp_path / "lake")})
    actor = EngineActor(ReferenceEngine(settings, "ct_nodule", intra_op_threads=1), "fp32")
    assert actor.runner.is_active and actor.fingerprint.startswith("onnxruntime-")
    x = np.zeros((1, 1, 64, 128, 128), np.float32)
    assert runner_predictor(actor.runner)(x).shape == x.shape
    actor.close()
    assert not actor.runner.is_active
    actor.close()  # idempotent


def test_segmentation_gate_judges_the_data_it_is_handed(tmp_path):
    settings = load_settings({"lake.root": str(tmp_path / "lake")})
    card = load_card(settings, "ct_nodule")
    images, truth = samples.planted_spheres((64, 128, 128), 2)
    runner, _ = ReferenceEngine(settings, "ct_nodule", intra_op_threads=1).load("fp32")

    class Blind:  # a candidate that sees nothing: every mask empty
        name = "blind"

        def infer(self, feed):
            return {"prob": np.zeros_like(feed["image"])}

    with activated(runner) as reference:
        same = gate.segmentation_gate(card, reference, reference, "fp16", images, truth)
        blind = gate.segmentation_gate(card, reference, Blind(), "fp16", images, truth)
    assert same["passed"] and same["metrics"]["volumes"] == 2 and same["metrics"]["delta_dice"] == 0.0
    assert same["metrics"]["dice_reference"] > 0.5
    assert not blind["passed"] and blind["metrics"]["dice_candidate"] == 0.0


def test_device_batches_are_bounded_by_free_memory():
    patch, stride = (64, 128, 128), (32, 64, 64)
    gib = 1 << 30
    # A typical chest series on a large free device: the profile's maximum batch.
    assert device_batch((375, 358, 358), patch, stride, 16, free_bytes=100 * gib) == 16
    # Less free memory: a smaller batch, never zero while the volume itself fits.
    small = device_batch((375, 358, 358), patch, stride, 16, free_bytes=8 * gib)
    assert 1 <= small < 16
    # A 1 000-slice series where little is free does not fit: the host path takes it.
    assert device_batch((1000, 512, 512), patch, stride, 16, free_bytes=2 * gib) == 0


def test_a_cpu_engine_segments_on_the_host_path_and_refuses_device_arrays(tmp_path):
    settings = load_settings({"lake.root": str(tmp_path / "lake")})
    actor = SegmentSeries(ReferenceEngine(settings, "ct_nodule", intra_op_threads=1), "fp32",
                          (64, 128, 128), (32, 64, 64), 1, 16)
    try:
        assert not actor.on_device
        image = np.full((64, 128, 128), 0.1, np.float32)
        timings: dict[str, float] = {}
        prob, where = actor.segment(image, timings)
        assert where == "host" and prob.dtype == np.float16 and prob.shape == image.shape
        assert timings["patches"] == 1
        with pytest.raises(RuntimeError, match="CUDA execution provider"):
            actor.runner.infer_device({"image": image[None, None]})
    finally:
        actor.close()
