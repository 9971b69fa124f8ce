"""``medscreen emr ingest|features`` — the Spark EMR jobs, run in-process on the configured master."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medscreen.cli_common import add_as_of_flag, add_lake_flag, add_spark_master_flag, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("emr", help="EMR ingest and point-in-time features (Spark)")
    s = p.add_subparsers(dest="emr_command", required=True)

    i = s.add_parser("ingest", help="raw FHIR Bulk NDJSON / OMOP CDM → LAKE/emr/events + quarantine")
    i.add_argument("--input", type=Path, help="export directory (default: inputs.emr_dir)")
    i.add_argument("--format", choices=["fhir", "omop"], help="default: inputs.emr_format")
    add_lake_flag(i)
    add_spark_master_flag(i)
    i.set_defaults(func=_ingest)

    f = s.add_parser("features", help="point-in-time timelines → LAKE/emr/timelines/as_of=D")
    add_lake_flag(f)
    add_as_of_flag(f)
    add_spark_master_flag(f)
    f.add_argument("--with-labels", action="store_true",
                   help="add label_t2d/ckd/hf from (as-of, as-of + horizon]")
    f.set_defaults(func=_features)


def _ingest(args: argparse.Namespace) -> int:
    settings = settings_from_args(args, **{"inputs.emr_dir": args.input, "inputs.emr_format": args.format})
    from jobs import emr_ingest

    if settings.inputs.emr_dir is None:
        raise ValueError("no EMR input: pass --input DIR or set MEDSCREEN_INPUTS__EMR_DIR")
    summary = emr_ingest.run(settings, settings.inputs.emr_dir, settings.inputs.emr_format)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _features(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    from jobs import emr_features

    summary = emr_features.run(settings, args.as_of, with_labels=args.with_labels)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0
