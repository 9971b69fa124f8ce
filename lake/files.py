"""File primitives of the lake: atomic writes (temp file + rename) and streamed file hashes.

Every JSON sidecar, pointer, manifest and state file of the pipeline is
written through :func:`write_json_atomic`, so a reader sees the old file or
the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a hidden temp file beside it and rename(2) it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: Path, data: Any, *, indent: int | None = 2) -> Path:
    """Write ``data`` as sorted-key JSON atomically (values JSON cannot hold are written as str)."""
    return write_bytes_atomic(path, json.dumps(data, indent=indent, sort_keys=True, default=str).encode())


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB chunks (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
