"""``medscreen worklist`` — per patient, the flagged risk heads and open CT findings for one as-of date."""
from __future__ import annotations

import argparse
import json

from medscreen.cli_common import add_as_of_flag, add_lake_flag, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worklist", help="screening list + CT findings per patient → LAKE/worklist/as_of=D")
    add_lake_flag(p)
    add_as_of_flag(p)
    p.set_defaults(func=_worklist)


def _worklist(args: argparse.Namespace) -> int:
    from inference import worklist

    settings = settings_from_args(args)
    final, counts = worklist.build(settings.lake.root, args.as_of, pseudonym=settings.pseudonym)
    print(json.dumps({"output": str(final), **counts}, indent=2, sort_keys=True))
    return 0
