"""``medscreen`` — one entry point; each command group lives in its own module.

A command module exposes ``register(subparsers)``; heavy imports (Spark, Ray,
ONNX Runtime) happen inside the handlers so ``medscreen --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from conf.settings import ConfigError
from lake.keys import PseudonymKeyError
from lake.locks import PartitionLocked

# Command groups, in help order. Each module registers its own sub-commands.
COMMAND_MODULES = (
    "medscreen.cmd_synth",
    "medscreen.cmd_emr",
    "medscreen.cmd_engines",
    "medscreen.cmd_score",
    "medscreen.cmd_dicom",
    "medscreen.cmd_worklist",
    "medscreen.cmd_demo",
    "medscreen.cmd_keys",
    "medscreen.cmd_audit",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medscreen", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a command group not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our packages log at INFO; libraries only warnings (py4j logs a JVM that
    # has been stopped between stages at INFO on the root logger, with tracebacks).
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for ours in ("medscreen", "conf", "lake", "jobs", "inference", "engines", "preprocessing"):
        logging.getLogger(ours).setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"medscreen: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, PseudonymKeyError) as exc:
        print(f"medscreen: error: {exc}", file=sys.stderr)
        return 2
    except PartitionLocked as exc:
        # Another writer has the partition: say who, exit 75 (EX_TEMPFAIL) so a retry can follow.
        print(f"medscreen: error: {exc}", file=sys.stderr)
        return 75


if __name__ == "__main__":
    sys.exit(main())
