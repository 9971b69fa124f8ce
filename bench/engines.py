"""Engine throughput: rows/s per backend × precision × batch size, against PyTorch eager fp32.

    python bench/engines.py [--quick] [--batches 1,64,256,2048] [--max-seconds S]

Runs unchanged on a CPU machine (ONNX Runtime CPU EP vs torch eager on CPU) and
on a GPU machine (it detects CUDA: ORT CUDA EP with I/O binding, TensorRT when
`tensorrt`/`tensorrt_rtx` and cuda-python are installed and can execute there,
the inductor plan (torch.export + Inductor kernels, CUDA graphs per shape) where
torch is installed, torch eager on CUDA as the baseline). Every number names the engine that
produced it; a configuration that cannot run is recorded with its reason, not
fatal. The last line printed is one JSON object.

The feeds follow the model card's contract: ``seq`` defaults to the card's
optimisation-profile ``opt`` (the observed 95th-percentile timeline length),
tokens drawn from the card's vocabulary. int8 plans are calibrated on
those synthetic feeds (timing only; the accuracy gate uses real lake data).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASELINE = "torch-eager-fp32"


def make_feed(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, seq // 4), seq + 1, batch)
    tokens = rng.integers(3, vocab, (batch, seq)).astype(np.int64)
    tokens[np.arange(seq)[None, :] >= lengths[:, None]] = 0
    days = np.where(tokens > 0, rng.integers(0, 1825, (batch, seq)), 0).astype(np.float32)
    return {"tokens": tokens, "days_before": days,
            "age_years": rng.uniform(18, 95, batch).astype(np.float32),
            "sex": rng.integers(0, 3, batch).astype(np.int64)}


def measure(fn: Callable[[], Any], budget_s: float, max_iters: int = 200) -> dict[str, float]:
    """Warm up once, then time calls until the budget or ``max_iters``; median latency."""
    fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < max_iters and (len(times) < 3 or time.perf_counter() < deadline):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"latency_ms_p50": float(np.median(times) * 1e3), "iters": len(times)}


def torch_engine(card: dict[str, Any], device: str) -> tuple[Callable, dict[str, Any]] | None:
    """PyTorch eager fp32 of the same model (weights from the card's state dict when present)."""
    try:
        import torch

        from models.emr_risk.model import EmrRiskModel, ModelConfig
    except ImportError:
        return None
    arch = dict(card["architecture"])
    model = EmrRiskModel(ModelConfig(**arch))
    weights = "random (same architecture; timing only)"
    state = (card.get("torch") or {}).get("state_dict")
    if state:
        path = Path(state) if Path(state).is_absolute() else REPO / state
        if path.is_file():
            model.load_state_dict(torch.load(path, map_location="cpu"))
            weights = "trained (card state_dict)"
    model = model.to(device).eval()
    torch.set_num_threads(os.cpu_count() or 1)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            args = [torch.from_numpy(feed[k]).to(device) for k in ("tokens", "days_before", "age_years", "sex")]
            out = model(*args)
            return out.cpu().numpy()

    return run, {"weights": weights, "torch_version": torch.__version__, "device": device}


def ort_cuda_graph_engine(plan: Path, feed_shapes: dict[str, np.ndarray]) -> tuple[Callable, dict[str, Any]]:
    """ONNX Runtime CUDA EP with a captured CUDA graph for one fixed feed shape.

    Inputs and output live in device OrtValues bound once; each call copies the
    new feed into them in place and replays the graph, so per-call host work is
    a few memcpys instead of one kernel launch per op. Fails (recorded, not
    fatal) when the model has nodes ORT places on the CPU, which graph capture
    refuses.
    """
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(plan), sess_options=opts,
                                providers=[("CUDAExecutionProvider", {"enable_cuda_graph": "1"})])
    types = {a.name: a.type for a in sess.get_inputs()}
    inputs, dtypes = {}, {}
    for name, arr in feed_shapes.items():
        dtypes[name] = np.int64 if "int64" in types[name] else np.float32
        inputs[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, dtype=dtypes[name]), "cuda", 0)
    out_meta = sess.get_outputs()[0]
    batch = next(iter(feed_shapes.values())).shape[0]
    shape = [batch if not isinstance(d, int) else d for d in out_meta.shape]
    output = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cuda", 0)
    binding = sess.io_binding()
    for name, value in inputs.items():
        binding.bind_ortvalue_input(name, value)
    binding.bind_ortvalue_output(out_meta.name, output)
    sess.run_with_iobinding(binding)  # the first run captures the graph

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        for name, value in inputs.items():
            value.update_inplace(np.ascontiguousarray(feed[name], dtype=dtypes[name]))
        sess.run_with_iobinding(binding)
        return output.numpy()

    return run, {"backend": "onnxruntime", "providers": sess.get_providers(), "io_binding": True,
                 "cuda_graph": True, "fixed_shape": {k: list(v.shape) for k, v in feed_shapes.items()}}


def inductor_engine(tmp: Path, precision: str, batch_sizes: list[int], seq: int, compile_mode: str = "per_shape"
                    ) -> tuple[Callable, dict[str, Any]]:
    """The engine cache's inductor plan (torch.export program + Mega-Cache), compiled for the bench shapes.

    Built through the cache (its fingerprint is the one scoring would carry) with one scoring shape,
    (max batch, seq); the runner then compiles every bench batch size at ``seq`` — the exported
    program is shape-independent, each shape is its own compiled graph (and CUDA graph on a GPU);
    ``compile_mode`` dynamic: one compile with symbolic shapes serves them all (engines.inductor_compile).
    """
    from conf.settings import load_settings
    from engines import cache
    from engines.inductor_runner import InductorRunner

    settings = load_settings({"engines.cache_dir": str(tmp / "engines"), "scoring.length_buckets": [seq],
                              "scoring.token_budget": max(batch_sizes) * seq, "engines.inductor_compile": compile_mode})
    t0 = time.perf_counter()
    plan = cache.build(settings, backend="inductor", precision=precision)
    build_s = time.perf_counter() - t0
    meta = cache.read_metadata(plan)
    runner = InductorRunner(plan, cache.compile_cache_path(plan), [(b, seq) for b in batch_sizes],
                            name=f"inductor-{precision}:{meta['fingerprint']}", compile_threads=meta.get("compile_threads"),
                            compile_mode=compile_mode)
    t0 = time.perf_counter()
    runner.activate()
    return (lambda feed: runner.infer(feed)["probs"]), {
        "backend": "inductor", "fingerprint": meta["fingerprint"], "torch_version": meta["backend_version"],
        "platform": meta["platform"]["id"], "build_s": round(build_s, 1),
        "activate_s": round(time.perf_counter() - t0, 1), **runner.describe()}


def main(argv: list[str] | None = None) -> int:
    from conf.settings import load_settings
    from engines import hardware, precision
    from engines.model_card import load_card, profiles
    from engines.ort_runner import OrtRunner, available_providers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short budgets, batches 1/64/256")
    p.add_argument("--batches", help="comma-separated batch sizes (default 1,64,256,2048)")
    p.add_argument("--seq", type=int, help="sequence length (default: the card's profile opt)")
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--budget-s", type=float, help="seconds per configuration (default 2, quick 0.3)")
    p.add_argument("--max-seconds", type=float, help="whole-run bound (default 900, quick 180)")
    p.add_argument("--model", default="emr_risk")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the ORT CUDA-graph variants (GPU only)")
    p.add_argument("--no-fused", action="store_true", help="skip the card's fused contrib-op graphs")
    p.add_argument("--eps", default="cuda,cpu", help="ONNX Runtime execution providers to time (cuda, cpu)")
    p.add_argument("--no-inductor", action="store_true", help="skip the inductor engines (torch.export + Inductor)")
    p.add_argument("--inductor-compile", default="per_shape",
                   help="comma-separated engines.inductor_compile modes to time (per_shape, dynamic)")
    args = p.parse_args(argv)
    started = time.perf_counter()
    budget = args.budget_s or (0.3 if args.quick else 2.0)
    max_seconds = args.max_seconds or (180.0 if args.quick else 900.0)
    batch_sizes = [int(b) for b in (args.batches or ("1,64,256" if args.quick else "1,64,256,2048")).split(",")]
    precisions = args.precisions.split(",")

    settings = load_settings({})
    card = load_card(settings, args.model)
    seq = args.seq or profiles(card)["seq"]["opt"]
    vocab = int(card["vocab"]["size"])
    gpu = hardware.gpu_info()
    providers = available_providers()
    cuda_ep = "CUDAExecutionProvider" in providers and gpu is not None

    results: list[dict[str, Any]] = []
    engines: dict[str, tuple[Callable, dict[str, Any]]] = {}
    errors: dict[str, str] = {}
    graph_info: dict[str, dict[str, Any]] = {}

    def add(name: str, build: Callable[[], tuple[Callable, dict[str, Any]]]) -> None:
        try:
            engines[name] = build()
        except Exception as exc:  # one engine failing must not lose the others' numbers
            errors[name] = f"{type(exc).__name__}: {exc}"[:500]

    try:
        import torch

        torch_cuda = torch.cuda.is_available()
    except ImportError:
        torch_cuda = False
    baseline = torch_engine(card, "cuda" if torch_cuda else "cpu")
    if baseline is not None:
        engines[BASELINE] = baseline  # first: every other engine's outputs are compared to it
    else:
        errors[BASELINE] = "torch is not installed (pip install 'medscreen[train]')"

    tmp = Path(tempfile.mkdtemp(prefix="medscreen-bench-engines-"))
    onnx_file = Path(card["onnx"]["file"])
    calib = [make_feed(64, seq, vocab, seed=s) for s in range(4)]
    plans: dict[str, Path] = {}
    for prec in precisions:
        try:
            plans[prec] = precision.make_plan(onnx_file, tmp / f"{prec}.onnx", prec, calib,
                                              settings.engines.calibration_method)
        except Exception as exc:
            errors[f"plan-{prec}"] = f"{type(exc).__name__}: {exc}"[:500]

    # The card's fused graphs (models/emr_risk/export_fused.py: ORT contrib attention,
    # SkipLayerNorm, BiasGelu), exported from the same trained weights.
    if not args.no_fused:
        for prec, entry in ((card.get("fused_onnx") or {}).get("graphs") or {}).items():
            if prec in precisions:
                plans[f"fused-{prec}"] = Path(entry["file"])

    eps = [("cpu", ["CPUExecutionProvider"])] if "cpu" in args.eps.split(",") else []
    if cuda_ep and "cuda" in args.eps.split(","):
        eps.insert(0, ("cuda", ["CUDAExecutionProvider", "CPUExecutionProvider"]))
    for ep_name, ep in eps:
        for prec, plan in plans.items():
            def build(plan=plan, ep=ep, prec=prec):
                r = OrtRunner(plan, providers=ep, fp16_plan=prec == "fp16")
                r.activate()
                return (lambda feed, r=r: r.infer(feed)["probs"]), {
                    "backend": "onnxruntime", "providers": r.active_providers,
                    "io_binding": r.active_providers[0] == "CUDAExecutionProvider"}
            add(f"onnxruntime-{ep_name}-{prec}", build)

    if not args.no_inductor:
        for prec in (p for p in precisions if p in ("fp32", "fp16")):
            for mode in args.inductor_compile.split(","):
                suffix = "" if mode == "per_shape" else f"-{mode}"
                add(f"inductor-{prec}{suffix}",
                    lambda prec=prec, mode=mode: inductor_engine(tmp, prec, batch_sizes, seq, mode))

    from engines.trt_runner import execution_blocker

    try:
        from engines.trt_builder import build_plan, import_tensorrt

        trt_module = import_tensorrt().__name__
        blocker = execution_blocker(trt_module)
    except Exception as exc:
        trt_module, blocker = None, str(exc)
    if blocker is None:
        from engines.trt_runner import TrtRunner

        prof = profiles(card)
        prof = {"batch": {"min": 1, "opt": max(batch_sizes), "max": max(max(batch_sizes), prof["batch"]["max"])},
                "seq": {"min": 1, "opt": seq, "max": max(seq, prof["seq"]["max"])}}
        for prec, plan in plans.items():
            def build_trt(plan=plan, prec=prec):
                data, info = build_plan(plan, prof, trt_module)
                path = tmp / f"trt-{prec}.plan"
                path.write_bytes(data)
                r = TrtRunner(path, trt_module)
                r.activate()
                return (lambda feed, r=r: r.infer(feed)["probs"]), {
                    "backend": "tensorrt", "module": info["backend_module"],
                    "version": info["backend_version"]}
            add(f"tensorrt-{prec}", build_trt)
    else:
        errors["tensorrt"] = f"not run: {blocker}"

    for batch in batch_sizes:
        feed = make_feed(batch, seq, vocab, seed=batch)
        reference = None
        for name, (fn, _) in engines.items():
            row: dict[str, Any] = {"engine": name, "batch": batch, "seq": seq}
            if time.perf_counter() - started > max_seconds:
                row["skipped"] = f"run bound {max_seconds:.0f}s reached"
                results.append(row)
                continue
            try:
                out = fn(feed)
                m = measure(lambda: fn(feed), budget)
                row.update(m)
                row["rows_per_s"] = batch / (m["latency_ms_p50"] / 1e3)
                reference = out if reference is None else reference
                # vs the baseline's probabilities (or the first engine's when torch is absent)
                row["max_abs_diff_vs_reference"] = float(np.max(np.abs(out - reference)))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.append(row)
        # CUDA graphs are captured per shape, so these engines are built per batch size.
        for prec, plan in (plans.items() if cuda_ep and not args.no_cuda_graph else []):
            name = f"onnxruntime-cuda-{prec}-graph"
            row = {"engine": name, "batch": batch, "seq": seq}
            try:
                fn, info = ort_cuda_graph_engine(plan, feed)
                graph_info[name] = info
                out = fn(feed)
                m = measure(lambda: fn(feed), budget)
                row.update(m)
                row["rows_per_s"] = batch / (m["latency_ms_p50"] / 1e3)
                if reference is not None:
                    row["max_abs_diff_vs_reference"] = float(np.max(np.abs(out - reference)))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            results.append(row)

    base = {r["batch"]: r.get("rows_per_s") for r in results if r["engine"] == BASELINE}
    for r in results:
        if r.get("rows_per_s") and base.get(r["batch"]):
            r["speedup_vs_baseline"] = r["rows_per_s"] / base[r["batch"]]
    best = {}
    for r in results:
        if r.get("rows_per_s") and r["engine"] != BASELINE:
            b = best.get(r["batch"])
            if b is None or r["rows_per_s"] > b["rows_per_s"]:
                best[r["batch"]] = {"engine": r["engine"], "rows_per_s": r["rows_per_s"],
                                    "speedup_vs_baseline": r.get("speedup_vs_baseline")}
    for r in results:
        print(f"{r['engine']:28} batch {r['batch']:5}  "
              + (f"{r['rows_per_s']:12.1f} rows/s  x{r.get('speedup_vs_baseline', float('nan')):.2f}"
                 if r.get("rows_per_s") else r.get("error") or r.get("skipped", "")), file=sys.stderr)
    report = {
        "bench": "engines", "model": card["name"], "model_version": card["version"],
        "baseline": BASELINE, "seq": seq, "budget_s_per_config": budget, "quick": args.quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "gpu": gpu, "ort_providers": providers},
        "engines": {**{k: v[1] for k, v in engines.items()}, **graph_info}, "not_run": errors,
        "results": results, "best_per_batch": best,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
