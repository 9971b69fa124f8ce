"""Flags every command shares, and turning them into validated settings."""
from __future__ import annotations

import argparse
from typing import Any

from conf.settings import Settings, load_settings


def add_lake_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lake", help="lake root (default: lake.root from config / MEDSCREEN_LAKE__ROOT)")


def add_spark_master_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spark-master", dest="spark_master", metavar="URL",
                   help="Spark master, e.g. spark://host:7077 or local[4] "
                        "(default: spark.master from config / MEDSCREEN_SPARK__MASTER)")


def add_as_of_flag(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--as-of", dest="as_of", required=required, help="as-of date, YYYY-MM-DD (UTC)")


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> Settings:
    """Settings with CLI flags winning over the environment and conf/ (None = flag not given)."""
    merged: dict[str, Any] = {"lake.root": getattr(args, "lake", None),
                              "spark.master": getattr(args, "spark_master", None)}
    merged.update(overrides)
    return load_settings(merged)
