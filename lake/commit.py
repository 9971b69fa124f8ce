"""Atomic, idempotent partition commits: versioned directories behind a pointer.

A partition ``final`` (for example ``scores/model=M/as_of=D``) is a symbolic
link to one immutable version directory in its version store,
``final.parent/.versions/final.name/<version>/``. A writer fills a private
staging directory beside the target; :func:`commit` writes ``manifest.json``
(with the new ``version``) and ``_SUCCESS`` into it, moves it into the store
and replaces the link with ONE ``rename(2)`` of a fresh link over the old
one. A reader therefore sees the old version or the new one, whole, and never
a missing or half-written partition. A rerun replaces; nothing is appended.

Readers resolve the pointer once (:func:`resolve_partition`, or
:func:`reading`, which also holds a lease on the version) and read every file
of that version, so a commit during a read cannot mix versions. Old versions
are garbage-collected after :data:`DEFAULT_RETENTION_S` seconds, and never
while a reader holds a lease on them. Commits take the partition lock
(lake.locks), so two writers never interleave.

A partition written before versioning (a plain directory) is switched to the
link layout on its first new commit with ``renameat2(RENAME_EXCHANGE)``, which
is gap-free too; only where the filesystem lacks that call does that one
migration fall back to two renames.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lake.locks import STORE, partition_lock, store_dir

SUCCESS = "_SUCCESS"
MANIFEST = "manifest.json"
# Readers hold a shared flock on ``<store>/<version>.lease`` of the version they read; GC needs
# it exclusively. It lives beside the version, so a version holds exactly what its writer wrote.
LEASE = ".lease"
# A version replaced at time T is kept until T + retention: a reader that resolved the pointer
# just before the switch and has not yet taken its lease still finds it.
DEFAULT_RETENTION_S = 3600.0
# How long a commit waits for a partition lock held by another writer.
COMMIT_LOCK_WAIT_S = 120.0
SUPERSEDED = ".superseded"
# Staging a crashed run left is kept this long for a resume (``--run-id``) before a later
# writer of the same partition removes it; staging whose partition lock is held is never removed.
STALE_STAGING_AGE_S = 24 * 3600.0
log = logging.getLogger(__name__)


def staging_dir(final: Path) -> Path:
    """A fresh, empty staging directory next to ``final`` (same filesystem, so rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".staging-{final.name}-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def new_version_id() -> str:
    """A sortable, unique version name: ``<UTC yyyymmddThhmmss.ffffffZ>-<8 hex>``."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    return f"{now}-{uuid.uuid4().hex[:8]}"


def commit(staging: Path, final: Path, manifest: dict[str, Any] | None = None, *,
           run_id: str | None = None, retention_s: float = DEFAULT_RETENTION_S) -> Path:
    """Make ``staging`` the committed version of ``final``; return ``final``.

    Writes ``manifest.json`` (``manifest`` plus ``version``: the new version's
    name, which is also set in the caller's dict) and ``_SUCCESS``, moves the
    directory into the version store and switches the pointer with one atomic
    rename, under the partition lock (re-entrant: a writer holding it for its
    whole run keeps it). Versions older than ``retention_s`` that no reader
    holds are then removed.
    """
    staging, final = Path(staging), Path(final)
    manifest = manifest if manifest is not None else {}
    version = _seal(staging, manifest)
    with partition_lock(final, run_id or str(manifest.get("run_id") or f"commit-{version}"),
                        wait_s=COMMIT_LOCK_WAIT_S):
        target = _move_into_store(staging, final, version)
        previous = _switch(final, target)
        if previous is not None:
            _mark_superseded(previous)
        collect_garbage(final, retention_s)
    return final


def _seal(staging: Path, manifest: dict[str, Any]) -> str:
    """Write manifest.json (with a new ``version``) and _SUCCESS into ``staging``, durably; return the version."""
    version = new_version_id()
    manifest["version"] = version
    _write_durably(staging / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True, default=str).encode())
    _write_durably(staging / SUCCESS, b"")
    _fsync_dir(staging)
    return version


def _move_into_store(staging: Path, final: Path, version: str) -> Path:
    """Move a sealed staging directory into ``final``'s version store (invisible to readers until a switch)."""
    store = store_dir(final)
    store.mkdir(parents=True, exist_ok=True)
    target = store / version
    _lease_file(target).touch()
    os.rename(staging, target)
    _fsync_dir(store)
    return target


def _mark_superseded(version: Path) -> None:
    # When it stopped being current: the start of its retention period.
    (version.parent / (version.name + SUPERSEDED)).write_text(dt.datetime.now(dt.timezone.utc).isoformat())


# ------------------------------------------------------------------------ table sets
#
# Some stages write several tables that are only right together (ingest: events, patients,
# quarantine, observation periods). Each table of such a set is a link through ONE set pointer:
#
#   parent/<table>                          -> .versions/.set-<name>/CURRENT/<table>
#   parent/.versions/.set-<name>/CURRENT    -> <set version>
#   parent/.versions/.set-<name>/<set version>/<table> -> ../../<table>/<table version>
#
# so one rename of CURRENT switches every table at once, and a reader that resolves the tables
# through one reading of CURRENT (reading_together) gets all new or all old, never a mix.

SET_PREFIX = ".set-"
SET_CURRENT = "CURRENT"


def set_store(parent: Path, name: str) -> Path:
    """The store of table set ``name`` under ``parent``: its set versions and its CURRENT pointer."""
    return Path(parent) / STORE / f"{SET_PREFIX}{name}"


def commit_set(stagings: dict[Path, Path], name: str, manifest: dict[str, Any] | None = None, *,
               run_id: str | None = None, retention_s: float = DEFAULT_RETENTION_S,
               on_stored: Callable[[str], None] | None = None) -> list[Path]:
    """Commit several tables (``{final: staging}``, all in one folder) as set ``name``; return the finals.

    Every table gets its own manifest (``manifest`` plus ``table``, ``version``
    and ``set_version``) and version, moved into its store; then ONE rename of
    the set pointer makes all of them current together. A crash before that
    rename leaves every table as it was. Takes every table's partition lock
    (in name order). ``on_stored(table)`` is called after each table is moved
    into its store (fault tests kill the writer there). The caller's
    ``manifest`` receives ``set_version``.
    """
    parents = {Path(f).parent for f in stagings}
    if len(parents) != 1:
        raise ValueError(f"the tables of set {name!r} must share one folder, got {sorted(map(str, parents))}")
    parent = parents.pop()
    manifest = manifest if manifest is not None else {}
    set_version = new_version_id()
    manifest["set_version"] = set_version
    finals = {Path(f).name: Path(f) for f in sorted(stagings, key=lambda f: Path(f).name)}
    stagings = {Path(f).name: Path(s) for f, s in stagings.items()}
    holder = run_id or str(manifest.get("run_id") or f"commit-{set_version}")
    with contextlib.ExitStack() as locks:
        for final in finals.values():
            locks.enter_context(partition_lock(final, holder, wait_s=COMMIT_LOCK_WAIT_S))
        store = set_store(parent, name)
        store.mkdir(parents=True, exist_ok=True)
        targets = {}
        for table, final in finals.items():
            table_manifest = {**manifest, "table": table}
            targets[table] = _move_into_store(Path(stagings[table]), final, _seal(Path(stagings[table]),
                                                                                   table_manifest))
            if on_stored is not None:
                on_stored(table)
        _join_set(finals, store, targets)
        previous = _set_members(store / SET_CURRENT)
        # Tables of the set this commit does not write stay at their current version.
        _switch_set(store, set_version, {**previous, **targets})
        for table, version in previous.items():
            if table in targets and version.name != targets[table].name:
                _mark_superseded(version)
        for final in finals.values():
            collect_garbage(final, retention_s)
        _collect_sets(store, retention_s)
    return list(finals.values())


def _set_members(current: Path) -> dict[str, Path]:
    """The table versions the set pointer ``current`` names now ({} when there is none)."""
    if not current.is_symlink():
        return {}
    version = (current.parent / os.readlink(current))
    return {p.name: (version / os.readlink(p)).resolve() for p in version.iterdir() if p.is_symlink()}


def _replace_link(link: Path, target: Path) -> Path | None:
    """Point ``link`` at ``target`` with one rename(2); return what it pointed at before."""
    previous = (link.parent / os.readlink(link)) if link.is_symlink() else None
    tmp = link.parent / f".link-{link.name}-{uuid.uuid4().hex[:12]}"
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.rename(tmp, link)
    _fsync_dir(link.parent)
    return previous


def _join_set(finals: dict[str, Path], store: Path, targets: dict[str, Path]) -> None:
    """Make every table a link through the set pointer, without changing what any reader sees.

    Done once per table (the first set commit after per-table commits): the
    set pointer first names a set of the tables' current versions, then each
    table's own link is replaced by one through the pointer — the same version.
    A plain directory from before versioning cannot be named by a set before
    it is moved; it is switched to its new version ahead of the set (logged).
    """
    current = store / SET_CURRENT
    if current.exists() and not current.is_symlink():
        # A lake copied without its links (cp -r, copytree): the tables are plain copies, which is what
        # readers see; the dereferenced pointer is a stale duplicate of them.
        doomed = store / f".gc-{SET_CURRENT}-{uuid.uuid4().hex[:12]}"
        os.rename(current, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    through = {table: os.path.relpath(current / table, final.parent) for table, final in finals.items()}
    joining = {t: f for t, f in finals.items() if not (f.is_symlink() and os.readlink(f) == through[t])}
    if not joining:
        return
    members = _set_members(current)
    for table, final in joining.items():
        if final.exists() and not final.is_symlink():
            log.warning("%s is a plain directory from before versioning: it switches to its new version "
                        "ahead of its set, once", final.name)
            previous = _switch(final, targets[table])
            if previous is not None:
                _mark_superseded(previous)
        if final.is_symlink() and final.exists():
            members[table] = resolve_partition(final)
    _switch_set(store, new_version_id(), members)
    for table, final in joining.items():
        _replace_link_text(final, through[table])


def _switch_set(store: Path, set_version: str, members: dict[str, Path]) -> None:
    """Write set version ``set_version`` naming ``members`` ({table: table version}) and make it the
    set's CURRENT with one rename; the set version it replaces is marked superseded."""
    new = store / set_version
    new.mkdir()
    for table, version in members.items():
        os.symlink(os.path.relpath(version, new), new / table)
    _fsync_dir(new)
    old = _replace_link(store / SET_CURRENT, new)
    if old is not None:
        _mark_superseded(old)


def _replace_link_text(final: Path, target_text: str) -> None:
    tmp = final.parent / f".link-{final.name}-{uuid.uuid4().hex[:12]}"
    os.symlink(target_text, tmp)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def _collect_sets(store: Path, retention_s: float) -> None:
    """Remove set versions (links only) replaced more than ``retention_s`` ago; never the current one."""
    current = os.readlink(store / SET_CURRENT) if (store / SET_CURRENT).is_symlink() else None
    for entry in _expired_versions(store, current, retention_s):
        shutil.rmtree(entry, ignore_errors=True)
        (store / (entry.name + SUPERSEDED)).unlink(missing_ok=True)


def _expired_versions(store: Path, current: str | None, retention_s: float) -> list[Path]:
    """Versions in ``store`` other than ``current`` that stopped being current ``retention_s`` ago or more."""
    now = time.time()
    expired = []
    for entry in sorted(store.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or entry.name == current or entry.name.startswith("."):
            continue
        marker = store / (entry.name + SUPERSEDED)
        try:
            since = marker.stat().st_mtime
        except FileNotFoundError:
            # Never current (a crash between moving it in and switching) or marker lost: its own age.
            since = entry.stat().st_mtime
        if now - since >= retention_s:
            expired.append(entry)
    return expired


def _switch(final: Path, target: Path) -> Path | None:
    """Point ``final`` at ``target`` in one atomic step; return the version it pointed at before."""
    link = final.parent / f".link-{final.name}-{uuid.uuid4().hex[:12]}"
    os.symlink(os.path.relpath(target, final.parent), link)
    previous: Path | None = None
    if final.is_symlink():
        previous = resolve_partition(final)
        os.rename(link, final)  # rename(2) over a link: readers see the old or the new, never none
    elif final.exists():
        # A partition from before versioning: exchange the plain directory with the link.
        legacy = store_dir(final) / f"legacy-{new_version_id()}"
        if _exchange(link, final):
            os.rename(link, legacy)  # `link` now names the old directory
        else:
            log.warning("renameat2(RENAME_EXCHANGE) unavailable here: migrating %s to versioned "
                        "layout with two renames (readers may find it missing for an instant, once)",
                        final.name)
            os.rename(final, legacy)
            os.rename(link, final)
        _lease_file(legacy).touch()
        previous = legacy
    else:
        os.rename(link, final)
    _fsync_dir(final.parent)
    return previous


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2 exchange of {a.name} and {b.name} failed", str(b))


@contextlib.contextmanager
def atomic_partition(final: Path, manifest: dict[str, Any] | None = None, *,
                     run_id: str | None = None) -> Iterator[Path]:
    """Yield a staging directory; commit it as ``final`` on success, remove it on error.

    The yielded directory's caller may add keys to ``manifest`` (the same dict) before exit;
    after exit the dict holds the committed ``version``.
    """
    manifest = manifest if manifest is not None else {}
    staging = staging_dir(final)
    try:
        yield staging
        commit(staging, final, manifest, run_id=run_id)
    except BaseException:
        # A failed write or commit (disk full, lock held) leaves the previous version as it was.
        shutil.rmtree(staging, ignore_errors=True)
        raise


def resolve_partition(path: Path) -> Path:
    """The version directory a partition path points at now (the path itself when it is not a link).

    Resolve once and read everything from the result: the pointer may move to a
    newer version at any moment, the version directory never changes.
    """
    path = Path(path)
    if path.is_symlink():
        return (path.parent / os.readlink(path)).resolve()
    return path


def version_of(path: Path) -> str | None:
    """The committed version a partition path points at (None for a plain, unversioned directory)."""
    path = Path(path)
    return resolve_partition(path).name if path.is_symlink() else None


@contextlib.contextmanager
def reading(path: Path) -> Iterator[Path]:
    """Resolve a committed partition and hold a lease on that version while the block runs.

    Yields the version directory. Garbage collection skips a version with a
    lease; a version removed between resolving and leasing is resolved again.
    """
    path = Path(path)
    for _ in range(100):
        version = resolve_partition(path)
        try:
            fd = os.open(_lease_file(version), os.O_RDONLY)
        except FileNotFoundError:
            if path.is_symlink() and not version.exists():
                continue  # collected after the pointer moved on: resolve again
            break  # a plain directory from before versioning, or nothing committed
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if (version / SUCCESS).is_file():
                yield version
                return
        finally:
            os.close(fd)
    read_manifest(path)  # an uncommitted path fails here, naming it
    yield resolve_partition(path)


@contextlib.contextmanager
def reading_together(*paths: Path) -> Iterator[list[Path]]:
    """Like :func:`reading` for several partitions at once; yields their version directories.

    Tables of one set (:func:`commit_set`) are resolved through ONE reading of
    the set pointer, so they come from the same commit, never a mix of two;
    other paths are resolved one by one. Every version is leased while the
    block runs.
    """
    for _ in range(100):
        versions = _resolve_together([Path(p) for p in paths])
        fds: list[int] = []
        try:
            for path, version in zip(paths, versions):
                if not Path(path).is_symlink():
                    continue  # a plain directory from before versioning: nothing to lease
                try:
                    fds.append(os.open(_lease_file(version), os.O_RDONLY))
                except FileNotFoundError:
                    break  # collected after the pointer moved on, or never committed
                fcntl.flock(fds[-1], fcntl.LOCK_SH)
                if not (version / SUCCESS).is_file():
                    break  # being collected (renamed to .gc-*): resolve again
            else:
                for version in versions:
                    read_manifest(version)  # an uncommitted partition fails here, naming it
                yield versions
                return
        finally:
            for fd in fds:
                os.close(fd)
    for p in paths:
        read_manifest(Path(p))  # an uncommitted path fails here, naming it
    raise RuntimeError(f"could not lease one version of each of {', '.join(Path(p).name for p in paths)}: "
                       "they kept being replaced and collected while resolving; run again")


def _resolve_together(paths: list[Path]) -> list[Path]:
    """Version directories of ``paths``; members of one table set from one reading of its pointer."""
    sets: dict[Path, Path] = {}
    out = []
    for path in paths:
        target = os.readlink(path) if path.is_symlink() else None
        parts = Path(target).parts if target else ()
        if len(parts) >= 2 and parts[-2] == SET_CURRENT:
            current = path.parent / Path(target).parent
            if current not in sets:
                sets[current] = current.parent / os.readlink(current)
            out.append((sets[current] / parts[-1]).resolve())
        else:
            out.append(resolve_partition(path))
    return out


def collect_garbage(final: Path, retention_s: float = DEFAULT_RETENTION_S) -> list[str]:
    """Remove versions of ``final`` replaced more than ``retention_s`` ago that no reader holds.

    The current version is never removed; neither is one whose lease a reader
    holds. Returns the names of the versions removed.
    """
    final = Path(final)
    store = store_dir(final)
    if not store.is_dir():
        return []
    current = resolve_partition(final).name if final.is_symlink() else None
    removed = []
    for entry in _expired_versions(store, current, retention_s):
        marker = store / (entry.name + SUPERSEDED)
        fd = None
        try:
            fd = os.open(_lease_file(entry), os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                continue  # a reader holds it
            raise
        try:
            doomed = store / f".gc-{entry.name}"
            os.rename(entry, doomed)  # readers check _SUCCESS after leasing: this hides it at once
        finally:
            if fd is not None:
                os.close(fd)
        shutil.rmtree(doomed, ignore_errors=True)
        marker.unlink(missing_ok=True)
        _lease_file(entry).unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


def is_committed(path: Path) -> bool:
    """True when ``path`` is a committed partition (its current version has ``_SUCCESS``)."""
    return (Path(path) / SUCCESS).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a committed partition; raise FileNotFoundError naming it otherwise."""
    version = resolve_partition(Path(path))
    if not is_committed(version):
        raise FileNotFoundError(f"{path} is not a committed partition (no {SUCCESS}); "
                                "run the stage that writes it first")
    return json.loads((version / MANIFEST).read_text())


def partition_files(partition: Path) -> list[Path]:
    """Data files of a partition (resolved to its current version) or staging directory, in name
    order, hidden/marker files excluded."""
    version = resolve_partition(Path(partition))
    return sorted(p for p in version.glob("*.parquet") if not p.name.startswith((".", "_")))


def read_partition(path: Path, columns: list[str] | None = None, read_dictionary: list[str] | None = None):
    """A committed partition as one Arrow table (its Parquet files only, never the manifest).

    Reads one version, under a lease, whatever commits happen meanwhile. The
    partition's own ``as_of=`` directory name is not turned into a column: the
    files already carry ``as_of`` where the schema has it. ``read_dictionary``
    columns stay dictionary-encoded (a column of a few distinct strings, cheap to hold).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    with reading(path) as version:
        read_manifest(version)  # refuses an uncommitted partition with a clear message
        tables = [pq.read_table(f, columns=columns, partitioning=None, read_dictionary=read_dictionary)
                  for f in partition_files(version)]
    if not tables:
        raise FileNotFoundError(f"committed partition {path} holds no Parquet files")
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def clean_stale_staging(parent: Path, min_age_s: float = 0.0) -> list[Path]:
    """Remove leftovers of crashed writers under ``parent``: staging, trash and link-in-progress
    entries at least ``min_age_s`` old, and half-collected versions, skipping every partition whose
    lock a writer holds now."""
    from lake.locks import is_held

    parent = Path(parent)
    if not parent.is_dir():
        return []
    stores = parent / STORE
    busy = [name for name in (p.name for p in stores.iterdir()) if is_held(parent / name)] \
        if stores.is_dir() else []
    removed = []
    for p in parent.iterdir():
        if not p.name.startswith((".staging-", ".trash-", ".link-")):
            continue
        if any(p.name.startswith((f".staging-{b}-", f".link-{b}-")) for b in busy):
            continue  # a live writer's work in progress
        if min_age_s and time.time() - p.lstat().st_mtime < min_age_s:
            continue  # young enough to be resumed
        if p.is_symlink() or p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    if stores.is_dir():
        for store in stores.iterdir():
            for p in store.glob(".gc-*") if store.is_dir() else ():
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def _lease_file(version: Path) -> Path:
    return version.parent / (version.name + LEASE)


def _write_durably(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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
