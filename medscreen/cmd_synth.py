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

    c = s.add_parser("ct", help="synthetic DICOM CT studies with planted nodules + ground_truth.json",
                     description="Each study folder mixes an axial chest series (in-plane 0.6-0.9 mm), a "
                                 "localizer, in the first study a 5 mm RLE Lossless series, and four "
                                 "broken files, under shuffled file names.")
    c.add_argument("--studies", type=int, default=3)
    c.add_argument("--seed", type=int, default=7)
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--rows", type=int, default=512, help="square matrix size of every series (>= 16)")
    c.add_argument("--slices", type=int, default=100, help="slices of the axial series (>= 4)")
    c.add_argument("--slice-spacing", type=float, dest="slice_spacing_mm", metavar="MM",
                   help="axial slice spacing in mm, e.g. 0.625 to 5 (default: 2 or 2.5, drawn per study)")
    c.add_argument("--variable-spacing", action="store_true",
                   help="add a series with a fine middle third and 4x coarser slices above and below")
    c.add_argument("--gantry-tilt", action="store_true", help="add a series tilted 15 degrees")
    c.add_argument("--emr", type=Path, dest="emr_dir", metavar="DIR",
                   help="a synthetic EMR export (medscreen synth emr): each study images one of its "
                        "patients, DICOM PatientID = the patient's MRN, so EMR and CT link")
    c.add_argument("--no-broken-files", dest="broken_files", action="store_false",
                   help="leave out the truncated and non-DICOM files planted beside each study")
    c.set_defaults(func=_ct)


def _emr(args: argparse.Namespace) -> int:
    from synth.emr import generate

    summary = generate(args.out, patients=args.patients, seed=args.seed,
                       bad_share=args.bad_share, fmt=args.format)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _ct(args: argparse.Namespace) -> int:
    from synth.ct import generate

    summary = generate(args.out, studies=args.studies, seed=args.seed, rows=args.rows, slices=args.slices,
                       slice_spacing_mm=args.slice_spacing_mm, variable_spacing=args.variable_spacing,
                       gantry_tilt=args.gantry_tilt, broken_files=args.broken_files,
                       emr_dir=args.emr_dir)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
