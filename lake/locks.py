"""The lake's one lock: partition locks (one writer per partition) and lake-wide named locks.

Every writer of a lake partition (a CLI command, an Airflow task, a cohort
run) holds the partition's lock from the moment it decides to write until its
commit is done. The lock is an ``fcntl.flock`` on
``<table>/.versions/<partition>/LOCK`` (the partition's version store, see
lake.commit); the file holds the holder record — run id, host, pid and start
time (UTC) — so a second writer that cannot get the lock can say who has it.

The kernel releases a flock when its holder dies (``kill -9`` included), so a
crashed writer's lock is free at once; the record it left is then stale, and
the next writer takes the lock over and logs whose it was. Locks are
re-entrant within one process: the stage lock and the commit's own lock on
the same partition nest instead of deadlocking. POSIX local filesystems only
(flock is not shared across hosts on every network filesystem).

:func:`lake_lock` is the same lock on ``LAKE/_orchestration/<name>.lock``, for
work that spans partitions (a shared table's rebuild decision, the screening
pointer); it waits instead of failing.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STORE = ".versions"
LOCK = "LOCK"
# Lake-wide locks (lake_lock) and orchestration state live here.
STATE_DIR = "_orchestration"
# How often a waiting writer retries the lock.
_POLL_S = 0.05


class PartitionLocked(RuntimeError):
    """Another writer holds the partition's lock; the message names it."""


@dataclass
class _Held:
    fd: int
    depth: int
    holder: dict[str, Any]


_held: dict[str, _Held] = {}
_registry = threading.Lock()


def store_dir(final: Path) -> Path:
    """The version store of partition ``final``: ``final.parent/.versions/final.name``."""
    final = Path(final)
    return final.parent / STORE / final.name


def lock_file(final: Path) -> Path:
    """The lock file of partition ``final``."""
    return store_dir(final) / LOCK


def holder_of(final: Path) -> dict[str, Any] | None:
    """The holder record in a partition's lock file (the last holder's, if nobody holds it now)."""
    return _record_in(lock_file(final))


def _record_in(path: Path) -> dict[str, Any] | None:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text) if text.strip() else None
    except json.JSONDecodeError:
        return None


def describe(holder: dict[str, Any] | None) -> str:
    """A holder record in words, for messages."""
    if not holder:
        return "an unknown holder (no holder record)"
    return (f"run {holder.get('run_id')} (pid {holder.get('pid')} on host {holder.get('host')}, "
            f"since {holder.get('started_at_utc')})")


def is_held(final: Path) -> bool:
    """True when some process (this one included) holds the partition's lock right now."""
    path = lock_file(final)
    if str(path) in _held:
        return True
    if not path.is_file():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)  # closing drops the probe's lock, if it got one
    return False


@contextlib.contextmanager
def partition_lock(final: Path, run_id: str, wait_s: float = 0.0) -> Iterator[dict[str, Any]]:
    """Hold the write lock of partition ``final`` for ``run_id``; yield the holder record.

    Waits up to ``wait_s`` seconds for another holder, then raises
    :class:`PartitionLocked` naming it (run id, pid, host, start). A lock whose
    recorded holder is gone is taken over (logged). Re-entrant in one process.
    """
    with hold(lock_file(final), run_id, wait_s,
              f"partition {Path(final).parent.name}/{Path(final).name}") as holder:
        yield holder


@contextlib.contextmanager
def lake_lock(lake_root: Path, name: str, run_id: str) -> Iterator[dict[str, Any]]:
    """Hold ``LAKE/_orchestration/<name>.lock``, waiting as long as it takes; yield the holder record.

    For work that spans more than one partition's commit (deciding whether a
    shared table is current and rebuilding it, moving the screening pointer):
    a second holder waits, then sees what the first one did.
    """
    # Not re-entrant: two threads of one process (or two tasks) take turns, as two processes do.
    with hold(Path(lake_root) / STATE_DIR / f"{name}.lock", run_id, math.inf, f"lake lock {name}",
              reentrant=False) as holder:
        yield holder


@contextlib.contextmanager
def hold(path: Path, run_id: str, wait_s: float, what: str, *,
         reentrant: bool = True) -> Iterator[dict[str, Any]]:
    """The one flock of the lake: exclusive, holder recorded in ``path``; ``reentrant``: a second
    hold of ``path`` in this process nests instead of waiting.

    Waits up to ``wait_s`` seconds (``math.inf``: until free), then raises
    :class:`PartitionLocked` naming ``what`` and its holder.
    """
    key = str(path)
    with _registry:
        held = _held.get(key) if reentrant else None
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield held.holder
        finally:
            with _registry:
                held.depth -= 1
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(wait_s, 0.0)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                holder = _record_in(path)
                raise PartitionLocked(
                    f"{what} is being written by {describe(holder)}; wait for it to finish (or give a "
                    f"longer lock wait), then run again — run {run_id} wrote nothing")
            time.sleep(_POLL_S)
    except BaseException:
        os.close(fd)
        raise
    previous = _record_in(path)
    if previous and not previous.get("released"):
        # We got the flock, so its last holder no longer has it: it died without releasing.
        log.warning("taking over the stale lock of %s: %s ended without releasing it", what, describe(previous))
    holder = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "started_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    _write_record(fd, holder)
    entry = _Held(fd=fd, depth=1, holder=holder)
    if reentrant:
        with _registry:
            _held[key] = entry
    try:
        yield holder
    finally:
        with _registry:
            entry.depth -= 1
            last = entry.depth == 0
            if last and reentrant:
                del _held[key]
        if last:
            try:
                _write_record(fd, {**holder, "released": True,
                                   "released_at_utc": dt.datetime.now(dt.timezone.utc).isoformat(
                                       timespec="seconds")})
            finally:
                os.close(fd)  # releases the flock


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
