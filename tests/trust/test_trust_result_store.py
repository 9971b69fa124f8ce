"""The CT scored-series store is garbage-collected: entries no run used for the retention period go,
a configuration a run holds is never touched (a real process holds it), entries a run reuses are
kept fresh; a real CT scoring run collects its store."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lake import result_store

WORKER = Path(__file__).with_name("lake_worker.py")
sys.path.insert(0, str(WORKER.parent))
from lake_worker import spawn  # noqa: E402

DAY_S = 86400.0


def entry(config: Path, name: str, age_days: float) -> Path:
    config.mkdir(parents=True, exist_ok=True)
    path = config / f"{name}.json"
    path.write_text("{}")
    then = time.time() - age_days * DAY_S
    os.utime(path, (then, then))
    return path


def test_entries_unused_for_the_retention_period_go_and_used_ones_stay(tmp_path):
    scope = tmp_path / "scored_series" / "model=ct_nodule"
    live = scope / "config-live"
    fresh = entry(live, "series-a.content-2", 1)
    changed = entry(live, "series-a.content-1", 40)       # the series' files changed 40 days ago
    reused = entry(live, "series-b.content-1", 40)        # old, but a run just reused it
    result_store.touch(reused)
    retired = scope / "config-retired"                    # an engine no run uses any more
    old = [entry(retired, f"series-{i}.content-1", 31) for i in range(3)]

    removed = result_store.collect_garbage(scope, 30 * DAY_S)
    assert sorted(removed) == sorted([changed, *old])
    assert fresh.is_file() and reused.is_file() and not changed.exists()
    assert not retired.exists(), "a configuration left empty is removed whole"
    assert not [p for p in scope.iterdir() if p.name.startswith(".gc-")]


def test_a_configuration_a_run_holds_is_never_collected(tmp_path):
    scope = tmp_path / "scored_series" / "model=ct_nodule"
    held = scope / "config-held"
    stale = entry(held, "series-a.content-1", 90)
    other = entry(scope / "config-free", "series-b.content-1", 90)
    ready = tmp_path / "holding"
    holder = spawn("hold_store", held, ready)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert holder.poll() is None, holder.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert result_store.collect_garbage(scope, 30 * DAY_S) == [other]
        assert stale.is_file(), "an entry a reader holds was removed"
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone (its flock with it): the same entry is now collected.
    assert result_store.collect_garbage(scope, 30 * DAY_S) == [stale]


def test_a_lease_taken_while_the_collector_removes_the_configuration_is_on_the_new_one(tmp_path):
    scope = tmp_path / "scored_series" / "model=ct_nodule"
    config = scope / "config-a"
    entry(config, "series-a.content-1", 90)
    result_store.collect_garbage(scope, 30 * DAY_S)
    assert not config.exists()
    with result_store.holding(config) as held:
        assert (held / result_store.LEASE).is_file()
        entry(held, "series-b.content-1", 90)
        assert result_store.collect_garbage(scope, 30 * DAY_S) == []
