"""Real processes for the lake's concurrency and fault tests (run as a script, one role each).

  writer FINAL N RETENTION_S     commit N versions of FINAL; version k has 1 + k % 3 files of
                                 ROWS rows, every row holding k
  reader FINAL SECONDS OUT       read FINAL in a loop; write what it saw to OUT (JSON)
  hold_lock FINAL RUN_ID READY   take FINAL's partition lock, touch READY, sleep
  hold_lease FINAL READY         lease FINAL's current version, touch READY, sleep
  commit_loop FINAL READY        commit versions of FINAL forever (to be killed mid-commit)
  disk_full MOUNT OUT            on a small tmpfs at MOUNT: commit, fail a big commit on ENOSPC,
                                 enlarge the tmpfs, retry; write what happened to OUT (JSON)
  hold_store CONFIG_DIR READY    hold a result store configuration (lake.result_store), touch READY, sleep
  set_writer PARENT N RETENTION_S  commit N versions of the table set SET_TABLES under PARENT; in
                                 version k every table's rows hold k
  set_reader PARENT SECONDS OUT  read the set's tables together in a loop; write what it saw to OUT
  set_killed PARENT K            commit set version K, dying by SIGKILL after two of its tables are
                                 in their stores (before the set pointer moves)
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lake import commit as lc
from lake.locks import partition_lock

ROWS = 50
REPO = Path(__file__).resolve().parents[2]
SET_NAME = "ingest"
SET_TABLES = ("events", "observation_periods", "patients", "quarantine")


def spawn(*args: object) -> subprocess.Popen:
    """This script as a child process playing the role ``args`` names (output captured)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_version(final: Path, k: int, retention_s: float = lc.DEFAULT_RETENTION_S) -> None:
    staging = lc.staging_dir(final)
    for i in range(1 + k % 3):
        table = pa.table({"v": pa.array([k] * ROWS, pa.int64()), "file": pa.array([i] * ROWS, pa.int32())})
        pq.write_table(table, staging / f"part-{i:05d}.parquet")
    lc.commit(staging, final, {"run_id": f"writer-{k}", "k": k}, retention_s=retention_s)


def reader(final: Path, seconds: float, out: Path) -> None:
    seen: dict[int, int] = {}
    errors: list[str] = []
    reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reads += 1
        try:
            if not lc.is_committed(final):
                errors.append("partition missing (no _SUCCESS)")
                continue
            table = lc.read_partition(final)
        except Exception as exc:  # any failure is what the test counts
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        values = set(table.column("v").to_pylist())
        if len(values) != 1:
            errors.append(f"mixed versions {sorted(values)}")
            continue
        k = values.pop()
        if table.num_rows != ROWS * (1 + k % 3):
            errors.append(f"version {k} half read: {table.num_rows} rows")
            continue
        seen[k] = seen.get(k, 0) + 1
    out.write_text(json.dumps({"reads": reads, "errors": errors[:20], "n_errors": len(errors),
                               "versions_seen": sorted(seen)}))


def write_big(final: Path, k: int, megabytes: int) -> None:
    payload = os.urandom(1 << 20)  # incompressible, so the file really takes the space
    with lc.atomic_partition(final, {"run_id": f"big-{k}", "k": k}) as staging:
        table = pa.table({"v": pa.array([k] * megabytes, pa.int64()),
                          "blob": pa.array([payload] * megabytes, pa.binary())})
        pq.write_table(table, staging / "part-00000.parquet", compression="none")


def disk_full(mount: Path, out: Path) -> None:
    final = mount / "scores" / "as_of=2024-01-01"
    write_version(final, 0)
    result: dict = {}
    try:
        write_big(final, 1, 4)   # 4 MiB into a 1 MiB filesystem
        result["error"] = None
    except OSError as exc:
        result["error"] = str(exc)
        result["enospc"] = exc.errno == errno.ENOSPC or "No space left" in str(exc)
    table = lc.read_partition(final)
    result["after_failure"] = {"values": sorted(set(table.column("v").to_pylist())), "rows": table.num_rows,
                               "leftovers": sorted(p.name for p in final.parent.iterdir()
                                                   if p.name.startswith((".staging-", ".link-")))}
    subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
    write_big(final, 2, 4)       # the retry, with room
    table = lc.read_partition(final)
    result["after_retry"] = {"values": sorted(set(table.column("v").to_pylist())), "rows": table.num_rows}
    out.write_text(json.dumps(result))


def write_set(parent: Path, k: int, retention_s: float = lc.DEFAULT_RETENTION_S, on_stored=None) -> None:
    stagings = {}
    for j, table in enumerate(SET_TABLES):
        stagings[parent / table] = staging = lc.staging_dir(parent / table)
        # Tables of one version differ in size, as ingest's do.
        rows = ROWS * (1 + (k + j) % 3)
        pq.write_table(pa.table({"v": pa.array([k] * rows, pa.int64())}), staging / "part-00000.parquet")
    lc.commit_set(stagings, SET_NAME, {"run_id": f"set-writer-{k}", "k": k}, retention_s=retention_s,
                  on_stored=on_stored)


def read_set(parent: Path) -> dict[str, int]:
    """The version each table of the set holds, read together (raises on a half-read table)."""
    with lc.reading_together(*(parent / t for t in SET_TABLES)) as versions:
        seen = {}
        for table, version in zip(SET_TABLES, versions):
            values = set(pq.read_table(version / "part-00000.parquet").column("v").to_pylist())
            if len(values) != 1:
                raise AssertionError(f"{table}: values {sorted(values)} in one version")
            seen[table] = values.pop()
            if lc.read_manifest(version)["k"] != seen[table]:
                raise AssertionError(f"{table}: manifest and data disagree")
    return seen


def set_reader(parent: Path, seconds: float, out: Path) -> None:
    errors: list[str] = []
    seen: set[int] = set()
    reads = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        reads += 1
        try:
            got = read_set(parent)
        except Exception as exc:  # any failure is what the test counts
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        if len(set(got.values())) != 1:
            errors.append(f"mixed set {got}")
            continue
        seen.add(next(iter(got.values())))
    out.write_text(json.dumps({"reads": reads, "errors": errors[:20], "n_errors": len(errors),
                               "versions_seen": sorted(seen)}))


def main(argv: list[str]) -> None:
    role, final = argv[0], Path(argv[1])
    if role == "writer":
        for k in range(int(argv[2])):
            write_version(final, k, float(argv[3]))
    elif role == "reader":
        reader(final, float(argv[2]), Path(argv[3]))
    elif role == "hold_lock":
        with partition_lock(final, argv[2]):
            Path(argv[3]).touch()
            time.sleep(600)
    elif role == "hold_lease":
        with lc.reading(final):
            Path(argv[2]).touch()
            time.sleep(600)
    elif role == "commit_loop":
        k = 1
        Path(argv[2]).touch()
        while True:
            write_version(final, k, 0.0)
            k += 1
    elif role == "hold_store":
        from lake.result_store import holding

        with holding(final):
            Path(argv[2]).touch()
            time.sleep(600)
    elif role == "set_writer":
        for k in range(int(argv[2])):
            write_set(final, k, float(argv[3]))
    elif role == "set_reader":
        set_reader(final, float(argv[2]), Path(argv[3]))
    elif role == "set_killed":
        stored: list[str] = []

        def die_after_two(table: str) -> None:
            stored.append(table)
            if len(stored) == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        write_set(final, int(argv[2]), on_stored=die_after_two)
    elif role == "disk_full":
        disk_full(final, Path(argv[2]))
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
