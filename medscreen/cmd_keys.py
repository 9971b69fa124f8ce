"""``medscreen keys init|fingerprint`` — create the pseudonymisation key once, and say which key a lake has."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medscreen.cli_common import add_lake_flag, settings_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="the pseudonymisation key: create it, show its fingerprint")
    s = p.add_subparsers(dest="keys_command", required=True)

    i = s.add_parser("init", help="create a new random key in a 0600 file (never replaces one)")
    i.add_argument("--key-file", type=Path, required=True,
                   help="where the key goes; point MEDSCREEN_PSEUDONYM__KEY_FILE at it afterwards")
    i.set_defaults(func=_init)

    f = s.add_parser("fingerprint", help="the configured key's fingerprint and the lake's")
    add_lake_flag(f)
    f.set_defaults(func=_fingerprint)


def _init(args: argparse.Namespace) -> int:
    from lake.keys import create_key_file, key_fingerprint, read_key_file

    path = create_key_file(args.key_file)
    print(json.dumps({"key_file": str(path), "mode": "0600",
                      "fingerprint": key_fingerprint(read_key_file(path)),
                      "next": f"export MEDSCREEN_PSEUDONYM__KEY_FILE={path.resolve()}"}, indent=2))
    return 0


def _fingerprint(args: argparse.Namespace) -> int:
    from lake.keys import key_fingerprint, lake_key_fingerprint, load_key

    settings = settings_from_args(args)
    configured = key_fingerprint(load_key(settings.pseudonym))
    lake = lake_key_fingerprint(settings.lake.root)
    print(json.dumps({"configured_key": configured, "lake": str(settings.lake.root), "lake_key": lake,
                      "match": None if lake is None else lake == configured}, indent=2))
    return 0 if lake in (None, configured) else 1
