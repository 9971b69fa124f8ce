"""Benchmark: CT nodule scoring end to end, DICOM files in → committed findings out.

Compares, in one run, on the same series and the same model:

- ``pipelines``: medscreen's pipeline (``inference.ct.score``: Ray Data CPU
  tasks decode + resample + window, engine actors cut patches, run the engine
  in large batches and blend — on the GPU with CuPy where the engine runs on
  CUDA — CPU tasks find components), once per ``--precisions`` entry (fp32:
  the reference ONNX; fp16 and others: built and gated by the engine cache,
  as ``medscreen engines ensure`` would), each with volumes/min, the stage
  breakdown and the GPU's busy share (``nvidia-smi`` sampled every 100 ms);
- ``fp16_vs_fp32``: findings per series identical in number and within 1 mm;
- ``baseline``: MONAI-style sliding-window inference of the same model one
  patch per call, sequential, in the same process: PyTorch eager on the GPU
  when torch + CUDA are present, else ONNX Runtime (CPU EP). Same reading,
  resampling and blending, so the difference is the scoring path.

Series are written with ``synth.ct`` (512×512, 120–300 slices; in parallel
processes) into a scratch directory with a series index committed the way the
DICOM index writes it. Prints one JSON object last.

    python bench/ct.py --quick
    python bench/ct.py --series 10 --precisions fp32,fp16
    python bench/ct.py --small --series 10 --skip-baseline --only-variants \
        --variants '[{"patch_stride": [32, 64, 64], "crop_to_body": false}]'

``--variants`` scores the same series again with imaging settings changed
(stride, crop to the body) and reports, per run, planted nodules found, false
positives (findings near no planted nodule) and centre errors, and each
variant's findings against the first pipeline's.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from conf.settings import Settings, load_settings  # noqa: E402
from lake.commit import atomic_partition  # noqa: E402
from lake.keys import mrn_key, pseudonymise  # noqa: E402
from lake.paths import LakePaths  # noqa: E402

AS_OF = "2024-06-30"
BENCH_KEY = b"medscreen-bench-ct-key-0001"


def log(msg: str) -> None:
    print(f"[bench ct] {msg}", file=sys.stderr, flush=True)


# --- data --------------------------------------------------------------------------------------

def _write_one(job: tuple[Path, int, int, int, float, float, int]) -> dict[str, Any]:
    from synth.ct_phantom import ChestAnatomy, ChestPhantom, Nodule, random_nodules
    from synth.ct import SeriesSpec, write_series

    out, i, n, rows, pixel_mm, slice_mm, seed = job
    rng = np.random.default_rng([seed, i])
    extent = slice_mm * (n - 1)
    fov = rows * pixel_mm
    anatomy = ChestAnatomy(centre_lps_mm=(0.0, 0.0, 0.0), fov_mm=(fov, fov, extent + slice_mm))
    nodules = random_nodules(rng, 3, anatomy, diameter_range_mm=(6.0, 20.0))
    spec = SeriesSpec("axial_chest", rows=rows, cols=rows, pixel_spacing_mm=pixel_mm,
                      z_positions_mm=[-extent / 2 + k * slice_mm for k in range(n)])
    study = {"patient_name": f"BENCH^CT{i}", "patient_id": f"BENCHCT{i:04d}", "birth_date": "19600101",
             "sex": "M", "study_uid": f"1.2.826.0.1.3680043.8.498.99.{seed}.{i}.1",
             "frame_uid": f"1.2.826.0.1.3680043.8.498.99.{seed}.{i}.2", "study_date": "20240301",
             "accession": f"B{i}"}
    folder = out / f"series_{i:02d}"
    folder.mkdir(parents=True, exist_ok=True)
    rec = write_series(folder, ChestPhantom(anatomy, [Nodule.from_dict(d) for d in nodules]), spec,
                       study, 1, rng, f"bench-ct/{seed}/{i}")
    rec.update(files=[str(folder / f) for f in rec["files"]], study_uid=study["study_uid"],
               patient_id=study["patient_id"], nodules=nodules)
    return rec


def write_series_set(out: Path, slices: list[int], rows: int, pixel_mm: float, slice_mm: float,
                     seed: int = 7, workers: int = 1) -> list[dict[str, Any]]:
    """One axial chest series per entry of ``slices`` (synth_ct's writer and phantom), ``workers`` at a time."""
    jobs = [(out, i, n, rows, pixel_mm, slice_mm, seed) for i, n in enumerate(slices)]
    if workers <= 1 or len(jobs) == 1:
        return [_write_one(j) for j in jobs]
    from multiprocessing import get_context

    with get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return pool.map(_write_one, jobs)


def commit_index(lake_root: Path, recs: list[dict[str, Any]]) -> None:
    """LAKE/imaging/series for the bench series, with the DICOM index's columns."""
    table = pa.table({
        "series_key": [pseudonymise(BENCH_KEY, r["series_instance_uid"]) for r in recs],
        "study_key": [pseudonymise(BENCH_KEY, r["study_uid"]) for r in recs],
        "mrn_key": [mrn_key(BENCH_KEY, r["patient_id"]) for r in recs],
        "verdict": ["eligible"] * len(recs), "eligible": [True] * len(recs),
        "study_date": pa.array([dt.date(2024, 3, 1)] * len(recs), pa.date32()),
        "paths": pa.array([r["files"] for r in recs], pa.list_(pa.string())),
    })
    with atomic_partition(LakePaths(lake_root).dicom_series, {"stage": "bench_ct_index"}) as staging:
        pq.write_table(table, staging / "part-00000.parquet")
    # No EMR in the bench lake: every series unlinked, as jobs/imaging_link would leave it.
    n = table.num_rows
    link = pa.table({"series_key": table.column("series_key"), "study_key": table.column("study_key"),
                     "mrn_key": table.column("mrn_key"), "patient_key": pa.nulls(n, pa.string()),
                     "link_status": pa.array(["mrn_not_in_emr"] * n, pa.string())})
    with atomic_partition(LakePaths(lake_root).imaging_link,
                          {"stage": "bench_link", "inputs": {"series": {"run_id": None},
                                                             "patients": {"run_id": None}}}) as staging:
        pq.write_table(link, staging / "part-00000.parquet")


# --- baseline: one patch per call ----------------------------------------------------------------

class _TorchEager:
    """The reference U-Net in PyTorch eager on CUDA (the MONAI-style baseline on a GPU machine)."""

    name = "torch-eager-cuda"

    def __init__(self) -> None:
        import torch

        from models.ct_nodule.model import UNet3D

        self.torch = torch
        self.model = UNet3D(8)
        self.model.load_state_dict(torch.load(REPO / "models/ct_nodule/ct_nodule.pt", weights_only=True))
        self.model = self.model.eval().cuda()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.torch.no_grad():
            x = self.torch.from_numpy(feed["image"]).cuda()
            return {"prob": self.model(x).cpu().numpy()}


def _baseline_runner(settings: Settings):
    try:
        import torch

        if torch.cuda.is_available() and (REPO / "models/ct_nodule/ct_nodule.pt").is_file():
            return _TorchEager()
    except ImportError:
        pass
    from engines.source import ReferenceEngine

    runner, _ = ReferenceEngine(settings, "ct_nodule").load("fp32")
    runner.activate()
    runner.name = "onnxruntime-" + runner.active_providers[0].replace("ExecutionProvider", "").lower() + "-batch1"
    return runner


def run_baseline(settings: Settings, recs: list[dict[str, Any]]) -> dict[str, Any]:
    """Sequential sliding window, batch 1: read → resample → window → patch-by-patch → blend → components."""
    from inference.ct_stages import body_crop
    from preprocessing.components import find_components
    from preprocessing.ct_chain import model_input
    from preprocessing.sliding_window import runner_predictor, sliding_window_inference

    im = settings.imaging
    runner = _baseline_runner(settings)
    chain = model_input(im.target_spacing_mm, im.window_hu, im.gantry_tilt, im.min_slices, crop=body_crop(im))
    stage = {"read_s": 0.0, "resample_s": 0.0, "patch_s": 0.0, "engine_s": 0.0, "stitch_s": 0.0,
             "components_s": 0.0}
    findings, patches = 0, 0
    t_start = time.perf_counter()
    for r in recs:
        t: dict[str, float] = {}
        prepared = chain(r["files"], t)
        vol = prepared.volume
        prob = sliding_window_inference(prepared.image, runner_predictor(runner), tuple(im.patch_size),  # type: ignore[arg-type]
                                        tuple(im.patch_stride), 1, timings=t)
        t3 = time.perf_counter()
        s = find_components(prob, vol.spacing_mm, vol.affine_zyx_to_lps, im.probability_threshold,
                            im.min_finding_volume_mm3)
        t4 = time.perf_counter()
        stage["read_s"] += t["read_s"]
        stage["resample_s"] += t["resample_s"] + t["window_s"]
        for k in ("patch_s", "engine_s", "stitch_s"):
            stage[k] += t[k]
        stage["components_s"] += t4 - t3
        findings += len(s.findings)
        patches += int(t["patches"])
    wall = time.perf_counter() - t_start
    return {"name": runner.name, "wall_s": round(wall, 3), "volumes_per_min": round(len(recs) / (wall / 60), 3),
            "patches": patches, "findings": findings, "stage_s": {k: round(v, 3) for k, v in stage.items()}}


def h2d_seconds(settings: Settings, batch: int) -> float | None:
    """Host→device time of one engine batch of patches on the CUDA EP (None on CPU: nothing to copy)."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    x = np.random.default_rng(0).random((batch, 1, *settings.imaging.patch_size), dtype=np.float32)
    ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)  # warm the allocator
    t0 = time.perf_counter()
    for _ in range(5):
        ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    return (time.perf_counter() - t0) / 5


def nodule_match(lake_root: Path, recs: list[dict[str, Any]], tol_mm: float = 5.0) -> dict[str, Any]:
    """Findings against the planted nodules: ``found`` (``found/planted``: a finding centre within
    ``tol_mm``), findings near no planted nodule (false positives) and the found ones' centre errors."""
    centres_by_series = read_findings(lake_root)
    found = planted = false_pos = 0
    errors: list[float] = []
    for r in recs:
        centres = np.asarray(centres_by_series.get(pseudonymise(BENCH_KEY, r["series_instance_uid"]), []),
                             dtype=np.float64).reshape(-1, 3)
        truth = np.asarray([n["centre_lps_mm"] for n in r["nodules"]], dtype=np.float64).reshape(-1, 3)
        planted += len(truth)
        d = np.linalg.norm(centres[:, None, :] - truth[None, :, :], axis=2)  # findings × planted
        if d.size:
            hit = d.min(axis=0) <= tol_mm
            found += int(hit.sum())
            errors += [float(v) for v in d.min(axis=0)[hit]]
            false_pos += int((d.min(axis=1) > tol_mm).sum())
        else:
            false_pos += len(centres)
    return {"found": f"{found}/{planted}", "false_positives": false_pos,
            "centre_error_mm_mean": round(float(np.mean(errors)), 3) if errors else None,
            "centre_error_mm_max": round(float(np.max(errors)), 3) if errors else None}


class GpuBusy:
    """The GPU's busy share while a block runs: ``nvidia-smi`` utilization sampled every 100 ms."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._proc = None

    def __enter__(self) -> "GpuBusy":
        import subprocess

        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                           "-lms", "100"], stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._proc is None:
            return
        self._proc.terminate()
        out, _ = self._proc.communicate(timeout=10)
        self.samples = [float(v) for line in out.splitlines() for v in line.split(",")[:1] if v.strip()]

    @property
    def share(self) -> float | None:
        return round(sum(self.samples) / (100.0 * len(self.samples)), 3) if self.samples else None


def read_findings(lake_root: Path) -> dict[str, list[list[float]]]:
    """Finding centres (LPS mm) per series of the committed findings partition."""
    part = LakePaths(lake_root).findings("ct_nodule", AS_OF)
    files = [str(p) for p in sorted(part.glob("*.parquet"))]
    out: dict[str, list[list[float]]] = {}
    for f in (pq.read_table(files, partitioning=None).to_pylist() if files else []):
        out.setdefault(f["series_key"], []).append([f["centre_x_mm"], f["centre_y_mm"], f["centre_z_mm"]])
    return out


def compare_findings(ref: dict[str, list[list[float]]], cand: dict[str, list[list[float]]],
                     tol_mm: float = 1.0) -> dict[str, Any]:
    """Same number of findings per series, and each candidate finding within ``tol_mm`` of a reference one."""
    counts_equal = all(len(ref.get(k, [])) == len(cand.get(k, [])) for k in set(ref) | set(cand))
    worst = 0.0
    for k, centres in cand.items():
        r = np.asarray(ref.get(k, []), dtype=np.float64).reshape(-1, 3)
        for c in centres:
            d = float(np.linalg.norm(r - np.asarray(c), axis=1).min()) if len(r) else float("inf")
            worst = max(worst, d)
    return {"findings_reference": sum(map(len, ref.values())), "findings_candidate": sum(map(len, cand.values())),
            "counts_equal_per_series": counts_equal, "max_position_delta_mm": round(worst, 4),
            "passed": counts_equal and worst <= tol_mm, "tolerance_mm": tol_mm}


def run_pipeline(settings: Settings, precision: str, recs: list[dict[str, Any]],
                 imaging: dict[str, Any] | None = None) -> dict[str, Any]:
    """Score every series with ``precision`` (building and gating its engine first when needed) and the
    ``imaging`` settings changed as given (variants: stride, crop)."""
    from engines import cache
    from inference import ct

    settings = settings.model_copy(update={
        "engines": settings.engines.model_copy(update={"precision": precision}),
        "imaging": settings.imaging.model_validate({**settings.imaging.model_dump(), **(imaging or {})})})
    gate = None
    if precision != "fp32" or settings.engines.backend not in ("auto", "onnxruntime"):
        t0 = time.perf_counter()
        plan = cache.ensure(settings, "ct_nodule", settings.engines.backend, precision)
        meta = cache.read_metadata(plan)
        gate = {"passed": meta["gate"].get("passed"), "metrics": meta["gate"].get("metrics"),
                "failures": meta["gate"].get("failures"), "ensure_s": round(time.perf_counter() - t0, 2)}
        log(f"{precision} engine {meta['fingerprint']}: gate {'passed' if gate['passed'] else 'FAILED'}")
    with GpuBusy() as busy:
        run_dir = ct.score(settings, AS_OF, full=True)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    log(f"pipeline {precision}: {metrics['volumes_per_min']} volumes/min, {metrics['findings']} findings")
    stage = dict(metrics["stage_s"])
    match = nodule_match(settings.lake.root, recs)
    return {"precision": precision, "imaging": imaging or {},
            "engine_fingerprints": manifest["engine_fingerprints"], "gate": gate,
            "volumes_per_min": metrics["volumes_per_min"], "pipeline_s": metrics["pipeline_s"],
            "stage_s": stage, "gpu_busy_share": busy.share, "use_gpu": metrics["use_gpu"],
            "num_actors": metrics["num_actors"], "batch_patches": metrics["batch_patches"],
            "max_batch_patches": metrics.get("max_batch_patches"),
            "series_on_gpu_arrays": metrics.get("series_on_gpu_arrays"),
            "patches": metrics["patches"], "findings": metrics["findings"],
            "planted_nodules_found": match["found"], "false_positives": match["false_positives"],
            "centre_error_mm_mean": match["centre_error_mm_mean"], "centre_error_mm_max": match["centre_error_mm_max"],
            "centres": read_findings(settings.lake.root)}


def device_vs_host(settings: Settings, rec: dict[str, Any]) -> dict[str, Any] | None:
    """One series segmented by the same fp32 engine on the device path (CuPy) and on the host path (numpy):
    the largest probability difference and the findings of each (None where there is no device path)."""
    from engines.source import ReferenceEngine
    from inference.ct import _card_patch_check
    from engines.model_card import load_card
    from inference.ct_stages import SegmentSeries, body_crop
    from preprocessing.components import find_components
    from preprocessing.ct_chain import model_input

    im = settings.imaging
    opt, top = _card_patch_check(load_card(settings, "ct_nodule"), settings)
    actor = SegmentSeries(ReferenceEngine(settings, "ct_nodule"), "fp32", tuple(im.patch_size),
                          tuple(im.patch_stride), opt, top)
    try:
        if not actor.on_device:
            return None
        prepared = model_input(im.target_spacing_mm, im.window_hu, im.gantry_tilt, im.min_slices,
                               crop=body_crop(im))(rec["files"])
        out = {}
        for where in ("gpu", "host"):
            actor.on_device = where == "gpu"
            t: dict[str, float] = {}
            t0 = time.perf_counter()
            prob, used = actor.segment(prepared.image, t)
            found = find_components(prob, prepared.volume.spacing_mm, prepared.volume.affine_zyx_to_lps,
                                    im.probability_threshold, im.min_finding_volume_mm3).findings
            out[where] = {"prob": prob, "arrays_on": used, "s": round(time.perf_counter() - t0, 3),
                          "timings": {k: round(v, 4) for k, v in t.items()},
                          "centres": [list(f.centre_lps_mm) for f in found]}
        d = np.abs(out["gpu"].pop("prob").astype(np.float32) - out["host"].pop("prob").astype(np.float32))
        return {"max_abs_delta_p": float(d.max()), "engine": actor.fingerprint, **out}
    finally:
        actor.close()


# --- main ------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="one 512x512x120 series over a small (205 mm) field of view: minutes on a CPU")
    p.add_argument("--series", type=int, default=3, help="series to score (full mode; slices 120..300)")
    p.add_argument("--small", action="store_true",
                   help="--series series of 256x256 slices over a 205 mm field of view, 100..140 slices of 1 mm "
                        "(the planted-nodule sets a CPU can score in minutes)")
    p.add_argument("--precisions", default="fp32",
                   help="comma-separated engine precisions to run the pipeline with (fp32 first: the reference)")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--workdir", default=None, help="scratch directory (default: a temporary one, removed)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes writing the series")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--variants", default=None,
                   help="JSON list of imaging settings to score with beside the configured ones, e.g. "
                        "'[{\"patch_stride\": [32, 64, 64], \"crop_to_body\": false}]': findings of each "
                        "against the planted nodules and against the first pipeline (first precision)")
    p.add_argument("--only-variants", action="store_true", help="skip the device-vs-host comparison")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    precisions = [v.strip() for v in args.precisions.split(",") if v.strip()]

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="medscreen-bench-ct-"))
    try:
        if args.quick:
            slices, rows, pixel_mm, slice_mm = [120], 512, 0.4, 1.0
        elif args.small:
            slices = [int(v) for v in np.linspace(100, 140, max(args.series, 1)).round()]
            rows, pixel_mm, slice_mm = 256, 0.8, 1.0
        else:
            slices = [int(v) for v in np.linspace(120, 300, max(args.series, 1)).round()]
            rows, pixel_mm, slice_mm = 512, 0.7, 1.25
        t0 = time.perf_counter()
        recs = write_series_set(work / "dicom", slices, rows, pixel_mm, slice_mm, workers=args.workers)
        log(f"generated {len(recs)} series in {time.perf_counter() - t0:.0f}s")
        lake = work / "lake"
        commit_index(lake, recs)
        settings = load_settings({"lake.root": str(lake), "ray.address": args.ray_address,
                                  "engines.cache_dir": str(work / "engines")})

        import ray

        from inference.actors import ray_session

        with ray_session(settings):  # one Ray for every pipeline run below
            runs = [run_pipeline(settings, prec, recs) for prec in precisions]
            variants = [run_pipeline(settings, precisions[0], recs, v) for v in json.loads(args.variants or "[]")]
            ray_resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
        paths_compared = None if args.only_variants else device_vs_host(settings, recs[0])
        baseline = None if args.skip_baseline else run_baseline(settings, recs)
        if baseline:
            log(f"baseline ({baseline['name']}): {baseline['volumes_per_min']} volumes/min")
        first = runs[0]
        comparisons = {f"{r['precision']}_vs_{first['precision']}": compare_findings(first["centres"], r["centres"])
                       for r in runs[1:]}
        h2d = h2d_seconds(settings, first["batch_patches"])
        variant_vs_first = [{"imaging": v["imaging"], **compare_findings(first["centres"], v["centres"])}
                            for v in variants]
        for r in runs + variants:
            r.pop("centres")
        best = max(runs, key=lambda r: r["volumes_per_min"] or 0.0)
        result = {
            "benchmark": "ct_scoring",
            "device": "gpu" if first["use_gpu"] else "cpu",
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "ray": ray_resources},
            "series": len(recs), "slices": slices, "rows": rows, "pixel_mm": pixel_mm, "slice_mm": slice_mm,
            "pipelines": runs,
            "comparisons": comparisons,
            "imaging": settings.imaging.model_dump(include={"patch_size", "patch_stride", "crop_to_body",
                                                            "body_threshold_hu", "body_margin_mm"}),
            "variants": variants, "variants_vs_first": variant_vs_first,
            "device_vs_host_path": paths_compared,
            "volumes_per_min": best["volumes_per_min"], "best_precision": best["precision"],
            "engine_fingerprints": best["engine_fingerprints"],
            "h2d_s_per_host_batch": round(h2d, 5) if h2d is not None else None,
            "stage_note": "stage times are summed over series (tasks and actors overlap); on the GPU path "
                          "patch_s includes the volume's one host→device copy and engine_s runs on device "
                          "memory; stitch_s includes the float16 copy back",
            "baseline": baseline,
            "baseline_volumes_per_min": baseline["volumes_per_min"] if baseline else None,
            "speedup_vs_baseline": round(best["volumes_per_min"] / baseline["volumes_per_min"], 3)
            if baseline and baseline["volumes_per_min"] else None,
        }
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
