"""`medscreen score emr` through the CLI entry point: resuming a stopped run by its id, --limit.

Real local Ray, real ONNX Runtime engines from the engine cache, real Parquet;
settings reach the CLI the way they reach it in production (environment + flags).
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.settings import Settings
from inference import emr
from inference.fragments import plan_fragments
from lake.commit import read_manifest
from lake.paths import LakePaths
from medscreen import cli
from scoring_fixtures import commit_timelines, marked_parts, random_timelines

AS_OF = "2024-06-30"
N = 400


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """The test settings as MEDSCREEN_* variables, so the CLI builds the same settings."""
    monkeypatch.setenv("MEDSCREEN_MODELS", json.dumps({k: str(v) for k, v in settings.models.items()}))
    monkeypatch.setenv("MEDSCREEN_ENGINES__CACHE_DIR", str(settings.engines.cache_dir))
    monkeypatch.setenv("MEDSCREEN_RAY__ACTOR_NUM_CPUS", str(settings.ray.actor_num_cpus))
    monkeypatch.setenv("MEDSCREEN_SCORING__TOKEN_BUDGET", str(settings.scoring.token_budget))


def test_score_emr_run_id_resumes_a_stopped_run(scoring_settings, monkeypatch, capsys):
    settings = scoring_settings()
    commit_timelines(settings.lake.root, AS_OF, random_timelines(N, seed=5), files=3)
    _cli_env(monkeypatch, settings)

    def stop_after_one(fragment: int, done: int) -> None:
        if done == 1:
            raise KeyboardInterrupt("operator stopped the run")

    # The default fragment size, as the CLI uses: one fragment per file here.
    with pytest.raises(KeyboardInterrupt) as stopped:
        emr.score(settings, AS_OF, run_id="run-stopped", on_fragment_done=stop_after_one)
    assert any("--run-id run-stopped" in note for note in stopped.value.__notes__)
    final = LakePaths(settings.lake.root).scores("emr_risk", AS_OF)
    staged = marked_parts(final)
    assert len(staged) == 1 and not final.exists()

    rc = cli.main(["score", "emr", "--lake", str(settings.lake.root), "--as-of", AS_OF,
                   "--run-id", "run-stopped"])
    assert rc == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert run_dir == LakePaths(settings.lake.root).run("run-stopped")
    throughput = json.loads((run_dir / "metrics.json").read_text())["throughput"]
    assert throughput["fragments"] == 3 and throughput["fragments_resumed"] == 1
    assert throughput["fragments_scored_this_attempt"] == 2
    for name, mtime in staged.items():
        assert (final / name).stat().st_mtime_ns == mtime, "the stopped run's fragment is kept, not redone"
    parts = [pq.read_table(f, columns=["patient_key", "run_id"]) for f in sorted(final.glob("part-*.parquet"))]
    keys = [k for t in parts for k in t.column("patient_key").to_pylist()]
    assert len(keys) == len(set(keys)) == N
    assert {r for t in parts for r in t.column("run_id").to_pylist()} == {"run-stopped"}
    ledger = json.loads((run_dir / "ledger.json").read_text())["stages"]["score_emr"]
    assert ledger["balanced"] and ledger["records_in"] == ledger["records_out"] == N


def test_score_emr_limit_scores_the_first_rows_in_plan_order_and_says_so(scoring_settings, monkeypatch,
                                                                         capsys):
    settings = scoring_settings()
    table = random_timelines(N, seed=6)
    timelines = commit_timelines(settings.lake.root, AS_OF, table, files=3, row_group_rows=64)
    _cli_env(monkeypatch, settings)
    # Plan order = files by name, row groups in order: the first 150 rows of the committed table.
    expected = set(table.column("patient_key").to_pylist()[:150])
    assert sum(s.num_rows for s in plan_fragments(timelines, 64, limit=150)) == 150

    lake = LakePaths(settings.lake.root)
    runs, scored = [], []
    for _ in range(2):
        assert cli.main(["score", "emr", "--lake", str(settings.lake.root), "--as-of", AS_OF,
                         "--limit", "150"]) == 0
        runs.append(Path(capsys.readouterr().out.strip().splitlines()[-1]))
        # A smoke run writes under trial/, never where real scores live.
        parts = sorted(lake.scores("emr_risk", AS_OF, trial=True).glob("part-*.parquet"))
        scored.append(pa.concat_tables([pq.read_table(f) for f in parts]).drop_columns(["run_id"]))
    keys = scored[0].column("patient_key").to_pylist()
    assert len(keys) == 150 and set(keys) == expected
    assert scored[0].equals(scored[1]), "the same limit scores the same rows"

    ledger = json.loads((runs[1] / "ledger.json").read_text())["stages"]["score_emr"]
    assert ledger["balanced"] and ledger["records_in"] == N and ledger["records_out"] == 150
    assert ledger["ignored"] == {"beyond_limit": N - 150}
    for manifest in (read_manifest(lake.scores("emr_risk", AS_OF, trial=True)),
                     json.loads((runs[1] / "manifest.json").read_text())):
        assert manifest["limit"] == 150 and manifest["rows_available"] == N and manifest["trial"] is True
    assert read_manifest(lake.screening(AS_OF, trial=True))["limit"] == 150
    assert not lake.scores("emr_risk", AS_OF).exists() and not lake.screening(AS_OF).exists()

    # A full run says it is one.
    assert cli.main(["score", "emr", "--lake", str(settings.lake.root), "--as-of", AS_OF]) == 0
    full = read_manifest(lake.scores("emr_risk", AS_OF))
    assert full["limit"] is None and full["rows"] == full["rows_available"] == N

    # Smoke and forced-ungated runs after it leave the real scores and list byte-identical.
    def real_bytes() -> dict:
        return {str(p.relative_to(lake.root)): p.read_bytes()
                for d in (lake.scores("emr_risk", AS_OF), lake.screening(AS_OF)) for p in sorted(d.iterdir())}

    before = real_bytes()
    for extra in (["--limit", "150"], ["--force-ungated"]):
        assert cli.main(["score", "emr", "--lake", str(settings.lake.root), "--as-of", AS_OF, *extra]) == 0
        assert real_bytes() == before, extra
    assert read_manifest(lake.scores("emr_risk", AS_OF, trial=True))["force_ungated"] is True
    with pytest.raises(SystemExit):
        cli.main(["score", "emr", "--lake", str(settings.lake.root), "--as-of", AS_OF, "--limit", "0"])
    assert "must be at least 1" in capsys.readouterr().err
