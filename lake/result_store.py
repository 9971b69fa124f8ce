"""Stores of per-item results kept across runs (CT's scored series), and their garbage collection.

A store is ``<root>/<scope>/<config>/<item>.<content>.json``: one immutable
file per item and content (a series as its files are now), under the
configuration it was computed with (engine, model, settings). Runs reuse an
entry while its item and configuration are unchanged; entries of items that
changed, or of configurations no longer used, are never read again.

Garbage collection removes what no run has used for ``retention_s``: a run
refreshes the modification time of every entry it reuses (and writes new
ones), so "last used" is the file's mtime. A run holds a shared ``flock`` on
its configuration's ``.lease`` from choosing entries to finishing with them;
the collector takes it exclusively without waiting and skips a configuration
that a run holds, so an entry a reader holds is never removed.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

LEASE = ".lease"
# An entry (or a whole configuration) no run has used for this long is removed. Nightly runs
# touch every entry they reuse, so only series that changed or configurations retired age out.
DEFAULT_RETENTION_S = 30 * 24 * 3600.0


@contextlib.contextmanager
def holding(config_dir: Path) -> Iterator[Path]:
    """Hold a shared lease on one configuration of a store while its entries are read and written."""
    config_dir = Path(config_dir)
    while True:
        config_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(config_dir / LEASE, os.O_RDONLY | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.fstat(fd).st_ino == (config_dir / LEASE).stat().st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the collector removed this configuration while we waited: lease the new one
    try:
        yield config_dir
    finally:
        os.close(fd)


def touch(entry: Path) -> None:
    """Record that a run used ``entry`` now (its mtime is its last use)."""
    os.utime(entry)


def collect_garbage(scope_dir: Path, retention_s: float = DEFAULT_RETENTION_S) -> list[Path]:
    """Remove entries of every configuration under ``scope_dir`` unused for ``retention_s`` seconds.

    A configuration a run holds is skipped whole; one left without entries is
    removed. Temporary files of crashed writers age out the same way. Returns
    the entries removed.
    """
    scope_dir = Path(scope_dir)
    if not scope_dir.is_dir():
        return []
    removed: list[Path] = []
    cutoff = time.time() - retention_s
    for config in sorted(p for p in scope_dir.iterdir() if p.is_dir()):
        fd = os.open(config / LEASE, os.O_RDONLY | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    continue  # a run is reading or writing this configuration
                raise
            left = 0
            for entry in config.iterdir():
                if entry.name == LEASE:
                    continue
                if entry.lstat().st_mtime < cutoff:
                    entry.unlink()
                    removed.append(entry)
                else:
                    left += 1
            if not left:
                # Renamed first, under the exclusive lease: a run starting now makes a fresh one.
                doomed = scope_dir / f".gc-{config.name}-{os.getpid()}"
                os.rename(config, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        finally:
            os.close(fd)
    return removed
