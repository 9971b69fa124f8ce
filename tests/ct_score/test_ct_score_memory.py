"""A 1 000-slice series is segmented within memory sized from a budget, not from its length."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from inference.ct_stages import batch_for_budget, patch_bytes
from preprocessing.patches import patch_grid
from preprocessing.sliding_window import sliding_window_inference, window_bytes
from preprocessing.stitching import Stitcher, stitch

PATCH, STRIDE = (16, 32, 32), (8, 16, 16)
SLICES = 1000


def _halve(patches: np.ndarray) -> np.ndarray:
    """The test's small engine: a pointwise model (the blend must give back image / 2)."""
    return patches * np.float32(0.5)


def test_a_1000_slice_series_blends_in_buffers_of_one_patch_depth():
    image = np.random.default_rng(0).random((SLICES, 40, 48), dtype=np.float32)
    batch = 4
    tracemalloc.start()
    try:
        prob = sliding_window_inference(image, _halve, PATCH, STRIDE, batch, out_dtype=np.float16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    grid = patch_grid(image.shape, PATCH, STRIDE)
    whole_volume_sums = Stitcher.buffer_bytes(grid)  # what blending held before: two float32 volumes
    bound = window_bytes(image.shape, PATCH, STRIDE, batch, out_itemsize=2)
    # Measured peak (every numpy allocation after the image) within the computed bound, plus slack for
    # per-call temporaries of one patch (weights × prediction) and Python objects.
    slack = 4 * 4 * int(np.prod(PATCH)) + (256 << 10)
    assert peak <= bound + slack, (peak, bound)
    assert bound + slack < whole_volume_sums  # a whole-volume blend would not fit: the test can fail
    assert prob.dtype == np.float16 and prob.shape == image.shape
    np.testing.assert_allclose(prob.astype(np.float32), image * 0.5, atol=1e-3)


def test_rolling_blend_equals_the_whole_volume_blend_and_refuses_patches_out_of_order():
    rng = np.random.default_rng(1)
    image = rng.random((70, 40, 50), dtype=np.float32)
    grid = patch_grid(image.shape, PATCH, STRIDE)
    preds = rng.random((len(grid), *PATCH), dtype=np.float32)
    rolling = Stitcher(grid, rolling=True)
    for start in range(0, len(grid), 5):  # batches of 5 in grid order
        idx = range(start, min(start + 5, len(grid)))
        rolling.add(preds[idx.start:idx.stop], idx)
    np.testing.assert_array_equal(rolling.result(), stitch(preds, grid))
    backwards = Stitcher(grid, rolling=True)
    with np.errstate(invalid="ignore"):  # slices written out before any patch reached them
        backwards.add(preds[-1:], [len(grid) - 1])
    with pytest.raises(ValueError, match="grid order"):
        backwards.add(preds[:1], [0])


def test_the_patch_batch_is_sized_from_the_budget_and_everything_counted_fits_it():
    patch, stride = (64, 128, 128), (48, 96, 96)
    shape = (1000, 358, 358)  # a 1 000-slice chest series on the 1 mm grid
    budget = 2 << 30
    batch = batch_for_budget(shape, patch, stride, 8, budget)
    assert 1 <= batch < 8
    held = 4 * int(np.prod(shape)) + window_bytes(shape, patch, stride, 0, 2) + batch * patch_bytes(patch)
    assert held <= budget < held + patch_bytes(patch)  # the largest batch that fits, no larger
    # Too small a budget for the volume itself: no batch (the caller goes one patch at a time or elsewhere).
    assert batch_for_budget(shape, patch, stride, 8, 512 << 20) == 0


def test_the_engine_actor_scores_a_1000_slice_series_within_its_host_budget(tmp_path):
    from conf.settings import load_settings
    from engines.source import ReferenceEngine
    from inference.ct_stages import SegmentSeries

    patch, stride = (64, 128, 128), (48, 96, 96)
    shape = (SLICES, 128, 128)  # small in-plane so the real engine runs 21 patches
    fixed = 4 * int(np.prod(shape)) + window_bytes(shape, patch, stride, 0, 2)
    budget = fixed + 2 * patch_bytes(patch) + patch_bytes(patch) // 2  # room for two patches, not three
    settings = load_settings({"lake.root": str(tmp_path / "lake")})
    actor = SegmentSeries(ReferenceEngine(settings, "ct_nodule", intra_op_threads=1), "fp32", patch, stride,
                          8, 8, host_budget_bytes=budget)
    try:
        assert actor.host_batch(shape) == 2
        image = np.full(shape, 0.1, np.float32)
        timings: dict[str, float] = {}
        tracemalloc.start()
        try:
            prob, where = actor.segment(image, timings)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    finally:
        actor.close()
    assert where == "host" and prob.shape == shape and prob.dtype == np.float16
    assert timings["patches"] == len(patch_grid(shape, patch, stride)) == 21
    # Host arrays besides the image stay within what the budget allowed the sliding window
    # (the engine's own activations live in ONNX Runtime's arena, outside numpy).
    assert peak <= window_bytes(shape, patch, stride, 2, 2) + 4 * int(np.prod(patch)) + (1 << 20), peak
    assert peak < Stitcher.buffer_bytes(patch_grid(shape, patch, stride))  # whole-volume sums would not fit
