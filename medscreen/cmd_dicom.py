"""``medscreen dicom index|link|list|export`` — the DICOM index and its EMR patient link (Spark),
and NIfTI export of indexed series."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medscreen.cli_common import add_lake_flag, add_spark_master_flag, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dicom", help="DICOM index (Spark, headers only) and NIfTI export")
    s = p.add_subparsers(dest="dicom_command", required=True)

    i = s.add_parser("index", help="raw DICOM folders → LAKE/imaging/{instances,series,quarantine}")
    i.add_argument("--input", type=Path, help="DICOM folder (default: inputs.dicom_dir)")
    i.add_argument("--run-id", help="run id (default: a new one)")
    add_lake_flag(i)
    add_spark_master_flag(i)
    i.set_defaults(func=_index)

    lk = s.add_parser("link", help="LAKE/imaging/series + emr/patients → LAKE/imaging/patient_link "
                                   "(series → EMR patient by keyed MRN)")
    lk.add_argument("--run-id", help="run id (default: a new one)")
    add_lake_flag(lk)
    add_spark_master_flag(lk)
    lk.set_defaults(func=_link)

    ls = s.add_parser("list", help="indexed series: key, verdict, slices, spacing")
    add_lake_flag(ls)
    ls.add_argument("--eligible", action="store_true", help="eligible series only")
    ls.set_defaults(func=_list)

    e = s.add_parser("export", help="one indexed series → NIfTI (raw scanner grid or resampled)")
    add_lake_flag(e)
    e.add_argument("--series-key", required=True, help="series_key from the index")
    e.add_argument("--out", type=Path, required=True, help="output .nii or .nii.gz")
    e.add_argument("--stage", choices=["raw", "resampled"], default="raw")
    e.set_defaults(func=_export)


def _index(args: argparse.Namespace) -> int:
    from jobs import dicom_index

    settings = settings_from_args(args, **{"inputs.dicom_dir": args.input})
    if settings.inputs.dicom_dir is None:
        raise ValueError("no DICOM input: pass --input DIR or set MEDSCREEN_INPUTS__DICOM_DIR")
    summary = dicom_index.run(settings, Path(settings.inputs.dicom_dir), run_id=args.run_id)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _link(args: argparse.Namespace) -> int:
    from jobs import imaging_link

    summary = imaging_link.run(settings_from_args(args), run_id=args.run_id)
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def _list(args: argparse.Namespace) -> int:
    from preprocessing.imaging_index import read_series_table

    settings = settings_from_args(args)
    cols = ["series_key", "verdict", "slice_count", "rows", "cols", "spacing_median_mm", "manufacturer"]
    for r in read_series_table(settings.lake.root, eligible_only=args.eligible).select(cols).to_pylist():
        print(json.dumps(r, default=str))
    return 0


def _export(args: argparse.Namespace) -> int:
    from medscreen.ct_export import export_series

    settings = settings_from_args(args)
    print(json.dumps(export_series(settings, args.series_key, args.out, args.stage), indent=2, default=str))
    return 0
