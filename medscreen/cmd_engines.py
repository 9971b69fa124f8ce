"""``medscreen engines build|gate|inspect|verify|ensure`` — inference engines and their cache.

``build`` and ``ensure`` print the plan path as the last line of stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medscreen.cli_common import add_lake_flag, settings_from_args


def _common(p: argparse.ArgumentParser, engine_flags: bool = True) -> None:
    add_lake_flag(p)
    p.add_argument("--cache", type=Path, help="engine cache directory (default: settings.engine_cache_dir)")
    if engine_flags:
        p.add_argument("--model", default="emr_risk")
        p.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "inductor"])
        p.add_argument("--precision", choices=["fp32", "fp16", "int8"])
        p.add_argument("--as-of", dest="as_of",
                       help="timelines partition for int8 calibration and the gate (labelled)")
        p.add_argument("--calibration-rows", type=int, dest="calibration_rows")
        p.add_argument("--calibration-method", choices=["entropy", "minmax", "percentile"],
                       dest="calibration_method")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("engines", help="build, gate, inspect and verify inference engines")
    s = p.add_subparsers(dest="engines_command", required=True)

    b = s.add_parser("build", help="build a plan (precision-converted ONNX or TensorRT plan), ungated")
    _common(b)
    b.add_argument("--gate", action="store_true", help="run the accuracy gate after building")
    b.set_defaults(func=_build)

    g = s.add_parser("gate", help="run the accuracy gate for a cached plan and record the verdict")
    _common(g)
    g.add_argument("path", nargs="?", type=Path, help="plan path (default: the one the flags name)")
    g.add_argument("--rows", type=int, default=None, help="held-out sample size (default 2000)")
    g.set_defaults(func=_gate)

    i = s.add_parser("inspect", help="print a plan's metadata")
    _common(i, engine_flags=False)
    i.add_argument("path", type=Path)
    i.add_argument("--json", action="store_true", help="full metadata as JSON")
    i.set_defaults(func=_inspect)

    v = s.add_parser("verify", help="check a plan's sha256, backend and platform; non-zero exit on mismatch")
    _common(v, engine_flags=False)
    v.add_argument("path", type=Path)
    v.set_defaults(func=_verify)

    e = s.add_parser("ensure", help="build and gate what is missing or stale (used by the DAGs)")
    _common(e)
    e.add_argument("--rebuild", action="store_true", help="replace a cached plan that fails verification")
    e.set_defaults(func=_ensure)


def _engine_errors(handler):
    """Report TensorRT build/runtime refusals like other input errors: one line, exit 2."""
    import functools

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        from engines.trt_builder import BuildError, TensorRTUnavailable
        from engines.trt_runner import NoCompatibleGPU

        try:
            return handler(args)
        except (BuildError, TensorRTUnavailable, NoCompatibleGPU) as exc:
            print(f"medscreen: error: {exc}", file=sys.stderr)
            return 2

    return run


def _settings(args: argparse.Namespace):
    return settings_from_args(args, **{
        "engines.cache_dir": getattr(args, "cache", None),
        "engines.calibration_rows": getattr(args, "calibration_rows", None),
        "engines.calibration_method": getattr(args, "calibration_method", None)})


@_engine_errors
def _build(args: argparse.Namespace) -> int:
    from engines import cache

    settings = _settings(args)
    path = cache.build(settings, args.model, args.backend, args.precision, args.as_of)
    if args.gate:
        verdict = cache.gate_plan(settings, path, args.as_of)
        print(_verdict_line(verdict), file=sys.stderr)
    print(path)
    return 0


@_engine_errors
def _gate(args: argparse.Namespace) -> int:
    from engines import cache, gate

    settings = _settings(args)
    path = args.path or cache.resolve(settings, args.model, args.backend, args.precision).plan_path
    verdict = cache.gate_plan(settings, path, args.as_of, args.rows or gate.DEFAULT_GATE_ROWS)
    print(json.dumps(verdict, indent=2, sort_keys=True, default=str))
    print(_verdict_line(verdict), file=sys.stderr)
    return 0 if verdict["passed"] else 1


def _verdict_line(verdict: dict) -> str:
    if verdict.get("passed"):
        # "reference" is True for the fp32 reference itself; a candidate's verdict names its reference runner.
        return "gate: PASSED" + (" (reference)" if verdict.get("reference") is True else "")
    return "gate: FAILED: " + "; ".join(verdict.get("failures", []))


def _inspect(args: argparse.Namespace) -> int:
    from engines import cache

    meta = cache.read_metadata(args.path)
    if args.json:
        print(json.dumps(meta, indent=2, sort_keys=True, default=str))
        return 0
    gate = meta.get("gate") or {}
    rows = [("plan", args.path), ("model", f"{meta['model']} {meta['model_version']}"),
            ("backend", f"{meta['backend']} ({meta['backend_module']} {meta['backend_version']})"),
            ("precision", meta["precision"]), ("platform", (meta.get("platform") or {}).get("id")),
            ("onnx_sha256", meta["onnx_sha256"]), ("plan_sha256", meta["plan_sha256"]),
            ("fingerprint", meta["fingerprint"]), ("built_at", meta["built_at"]),
            ("calibration", (meta.get("calibration") or {}).get("sha256")),
            ("gate", {True: "passed", False: "FAILED", None: "not gated"}[gate.get("passed")])]
    for head, m in ((gate.get("metrics") or {}).get("heads") or {}).items():
        rows.append((f"  {head}", ", ".join(f"{k}={v:.4g}" for k, v in m.items()
                                             if isinstance(v, float))))
    for k, v in rows:
        print(f"{k:12} {v}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from engines import cache

    problems = cache.verify(args.path, _settings(args))
    if problems:
        for p in problems:
            print(f"MISMATCH: {p}", file=sys.stderr)
        return 1
    print(f"OK {args.path}")
    return 0


@_engine_errors
def _ensure(args: argparse.Namespace) -> int:
    from engines import cache

    path = cache.ensure(_settings(args), args.model, args.backend, args.precision, args.as_of,
                        rebuild=args.rebuild)
    print(path)
    return 0
