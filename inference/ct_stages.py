"""The three stages of CT scoring as Ray Data callables: prepare (CPU), segment (engine actor), find (CPU).

    PrepareSeries  CPU task: files → decode + geometry → 1 mm grid → crop to the body → window [0, 1]
                   (the one chain, :func:`preprocessing.ct_chain.model_input`); for actors on a
                   GPU only decode + geometry: the scanner grid ships as int16
    SegmentSeries  engine actor (:class:`inference.actors.EngineActor`): a scanner grid is
                   resampled, cropped and windowed (:func:`preprocessing.ct_chain.to_model_input`,
                   on the device), then sliding-window segmentation
                   (:func:`preprocessing.sliding_window.sliding_window_inference`)
    FindNodules    CPU task: connected components → findings (LPS mm)

One series travels as one row. Patches are cut inside the actor, as views of
the windowed volume, because moving a volume costs several times less than
moving its overlapping patches (each voxel sits in ~8 with the default
stride); blended batch by batch, a series' patch set is never materialised.

On a GPU actor whose engine runs on the CUDA execution provider and where
CuPy is installed (the ``gpu`` extra), the scanner grid's int16 HU is copied
to the device once, and resampling, the crop, windowing, padding, patch
cutting, the engine (I/O bound to device memory) and blending all stay there;
only the float16 probabilities come back. (A 1 mm float32 volume is 2× the
bytes of the same voxels as int16, and the scanner's slices are usually
thicker than 1 mm.) Patch batches then go up to the model card's maximum, bounded by the
device's free memory, and a series too large for what is free is segmented
on the host path instead of failing the actor.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from engines.source import EngineSource
from inference.actors import EngineActor
from lake.archive import Archive
from preprocessing.body_crop import CropToBody
from preprocessing.components import find_components
from preprocessing.ct_chain import Compose, LoadSeries, ResampleToSpacing, model_input
from preprocessing.resample import resampled_shape
from preprocessing.volume import Volume
from preprocessing.sliding_window import PATCH_ARRAYS, runner_predictor, sliding_window_inference, window_bytes

log = logging.getLogger(__name__)

# Columns of LAKE/imaging/series this stage reads (written by jobs.dicom_index).
COL_SERIES = "series_key"
COL_STUDY = "study_key"
COL_PATIENT = "patient_key"    # the EMR patient, from LAKE/imaging/patient_link (NULL: unlinked)
COL_FILES = "paths"

STATUS_OK = "ok"
# Reason code of series that failed between the index and the findings for a reason the chain does not name.
REASON_UNEXPECTED = "preprocessing_error"

# Share of the device's free memory one actor may plan for (ray.actors_per_gpu actors share a GPU).
DEVICE_MEMORY_SHARE = 0.4
# Engine activations per patch voxel, in float32 values, for the 3-D U-Net (measured peak / voxels, rounded up).
ACTIVATION_FLOATS_PER_VOXEL = 48


def body_crop(imaging: Any) -> CropToBody | None:
    """The crop-to-body step ``imaging`` settings ask for (None: score the whole field of view).

    Grown to at least one patch, so a small body is not padded back to one."""
    if not imaging.crop_to_body:
        return None
    return CropToBody(imaging.body_threshold_hu, imaging.body_margin_mm, tuple(imaging.patch_size))


def scanner_hu_int16(hu: np.ndarray) -> np.ndarray:
    """HU as int16 (rounded; CT stores integers, so rounding moves at most an interpolated voxel by ≤ 0.5 HU)."""
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)


def volume_from_row(hu: Any, affine: list[float], spacing_mm: list[float]) -> Volume:
    """The :class:`Volume` a prepared row describes (its grid's geometry from the row's affine)."""
    a = np.asarray(affine, dtype=np.float64).reshape(4, 4)
    sz, sy, sx = (float(v) for v in spacing_mm)
    direction = np.stack([a[:3, 2] / sx, a[:3, 1] / sy, a[:3, 0] / sz], axis=1)
    return Volume(hu, (sz, sy, sx), tuple(a[:3, 3]), direction)


def _model_grid_s(t: dict[str, float]) -> float:
    return t.get("resample_s", 0.0) + t.get("crop_s", 0.0) + t.get("window_s", 0.0)


def _nd_bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


PREPARED = pa.schema([
    (COL_SERIES, pa.string()), (COL_STUDY, pa.string()), (COL_PATIENT, pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("grid", pa.string()),
    ("image", pa.large_binary()), ("shape", pa.list_(pa.int64())), ("affine", pa.list_(pa.float64())),
    ("spacing_mm", pa.list_(pa.float64())), ("read_s", pa.float64()), ("resample_s", pa.float64()),
])


# What a prepared row's image holds: the windowed float32 model input, or the scanner grid's HU as int16
# (the engine actor resamples, crops and windows it, on the GPU where it has one).
GRID_MODEL = "model"
GRID_SCANNER = "scanner"


class PrepareSeries:
    """Ray Data batch fn (CPU task): series rows in, one volume per row out.

    ``ship=GRID_MODEL``: the windowed 1 mm volume (float32), made here on the host.
    ``ship=GRID_SCANNER`` (engine actors on a GPU): the decoded volume on the scanner's grid as
    int16 HU with its geometry; resampling, crop and window run in the actor on the device.
    """

    def __init__(self, target_spacing_mm: float, window_hu: tuple[float, float],
                 gantry_tilt: str = "correct", min_slices: int = 2, archive: Archive | None = None,
                 crop: CropToBody | None = None, ship: str = GRID_MODEL):
        if ship not in (GRID_MODEL, GRID_SCANNER):
            raise ValueError(f"ship {ship!r} is not one of {GRID_MODEL!r}, {GRID_SCANNER!r}")
        self.ship = ship
        # Keyed relative paths are resolved here, in the read task.
        resolve = archive.resolve_all if archive is not None else None
        self.chain = model_input(float(target_spacing_mm), tuple(window_hu), gantry_tilt, int(min_slices),
                                 resolve, crop) if ship == GRID_MODEL else \
            Compose(LoadSeries(gantry_tilt, int(min_slices), resolve))

    def __call__(self, rows: pa.Table) -> pa.Table:
        from preprocessing.dicom_series import SeriesError

        out: list[dict[str, Any]] = []
        for row in rows.to_pylist():
            rec = {COL_SERIES: row[COL_SERIES], COL_STUDY: row[COL_STUDY], COL_PATIENT: row[COL_PATIENT],
                   "status": STATUS_OK, "reason": None, "detail": None, "grid": self.ship, "image": b"",
                   "shape": [0, 0, 0], "affine": [0.0] * 16, "spacing_mm": [0.0] * 3,
                   "read_s": 0.0, "resample_s": 0.0}
            t: dict[str, float] = {}
            try:
                prepared = self.chain(list(row[COL_FILES] or []), t)
            except SeriesError as exc:
                # The message can name files; keep only the reason code in the output.
                rec.update(status="failed", reason=exc.reason, detail=exc.reason)
                out.append(rec)
                continue
            except (OSError, ValueError, MemoryError) as exc:
                rec.update(status="failed", reason=REASON_UNEXPECTED, detail=type(exc).__name__)
                out.append(rec)
                continue
            if self.ship == GRID_SCANNER:
                vol, image = prepared, scanner_hu_int16(prepared.hu)
            else:
                vol, image = prepared.volume, prepared.image.astype(np.float32, copy=False)
            rec.update(image=_nd_bytes(image), shape=list(image.shape),
                       affine=[float(v) for v in vol.affine_zyx_to_lps.ravel()],
                       spacing_mm=list(vol.spacing_mm), read_s=t.get("read_s", 0.0),
                       resample_s=_model_grid_s(t))
            out.append(rec)
        return pa.Table.from_pylist(out, schema=PREPARED)


class SegmentSeries(EngineActor):
    """Segments each prepared series with the actor's engine; probabilities leave as float16.

    float16 is enough: probabilities are only thresholded and averaged
    downstream, and half the bytes move through the object store.
    ``batch_patches`` is the host path's batch (the card's optimal profile
    batch); ``max_batch_patches`` (the profile's maximum) bounds the device path's.
    """

    def __init__(self, source: EngineSource, precision: str, patch_size: tuple[int, int, int],
                 stride: tuple[int, int, int], batch_patches: int, max_batch_patches: int | None = None,
                 device_arrays: str = "auto", model_grid: Compose | None = None,
                 host_budget_bytes: int | None = None):
        super().__init__(source, precision)
        # Host memory one series may take on the host path (volume, blend buffers, patch batch, engine).
        self.host_budget_bytes = host_budget_bytes
        # Scanner grid → model input (preprocessing.ct_chain.to_model_input) for rows shipped as GRID_SCANNER.
        self.model_grid = model_grid
        self.patch_size = tuple(int(v) for v in patch_size)
        self.stride = tuple(int(v) for v in stride)
        self.batch_patches = int(batch_patches)
        self.max_batch_patches = int(max_batch_patches or batch_patches)
        self.on_device = device_arrays == "auto" and _device_arrays_usable(self.runner)
        self._predict_host = runner_predictor(self.runner)
        self._device_batch = self.max_batch_patches

    def __call__(self, block: pa.Table) -> pa.Table:
        probs, engine_s, patch_s, stitch_s, patches, where = [], [], [], [], [], []
        # The model grid's geometry: the row's own, or the one this actor resampled a scanner grid to.
        shapes, affines, spacings, resample_s = [], [], [], []
        for row in block.select(["status", "grid", "image", "shape", "affine", "spacing_mm",
                                 "resample_s"]).to_pylist():
            shapes.append(row["shape"]), affines.append(row["affine"]), spacings.append(row["spacing_mm"])
            resample_s.append(row["resample_s"])
            if row["status"] != STATUS_OK:
                probs.append(b"")
                engine_s.append(0.0), patch_s.append(0.0), stitch_s.append(0.0), patches.append(0)
                where.append(None)
                continue
            t: dict[str, float] = {}
            if row["grid"] == GRID_SCANNER:
                hu = np.frombuffer(row["image"], dtype=np.int16).reshape(row["shape"])
                prob, device, vol = self.segment_scanner_grid(volume_from_row(hu, row["affine"], row["spacing_mm"]), t)
                shapes[-1], spacings[-1] = list(vol.shape), list(vol.spacing_mm)
                affines[-1] = [float(v) for v in vol.affine_zyx_to_lps.ravel()]
                resample_s[-1] += _model_grid_s(t)
            else:
                image = np.frombuffer(row["image"], dtype=np.float32).reshape(row["shape"])
                prob, device = self.segment(image, t)
            probs.append(_nd_bytes(prob))
            engine_s.append(t["engine_s"]), patch_s.append(t["patch_s"])
            stitch_s.append(t["stitch_s"]), patches.append(int(t["patches"])), where.append(device)
        n = block.num_rows
        block = block.drop_columns(["image", "shape", "affine", "spacing_mm", "resample_s"])
        for name, values, typ in (("shape", shapes, pa.list_(pa.int64())), ("affine", affines, pa.list_(pa.float64())),
                                  ("spacing_mm", spacings, pa.list_(pa.float64())),
                                  ("resample_s", resample_s, pa.float64()),
                                  ("prob", probs, pa.large_binary()), ("engine_s", engine_s, pa.float64()),
                                  ("patch_s", patch_s, pa.float64()), ("stitch_s", stitch_s, pa.float64()),
                                  ("patches", patches, pa.int64()), ("arrays_on", where, pa.string()),
                                  ("engine_fingerprint", [self.metadata["fingerprint"]] * n, pa.string()),
                                  ("precision", [self.metadata["precision"]] * n, pa.string())):
            block = block.append_column(name, pa.array(values, typ))
        return block

    def segment(self, image: np.ndarray, timings: dict[str, float]) -> tuple[np.ndarray, str]:
        """float16 probabilities of one windowed volume, and where its arrays lived ("gpu" or "host")."""
        if self.on_device:
            batch = device_batch(image.shape, self.patch_size, self.stride, self.max_batch_patches)
            if batch:
                import cupy

                t0 = time.perf_counter()
                image_d = cupy.asarray(image)  # the volume's one host→device copy
                timings["patch_s"] = time.perf_counter() - t0
                return self._segment_on_device(image_d, batch, timings), "gpu"
            log.warning("series of %s voxels does not fit the device's free memory; segmenting on the host",
                        "×".join(map(str, image.shape)))
        return self._segment_on_host(image, timings), "host"

    def host_batch(self, shape_zyx: tuple[int, ...]) -> int:
        """Patches per engine call on the host path: the card's batch, fewer where the budget asks."""
        if self.host_budget_bytes is None:
            return self.batch_patches
        batch = batch_for_budget(shape_zyx, self.patch_size, self.stride, self.batch_patches, self.host_budget_bytes)
        if not batch:
            log.warning("series of %s voxels exceeds imaging.host_memory_budget_mb even one patch at a time; "
                        "segmenting one patch at a time", "×".join(map(str, shape_zyx)))
        return max(1, batch)

    def _segment_on_host(self, image: np.ndarray, timings: dict[str, float]) -> np.ndarray:
        return sliding_window_inference(image, self._predict_host, self.patch_size, self.stride,
                                        self.host_batch(image.shape), timings=timings, out_dtype=np.float16)

    def segment_scanner_grid(self, volume: Volume, timings: dict[str, float]) -> tuple[np.ndarray, str, Volume]:
        """float16 probabilities of a volume on its scanner grid (int16 HU), where its arrays lived, and
        the model grid they lie on: resampled, cropped and windowed by ``model_grid`` on the device
        (one int16 host→device copy) where it fits, else on the host — the same steps either way."""
        if self.model_grid is None:
            raise ValueError("a scanner-grid series reached an actor built without model_grid; "
                             "build SegmentSeries with preprocessing.ct_chain.to_model_input(...)")
        if self.on_device:
            spacing = next(st.spacing_mm for st in self.model_grid.steps if isinstance(st, ResampleToSpacing))
            target = resampled_shape(volume.shape, volume.spacing_mm,
                                     (spacing,) * 3 if np.isscalar(spacing) else spacing)  # type: ignore[arg-type]
            # Before the sliding window: the int16 copy, its float32 HU, resampling's intermediates.
            held = 6 * int(np.prod(volume.shape)) + 8 * int(np.prod(target))
            batch = device_batch(target, self.patch_size, self.stride, self.max_batch_patches, held_bytes=held)
            if batch:
                import cupy

                t0 = time.perf_counter()
                hu_d = cupy.asarray(volume.hu)  # the series' one host→device copy, as int16
                timings["patch_s"] = time.perf_counter() - t0
                prepared = self.model_grid(volume.with_hu(hu_d), timings)
                return self._segment_on_device(prepared.image, batch, timings), "gpu", prepared.volume
            log.warning("series of %s scanner voxels does not fit the device's free memory; "
                        "resampling and segmenting on the host", "×".join(map(str, volume.shape)))
        prepared = self.model_grid(volume, timings)
        return self._segment_on_host(prepared.image, timings), "host", prepared.volume

    def _segment_on_device(self, image_d: Any, batch: int, timings: dict[str, float]) -> np.ndarray:
        import cupy

        self._device_batch = batch
        timings.setdefault("patch_s", 0.0)
        prob_d = sliding_window_inference(image_d, self._predict_device, self.patch_size, self.stride,
                                          batch, timings=timings, out_dtype=cupy.float16)
        t0 = time.perf_counter()
        prob = prob_d.get()
        timings["stitch_s"] += time.perf_counter() - t0
        return prob

    def _predict_device(self, patches: Any) -> Any:
        # A short last batch is padded to the full one: the engine then sees one input shape, so the
        # CUDA EP's convolution algorithm search runs once per actor, not once per remainder size.
        n = len(patches)
        if n < self._device_batch:
            import cupy

            pad = cupy.zeros((self._device_batch - n, *patches.shape[1:]), dtype=patches.dtype)
            patches = cupy.concatenate([patches, pad])
        return self.runner.infer_device({"image": patches})["prob"][:n]  # type: ignore[attr-defined]


def _device_arrays_usable(runner: Any) -> bool:
    """CuPy importable and the engine bound to CUDA device memory (ONNX Runtime's CUDA EP)."""
    if not getattr(runner, "runs_on_gpu", False) or not hasattr(runner, "infer_device"):
        return False
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # noqa: BLE001 — no CuPy, or no driver: the host path
        return False


def device_batch(shape_zyx: tuple[int, ...], patch_size: tuple[int, int, int], stride: tuple[int, int, int],
                 max_batch: int, free_bytes: int | None = None, held_bytes: int = 0) -> int:
    """Patches per engine call on the device for a volume of ``shape_zyx``, or 0 when it does not fit.

    Budget: :data:`DEVICE_MEMORY_SHARE` of the device's free memory (``free_bytes``,
    read from the device when None). ``held_bytes`` (what preparing the volume on
    the device holds: a scanner grid and its resampling), the volume, its padded
    copy and the two blend buffers come first; each patch in a batch then needs
    its input, its output, one blend temporary and the engine's activations.
    """
    if free_bytes is None:
        import cupy

        free_bytes = int(cupy.cuda.runtime.memGetInfo()[0])
    budget = DEVICE_MEMORY_SHARE * free_bytes
    return batch_for_budget(shape_zyx, patch_size, stride, max_batch, int(budget), held_bytes)


def batch_for_budget(shape_zyx: tuple[int, ...], patch_size: tuple[int, int, int], stride: tuple[int, int, int],
                     max_batch: int, budget_bytes: int, held_bytes: int = 0) -> int:
    """The largest batch (≤ ``max_batch``) whose segmentation of a float32 volume of ``shape_zyx`` fits
    ``budget_bytes``, or 0 when even one patch does not.

    Counted: ``held_bytes``, the volume, what the sliding window holds besides it
    (:func:`preprocessing.sliding_window.window_bytes`: padded copy, rolling blend
    buffers, the float16 result) and, per patch in a batch, its arrays and the
    engine's activations (:data:`ACTIVATION_FLOATS_PER_VOXEL`).
    """
    fixed = int(held_bytes) + 4 * int(np.prod(shape_zyx)) + window_bytes(shape_zyx, patch_size, stride, 0, 2)
    return int(max(0, min(max_batch, (budget_bytes - fixed) // patch_bytes(patch_size))))


def patch_bytes(patch_size: tuple[int, int, int]) -> int:
    """Bytes one patch of a batch takes: its arrays in the sliding window and the engine's activations."""
    return 4 * int(np.prod(patch_size)) * (PATCH_ARRAYS + ACTIVATION_FLOATS_PER_VOXEL)


class FindNodules:
    """Ray Data batch fn (CPU task): probability volumes in, one summary row per series out."""

    def __init__(self, threshold: float, min_volume_mm3: float):
        self.threshold = float(threshold)
        self.min_volume_mm3 = float(min_volume_mm3)

    def __call__(self, block: pa.Table) -> pa.Table:
        findings_json, components, dropped, comp_s = [], [], [], []
        for row in block.select(["status", "prob", "shape", "affine", "spacing_mm"]).to_pylist():
            if row["status"] != STATUS_OK:
                findings_json.append("[]"), components.append(0), dropped.append(0), comp_s.append(0.0)
                continue
            t0 = time.perf_counter()
            prob = np.frombuffer(row["prob"], dtype=np.float16).reshape(row["shape"])
            summary = find_components(prob, tuple(row["spacing_mm"]),  # type: ignore[arg-type]
                                      np.asarray(row["affine"]).reshape(4, 4),
                                      self.threshold, self.min_volume_mm3)
            findings_json.append(json.dumps([
                {"finding_id": f.finding_id, "centre_lps_mm": list(f.centre_lps_mm),
                 "diameter_mm": f.diameter_mm, "volume_mm3": f.volume_mm3,
                 "max_prob": f.max_prob, "mean_prob": f.mean_prob} for f in summary.findings]))
            components.append(summary.components)
            dropped.append(summary.dropped_small)
            comp_s.append(time.perf_counter() - t0)
        block = block.drop_columns(["prob"])
        for name, values, typ in (("findings", findings_json, pa.string()), ("components", components, pa.int64()),
                                  ("dropped_small", dropped, pa.int64()), ("components_s", comp_s, pa.float64())):
            block = block.append_column(name, pa.array(values, typ))
        return block
