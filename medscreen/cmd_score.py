"""``medscreen score emr|ct`` — Ray scoring; prints the run directory as the last line."""
from __future__ import annotations

import argparse

from medscreen.cli_common import add_as_of_flag, add_lake_flag, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score timelines or CT series with a gated engine (Ray)")
    s = p.add_subparsers(dest="score_command", required=True)
    for name, helptext in (("emr", "EMR risk scores + screening list"),
                           ("ct", "CT nodule findings")):
        c = s.add_parser(name, help=helptext)
        add_lake_flag(c)
        add_as_of_flag(c)
        c.add_argument("--ray-address", help="Ray cluster address (default: ray.address; local Ray when unset)")
        c.add_argument("--backend", choices=["auto", "onnxruntime", "tensorrt", "inductor"])
        c.add_argument("--precision", choices=["fp32", "fp16", "int8"])
        c.add_argument("--force-ungated", action="store_true",
                       help="score with an engine that has not passed its accuracy gate")
        c.add_argument("--limit", type=_positive_int, metavar="N",
                       help="smoke runs: score only the first N timelines in plan order" if name == "emr"
                       else "smoke runs: score at most N eligible series, the first by series_key")
        if name == "emr":
            c.add_argument("--no-drift-check", dest="drift_check", action="store_const", const=False,
                           help="skip the PSI check against the previous as-of's scores "
                                "(scoring.qc.drift_check; for dates that are not consecutive nights)")
            c.add_argument("--run-id", dest="run_id", metavar="RUN_ID",
                           help="run id to use; resumes the stopped run RUN_ID (named in its error): "
                                "fragments it finished are kept, only the rest are scored; the same "
                                "as-of date and engine settings as the stopped run are required")
        else:
            c.add_argument("--run-id", dest="run_id", metavar="RUN_ID",
                           help="run id to use (an orchestrator's retry passes the same one)")
            c.add_argument("--full", action="store_true",
                           help="re-score every selected series; by default series whose files, engine "
                                "and settings are unchanged since an earlier run reuse its result")
        c.add_argument("--lock-wait-s", type=float, default=0.0, metavar="S",
                       help="wait up to S seconds for another writer of the same partitions "
                            "(default: fail at once, naming it)")
        c.set_defaults(func=_emr if name == "emr" else _ct)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _settings(args: argparse.Namespace):
    return settings_from_args(args, **{"ray.address": args.ray_address,
                                       "engines.backend": args.backend,
                                       "engines.precision": args.precision,
                                       "scoring.qc.drift_check": getattr(args, "drift_check", None)})


def _emr(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from inference import emr
    from medscreen.fault_injection import sigkill_after_fragments

    run_dir = emr.score(settings, args.as_of, force_ungated=args.force_ungated, run_id=args.run_id,
                        limit=args.limit, lock_wait_s=args.lock_wait_s,
                        on_fragment_done=sigkill_after_fragments())
    print(run_dir)
    return 0


def _ct(args: argparse.Namespace) -> int:
    settings = _settings(args)
    from inference import ct

    run_dir = ct.score(settings, args.as_of, force_ungated=args.force_ungated, run_id=args.run_id,
                       limit=args.limit, full=args.full, lock_wait_s=args.lock_wait_s)
    print(run_dir)
    return 0
