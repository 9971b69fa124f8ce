"""``medscreen audit phi`` — look for the inputs' patient identifiers in everything the runs wrote."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medscreen.cli_common import settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="privacy audits of a lake")
    s = p.add_subparsers(dest="audit_command", required=True)
    phi = s.add_parser("phi", help="scan a lake (Parquet, JSON, HTML, logs) for the inputs' identifiers; "
                                   "exit 1 on any finding")
    phi.add_argument("--lake", help="lake root (default: lake.root from config / MEDSCREEN_LAKE__ROOT)")
    phi.add_argument("--input", type=Path, nargs="+", required=True, metavar="DIR",
                     help="the raw inputs the runs read: FHIR/OMOP export folders, DICOM archives")
    phi.add_argument("--also", type=Path, nargs="*", default=[], metavar="PATH",
                     help="more outputs to scan: task logs, run summaries (files or folders)")
    phi.add_argument("--json", type=Path, help="also write the result as JSON here (masked identifiers only)")
    phi.set_defaults(func=_phi)


def _phi(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from medscreen.phi_audit import audit, format_table

    settings = settings_from_args(args)
    result = audit(Path(settings.lake.root), args.input, args.also)
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps({**asdict(result), "clean": result.clean}, indent=2))
    return 0 if result.clean else 1
