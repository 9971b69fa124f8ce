"""Atomic, idempotent partition commits.

A writer fills a private staging directory beside the target, then
:func:`commit` writes ``manifest.json`` and ``_SUCCESS`` into it and swaps it
in with renames. A rerun replaces the partition whole; readers ignore any
directory without ``_SUCCESS``. Staging names carry a unique suffix so
concurrent runs for different partitions (or a crashed earlier run) never
share one.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"


def staging_dir(final: Path) -> Path:
    """A fresh, empty staging directory next to ``final`` (same filesystem, so rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def commit(staging: Path, final: Path, manifest: dict[str, Any] | None = None) -> Path:
    """Swap ``staging`` in as ``final`` with a manifest and ``_SUCCESS`` marker; return ``final``."""
    staging, final = Path(staging), Path(final)
    (staging / MANIFEST).write_text(json.dumps(manifest or {}, indent=2, sort_keys=True, default=str))
    (staging / SUCCESS).write_text("")
    _fsync_dir(staging)
    trash = None
    if final.exists():
        trash = final.parent / f".trash-{final.name}-{uuid.uuid4().hex[:12]}"
        os.rename(final, trash)
    os.rename(staging, final)
    _fsync_dir(final.parent)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return final


@contextlib.contextmanager
def atomic_partition(final: Path, manifest: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a staging directory; commit it as ``final`` on success, remove it on error.

    The yielded directory's caller may add keys to ``manifest`` (the same dict) before exit.
    """
    manifest = manifest if manifest is not None else {}
    staging = staging_dir(final)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit(staging, final, manifest)


def is_committed(path: Path) -> bool:
    """True when ``path`` is a committed partition (has ``_SUCCESS``)."""
    return (Path(path) / SUCCESS).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a committed partition; raise FileNotFoundError naming it otherwise."""
    path = Path(path)
    if not is_committed(path):
        raise FileNotFoundError(f"{path} is not a committed partition (no {SUCCESS}); "
                                "run the stage that writes it first")
    return json.loads((path / MANIFEST).read_text())


def partition_files(partition: Path) -> list[Path]:
    """Data files of a partition (or staging directory) in name order, hidden/marker files excluded."""
    return sorted(p for p in Path(partition).glob("*.parquet") if not p.name.startswith((".", "_")))


def read_partition(path: Path, columns: list[str] | None = None):
    """A committed partition as one Arrow table (its Parquet files only, never the manifest).

    The partition's own ``as_of=`` directory name is not turned into a column:
    the files already carry ``as_of`` where the schema has it.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    read_manifest(path)  # refuses an uncommitted partition with a clear message
    tables = [pq.read_table(f, columns=columns, partitioning=None) for f in partition_files(path)]
    if not tables:
        raise FileNotFoundError(f"committed partition {path} holds no Parquet files")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def clean_stale_staging(parent: Path) -> list[Path]:
    """Remove leftover staging/trash directories under ``parent`` (from crashed runs)."""
    removed = []
    parent = Path(parent)
    if parent.is_dir():
        for p in parent.iterdir():
            if p.is_dir() and (p.name.startswith(".staging-") or p.name.startswith(".trash-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
