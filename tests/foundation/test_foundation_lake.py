"""The storage contract: atomic commits, ledgers, pseudonymised keys, run ids."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from conf.settings import PseudonymSettings
from lake import commit as lc
from lake.keys import PseudonymKeyError, create_key_file, load_key, pseudonymise
from lake.ledger import LedgerImbalance, StageLedger, write_ledger
from lake.paths import LakePaths, as_of_str


def test_commit_swaps_whole_partition_and_rerun_replaces(tmp_path):
    final = tmp_path / "scores" / "as_of=2024-01-01"
    with lc.atomic_partition(final, {"run_id": "a"}) as staging:
        (staging / "part-0.parquet").write_text("first")
        (staging / "part-1.parquet").write_text("first")
    assert lc.is_committed(final)
    assert lc.read_manifest(final)["run_id"] == "a"
    with lc.atomic_partition(final, {"run_id": "b"}) as staging:
        (staging / "part-0.parquet").write_text("second")
    # The rerun replaced the partition: the old part-1 is gone, nothing appended.
    assert sorted(p.name for p in final.iterdir()) == ["_SUCCESS", "manifest.json", "part-0.parquet"]
    assert lc.read_manifest(final)["run_id"] == "b"
    # The partition is a pointer to its newest version; beside it only the version store.
    assert final.is_symlink() and lc.read_manifest(final)["version"] == lc.version_of(final)
    assert [p.name for p in final.parent.iterdir() if p.name.startswith(".")] == [".versions"]


def test_failed_writer_leaves_previous_partition_untouched(tmp_path):
    final = tmp_path / "p"
    with lc.atomic_partition(final, {"run_id": "good"}) as staging:
        (staging / "x").write_text("good")
    with pytest.raises(RuntimeError):
        with lc.atomic_partition(final, {"run_id": "bad"}) as staging:
            (staging / "x").write_text("half-written")
            raise RuntimeError("writer crashed")
    assert (final / "x").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".versions", "p"]
    assert lc.read_manifest(final)["run_id"] == "good"


def test_uncommitted_partition_is_refused_with_its_name(tmp_path):
    (tmp_path / "half").mkdir()
    assert not lc.is_committed(tmp_path / "half")
    with pytest.raises(FileNotFoundError, match="half"):
        lc.read_manifest(tmp_path / "half")


def test_concurrent_staging_dirs_never_collide(tmp_path):
    a = lc.staging_dir(tmp_path / "as_of=2024-01-01")
    b = lc.staging_dir(tmp_path / "as_of=2024-01-01")
    assert a != b and a.is_dir() and b.is_dir()
    assert len(lc.clean_stale_staging(tmp_path)) == 2


def test_ledger_balances_or_fails_loudly(tmp_path):
    ok = StageLedger("ingest", records_in=10, records_out=7, quarantined={"bad_code": 2},
                     ignored={"unsupported_resource": 1}).check()
    with pytest.raises(LedgerImbalance, match="1 unaccounted"):
        StageLedger("features", records_in=5, records_out=4).check()
    path = write_ledger(tmp_path / "run", ok)
    data = json.loads(path.read_text())
    assert data["balanced"] and data["stages"]["ingest"]["quarantined_total"] == 2
    write_ledger(tmp_path / "run", StageLedger("features", records_in=5, records_out=4))
    data = json.loads(path.read_text())
    assert set(data["stages"]) == {"ingest", "features"} and data["balanced"] is False


def test_pseudonym_is_hmac_sha256_prefix_and_key_dependent():
    import hashlib
    import hmac

    k = pseudonymise(b"k1", "12345")
    assert k == hmac.new(b"k1", b"12345", hashlib.sha256).hexdigest()[:32]
    assert len(k) == 32 and k == pseudonymise(b"k1", "12345")
    assert k != pseudonymise(b"k2", "12345") and "12345" not in k


def test_key_file_must_be_private(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDSCREEN_PSEUDONYM_KEY", raising=False)
    path = create_key_file(tmp_path / "key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(PseudonymSettings(key_file=path))
    assert len(key) == 64
    os.chmod(path, 0o644)
    with pytest.raises(PseudonymKeyError, match="chmod 600"):
        load_key(PseudonymSettings(key_file=path))
    with pytest.raises(PseudonymKeyError, match="MEDSCREEN_PSEUDONYM__KEY_FILE"):
        load_key(PseudonymSettings())


def test_env_key_wins_over_file(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", "from-env-0123456789-0123456789-0123456789")
    assert load_key(PseudonymSettings(key_file=tmp_path / "missing")) == b"from-env-0123456789-0123456789-0123456789"


def test_lake_layout(tmp_path):
    lp = LakePaths(tmp_path)
    assert lp.timelines("2024-06-30") == tmp_path / "emr/timelines/as_of=2024-06-30"
    assert lp.scores("emr_risk", "2024-06-30") == tmp_path / "scores/model=emr_risk/as_of=2024-06-30"
    with pytest.raises(ValueError, match="2024-13-01"):
        as_of_str("2024-13-01")


def test_as_of_is_read_back_from_partition_paths_by_the_lake_only(tmp_path: Path) -> None:
    from lake.commit import atomic_partition, is_committed, resolve_partition
    from lake.paths import as_of_of, latest_as_of

    lake = LakePaths(tmp_path)
    assert as_of_of(lake.scores("emr_risk", "2024-06-30")) == "2024-06-30"
    with pytest.raises(ValueError, match="not an as_of"):
        as_of_of(lake.events)
    table = lake.scores("emr_risk", "2024-01-01").parent
    assert latest_as_of(table) is None
    for day in ("2024-01-31", "2024-03-31", "2024-02-29"):
        with atomic_partition(lake.scores("emr_risk", day)) as staging:
            (staging / "part-0.parquet").write_bytes(b"")
    (table / "as_of=2024-05-31").mkdir()            # never committed
    (table / "as_of=garbage").mkdir()               # not a date: ignored
    version = resolve_partition(lake.scores("emr_risk", "2024-03-31"))
    assert as_of_of(version) == "2024-03-31"        # a version of a partition names its date too
    assert latest_as_of(table) == table / "as_of=2024-05-31"
    assert latest_as_of(table, keep=is_committed) == table / "as_of=2024-03-31"
    assert latest_as_of(table, before="2024-03-31", keep=is_committed) == table / "as_of=2024-02-29"
    assert latest_as_of(table, before="2024-01-31", keep=is_committed) is None


def test_no_partition_path_is_split_outside_the_lake() -> None:
    """as-of dates are passed down, or read back through lake.paths.as_of_of — never by hand."""
    import re

    repo = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"""\.(r?split|r?partition)\(\s*["']=["']""")
    offenders = [f"{f.relative_to(repo)}:{i}" for top in ("inference", "medscreen", "medscreen_airflow", "jobs",
                                                          "bench", "dags", "synth")
                 for f in sorted((repo / top).rglob("*.py"))
                 for i, line in enumerate(f.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
