"""Tables written together are switched together: ingest's tables (events, patients, quarantine,
observation periods) behind one set pointer, with real processes and real signals."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from lake import commit as lc
from lake.locks import store_dir

WORKER = Path(__file__).with_name("lake_worker.py")
sys.path.insert(0, str(WORKER.parent))
import lake_worker  # noqa: E402
from lake_worker import spawn  # noqa: E402
from lake_worker import SET_NAME, SET_TABLES  # noqa: E402


def test_a_reader_never_sees_tables_of_two_set_versions(tmp_path):
    parent = tmp_path / "emr"
    lake_worker.write_set(parent, 0)
    out = tmp_path / "reader.json"
    reader = spawn("set_reader", parent, 6, out)
    writer = spawn("set_writer", parent, 120, 0.2)
    assert writer.wait(timeout=180) == 0, writer.stderr.read()
    assert reader.wait(timeout=180) == 0, reader.stderr.read()
    seen = json.loads(out.read_text())
    assert seen["n_errors"] == 0, seen["errors"]
    assert len(seen["versions_seen"]) >= 3 and seen["reads"] > 50
    assert lake_worker.read_set(parent) == {t: 119 for t in SET_TABLES}
    # Each table path alone resolves to the set's version too; versions are in their own stores.
    for table in SET_TABLES:
        version = lc.resolve_partition(parent / table)
        assert version.parent == store_dir(parent / table)
        assert lc.read_manifest(parent / table)["table"] == table
        assert lc.read_manifest(parent / table)["k"] == 119


def test_kill_9_between_table_commits_leaves_the_old_set_and_a_retry_switches_all(tmp_path):
    parent = tmp_path / "emr"
    lake_worker.write_set(parent, 1)
    before = {t: lc.version_of(parent / t) for t in SET_TABLES}
    killed = spawn("set_killed", parent, 2)
    assert killed.wait(timeout=120) == -9, killed.stderr.read()
    # Two tables' new versions reached their stores; no reader sees them.
    stored = [t for t in SET_TABLES if len([p for p in store_dir(parent / t).iterdir()
                                            if p.is_dir() and not p.name.startswith(".")]) == 2]
    assert len(stored) == 2
    assert lake_worker.read_set(parent) == {t: 1 for t in SET_TABLES}
    assert {t: lc.version_of(parent / t) for t in SET_TABLES} == before
    # The writer's locks died with it: the retry commits the whole set.
    lake_worker.write_set(parent, 2)
    assert lake_worker.read_set(parent) == {t: 2 for t in SET_TABLES}
    # The dead writer's orphaned versions are collected once out of retention; the current never.
    time.sleep(0.05)
    for table in SET_TABLES:
        lc.collect_garbage(parent / table, 0.0)
        left = [p.name for p in store_dir(parent / table).iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert left == [lc.version_of(parent / table)]
    lc.clean_stale_staging(parent)
    assert not [p for p in parent.iterdir() if p.name.startswith((".staging-", ".link-"))]


def test_tables_committed_one_by_one_join_the_set_without_changing_what_readers_see(tmp_path):
    parent = tmp_path / "emr"
    lake_worker.write_version(parent / "events", 5)
    lake_worker.write_version(parent / "patients", 5)
    old = {t: lc.version_of(parent / t) for t in ("events", "patients")}
    stored: list[str] = []

    def check_unchanged(table: str) -> None:
        stored.append(table)
        # Mid-commit: the tables still resolve to their old versions.
        assert {t: lc.version_of(parent / t) for t in ("events", "patients")} == old

    lake_worker.write_set(parent, 6, on_stored=check_unchanged)
    assert len(stored) == len(SET_TABLES)
    assert lake_worker.read_set(parent) == {t: 6 for t in SET_TABLES}
    assert os.readlink(parent / "events").endswith(f".set-{SET_NAME}/CURRENT/events")
