"""``medscreen synth emr|ct`` — deterministic synthetic inputs for demos, tests and benchmarks."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="write synthetic EMR exports or CT studies")
    s = p.add_subparsers(dest="synth_command", required=True)

    e = s.add_parser("emr", help="synthetic FHIR R4 Bulk Data export (or OMOP CDM 5.4 tables)")
    e.add_argument("--patients", type=int, default=1000)
    e.add_argument("--seed", type=int, default=7)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--format", choices=["fhir", "omop"], default="fhir")
    e.add_argument("--bad-share", type=float, default=0.02,
                   help="share of realistically bad records (0 disables)")
    e.set_defaults(func=_emr)

    c = s.add_parser("ct", help="synthetic DICOM CT studies with planted nodules + ground_truth.json")
    c.add_argument("--studies", type=int, default=3)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--out", type=Path, required=True)
    c.set_defaults(func=_ct)


def _emr(args: argparse.Namespace) -> int:
    from medscreen.synth_emr import generate

    summary = generate(args.out, patients=args.patients, seed=args.seed,
                       bad_share=args.bad_share, fmt=args.format)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _ct(args: argparse.Namespace) -> int:
    from medscreen.synth_ct import generate

    summary = generate(args.out, studies=args.studies, seed=args.seed)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
