"""Atomic commit without a gap, leases against garbage collection, partition locks — with real
processes and real signals (lake_worker.py plays each role)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lake import commit as lc
from lake.locks import PartitionLocked, holder_of, lock_file, partition_lock, store_dir

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("lake_worker.py")
sys.path.insert(0, str(WORKER.parent))
import lake_worker  # noqa: E402
from lake_worker import spawn  # noqa: E402


def wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited early: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"worker never signalled {path.name}"
        time.sleep(0.05)


def values(final: Path) -> set[int]:
    return set(lc.read_partition(final).column("v").to_pylist())


def test_concurrent_reader_never_sees_the_partition_missing_or_half_written(tmp_path):
    final = tmp_path / "scores" / "as_of=2024-01-01"
    lake_worker.write_version(final, 0)
    out = tmp_path / "reader.json"
    reader = spawn("reader", final, 6, out)
    # A short retention so the writer also collects versions while the reader leases them.
    writer = spawn("writer", final, 150, 0.2)
    assert writer.wait(timeout=120) == 0, writer.stderr.read()
    assert reader.wait(timeout=120) == 0, reader.stderr.read()
    seen = json.loads(out.read_text())
    assert seen["n_errors"] == 0, seen["errors"]
    # The reader really ran across switches: it saw several versions, each whole.
    assert len(seen["versions_seen"]) >= 3 and seen["reads"] > 50
    assert values(final) == {149}
    # Old versions were collected once out of retention; the current one never.
    time.sleep(0.3)
    lc.collect_garbage(final, 0.2)
    assert [p.name for p in store_dir(final).iterdir() if p.is_dir()] == [lc.version_of(final)]


def test_rerun_replaces_whole_and_leaves_no_staging(tmp_path):
    final = tmp_path / "t" / "as_of=2024-01-01"
    lake_worker.write_version(final, 2)   # 3 files
    lake_worker.write_version(final, 3)   # 1 file
    assert [p.name for p in lc.partition_files(final)] == ["part-00000.parquet"]
    assert values(final) == {3}
    assert final.is_symlink() and lc.read_manifest(final)["version"] == lc.version_of(final)
    assert not [p for p in final.parent.iterdir() if p.name.startswith((".staging-", ".link-"))]


def test_a_leased_version_outlives_retention_until_released(tmp_path):
    final = tmp_path / "t" / "as_of=2024-01-01"
    lake_worker.write_version(final, 1)
    first = lc.resolve_partition(final)
    ready = tmp_path / "leased"
    holder = spawn("hold_lease", final, ready)
    try:
        wait_for(ready, holder)
        lake_worker.write_version(final, 2, retention_s=0.0)
        assert first.is_dir() and pq.read_table(lc.partition_files(first)[0]).column("v")[0].as_py() == 1
    finally:
        holder.kill()
        holder.wait()
    assert lc.collect_garbage(final, 0.0) == [first.name]
    assert not first.exists() and values(final) == {2}


def test_plain_directory_from_before_versioning_is_exchanged_in_without_a_gap(tmp_path):
    final = tmp_path / "t" / "as_of=2024-01-01"
    final.mkdir(parents=True)
    (final / "manifest.json").write_text("{}")
    (final / "_SUCCESS").write_text("")
    lake_worker.write_version(final, 4)
    assert final.is_symlink() and values(final) == {4}
    assert [p.name.startswith("legacy-") for p in store_dir(final).iterdir() if p.is_dir()].count(True) == 1


def test_second_writer_fails_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, caplog):
    final = tmp_path / "scores" / "as_of=2024-01-01"
    ready = tmp_path / "locked"
    holder = spawn("hold_lock", final, "nightly-run-1", ready)
    try:
        wait_for(ready, holder)
        with pytest.raises(PartitionLocked) as err:
            with partition_lock(final, "backfill-run-2", wait_s=0.3):
                pass
        message = str(err.value)
        assert "nightly-run-1" in message and f"pid {holder.pid}" in message and "backfill-run-2" in message
        # A commit by another writer waits for the lock rather than interleaving.
        staging = lc.staging_dir(final)
        started = time.monotonic()
        holder.send_signal(signal.SIGKILL)
        lc.commit(staging, final, {"run_id": "backfill-run-2"})
        assert time.monotonic() - started < 30
    finally:
        holder.kill()
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    assert any("stale lock" in r.getMessage() and "nightly-run-1" in r.getMessage() for r in caplog.records)
    record = holder_of(final)
    assert record["run_id"] == "backfill-run-2" and record["released"] is True
    assert lc.read_manifest(final)["run_id"] == "backfill-run-2"


def test_lock_is_reentrant_within_one_process(tmp_path):
    final = tmp_path / "t" / "as_of=2024-01-01"
    with partition_lock(final, "run-a") as outer:
        staging = lc.staging_dir(final)
        lc.commit(staging, final, {"run_id": "run-a"})  # takes the same lock again
        assert holder_of(final) == outer
    assert holder_of(final)["released"] is True and lock_file(final).is_file()


def test_kill_9_during_commits_leaves_a_whole_partition_and_a_retry_commits(tmp_path):
    final = tmp_path / "scores" / "as_of=2024-01-01"
    lake_worker.write_version(final, 0)
    for delay_s in (0.15, 0.4, 0.9):
        ready = tmp_path / f"ready-{delay_s}"
        loop = spawn("commit_loop", final, ready)
        wait_for(ready, loop)
        time.sleep(delay_s)
        loop.send_signal(signal.SIGKILL)
        assert loop.wait(timeout=30) == -signal.SIGKILL
        # Whatever instant it died at, readers find one whole version.
        table = lc.read_partition(final)
        (k,) = set(table.column("v").to_pylist())
        assert table.num_rows == lake_worker.ROWS * (1 + k % 3)
    lc.clean_stale_staging(final.parent)
    assert not [p for p in final.parent.iterdir() if p.name.startswith((".staging-", ".link-"))]
    lake_worker.write_version(final, 1000)  # the retry: the lock the dead writer held is free
    assert values(final) == {1000}


def test_stale_staging_is_kept_while_its_writer_holds_the_lock(tmp_path):
    final = tmp_path / "t" / "as_of=2024-01-01"
    other = tmp_path / "t" / "as_of=2024-01-02"
    with partition_lock(final, "live-run"):
        live = lc.staging_dir(final)
    crashed = lc.staging_dir(other)
    ready = tmp_path / "locked"
    holder = spawn("hold_lock", final, "live-run", ready)
    try:
        wait_for(ready, holder)
        removed = lc.clean_stale_staging(final.parent)
    finally:
        holder.kill()
        holder.wait()
    assert removed == [crashed] and live.is_dir()
    assert lc.clean_stale_staging(final.parent) == [live]


def test_disk_full_during_a_write_leaves_the_previous_version_and_a_retry_commits(tmp_path):
    """ENOSPC for real: a 1 MiB tmpfs mounted in a user + mount namespace of our own (no privilege
    needed where unprivileged user namespaces are allowed); the writer runs inside it."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    out = tmp_path / "disk_full.json"
    script = (f"mount -t tmpfs -o size=1m tmpfs {mount} && "
              f"exec {sys.executable} {WORKER} disk_full {mount} {out}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["error"] and result["enospc"], result
    # The failed write left the committed version whole and no staging behind.
    assert result["after_failure"] == {"values": [0], "rows": lake_worker.ROWS, "leftovers": []}
    assert result["after_retry"] == {"values": [2], "rows": 4}
