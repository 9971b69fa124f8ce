"""The screening list a scoring run builds from its engine actors' per-fragment candidates equals the
list built from every committed score and every timeline (screening.build on the committed scores):
same rows in the same order, same ledger, same manifest counts — with thresholds, with top k, and
after a resume whose earlier fragments were staged under other criteria (their candidates are then
made again from their files). Real local Ray, ONNX Runtime and Parquet lake."""
from __future__ import annotations

import json

import pytest

from inference import emr, screening
from lake.commit import read_manifest, read_partition
from lake.paths import LakePaths
from scoring_fixtures import commit_timelines, random_timelines

AS_OF = "2024-06-30"
N = 500
# Not the run's own: what depends on when or how the list was written, not on what it holds.
WRITE_FIELDS = {"version", "committed_at", "built_from", "files", "created_at", "rows_per_file"}


def _list(settings) -> tuple[list[dict], dict]:
    final = LakePaths(settings.lake.root).screening(AS_OF)
    manifest = read_manifest(final)
    return read_partition(final).to_pylist(), manifest


def _same_list(ours: tuple[list[dict], dict], full: tuple[list[dict], dict]) -> None:
    rows, manifest = ours
    full_rows, full_manifest = full
    assert rows == full_rows, "same patients, heads, scores, ranks and provenance, in the same order"
    keys = (set(manifest) | set(full_manifest)) - WRITE_FIELDS
    assert {k: manifest.get(k) for k in keys} == {k: full_manifest.get(k) for k in keys}


def _score_then_rebuild(settings, run_id: str | None = None, **kwargs) -> tuple[tuple, tuple, dict]:
    run_dir = emr.score(settings, AS_OF, fragment_rows=64, run_id=run_id, **kwargs)
    ours = _list(settings)
    ledger = json.loads((run_dir / "ledger.json").read_text())["stages"]["screening"]
    # The same list from the committed scores alone: every score and every timeline read.
    _, full_ledger = screening.build(settings, AS_OF, run_dir.name)
    assert ledger == full_ledger.to_dict()
    return ours, _list(settings), ledger


@pytest.mark.parametrize("criterion, encounters_column", [
    ({"scoring.screening_thresholds": {"t2d": 0.15, "ckd": 0.02, "hf": 0.3}}, True),
    ({"scoring.screening_top_k": 9}, True),
    # A partition from before the features job counted encounters: both ways count the tokens.
    ({"scoring.screening_top_k": 9}, False)], ids=["thresholds", "top_k", "top_k_counted_from_tokens"])
def test_the_list_from_fragment_candidates_equals_the_list_from_every_score(scoring_settings, criterion,
                                                                            encounters_column):
    settings = scoring_settings(**criterion)
    # Children, empty timelines, the already diagnosed and quarantined rows: every rule has work.
    timelines = random_timelines(N, seed=21, bad_rows=True, min_age_years=5)
    if not encounters_column:
        timelines = timelines.drop_columns(["encounters"])
    commit_timelines(settings.lake.root, AS_OF, timelines)
    ours, full, ledger = _score_then_rebuild(settings)
    rows, manifest = ours
    assert manifest["built_from"]["source"] == "fragment candidates"
    assert full[1]["built_from"]["source"] == "every score"
    # The driver read only the candidates, fewer than the scored patients.
    assert rows and manifest["built_from"]["candidate_rows"] < ledger["records_in"]
    assert ledger["balanced"] and ledger["ignored"]["excluded_prevalent"] > 0
    assert ledger["ignored"]["outside_age_range"] > 0 and ledger["ignored"]["no_encounter_in_lookback"] > 0
    _same_list(ours, full)


def test_fragments_resumed_from_a_run_under_other_criteria_are_screened_from_their_files(scoring_settings):
    before = scoring_settings(**{"scoring.screening_top_k": 3})
    commit_timelines(before.lake.root, AS_OF, random_timelines(N, seed=22, min_age_years=5))

    def crash_after_three(fragment: int, done: int) -> None:
        if done == 3:
            raise KeyboardInterrupt("simulated driver crash")

    with pytest.raises(KeyboardInterrupt):
        emr.score(before, AS_OF, run_id="run-resumed", fragment_rows=64, on_fragment_done=crash_after_three)
    # Resumed with another k: the three fragments staged under k=3 cannot serve a top 12.
    after = before.model_copy(update={"scoring": before.scoring.model_copy(update={"screening_top_k": 12})})
    ours, full, _ = _score_then_rebuild(after, run_id="run-resumed")
    assert ours[1]["built_from"]["source"] == "fragment candidates"
    assert sum(1 for r in ours[0] if r["head"] == "t2d") == 12
    _same_list(ours, full)
