"""Every stage refuses to read a partition written with another pseudonymisation key.

Partitions are committed for real (lake.commit) with manifests that carry the
fingerprint of key A; each stage then runs with key B and must stop at its
entry with LakeKeyMismatch naming the partition, writing nothing. The lake
record (_pseudonym_key.json) is absent, so the refusal comes from the
manifests themselves; a last case binds the lake and clears the manifests'
fields, and the lake's record refuses alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conf.settings import load_settings
from lake.commit import atomic_partition, version_of
from lake.keys import KEY_FIELD, LakeKeyMismatch, bind_lake, key_fingerprint
from lake.paths import LakePaths
from lake.schemas import TIMELINES

AS_OF = "2024-06-30"
KEY_A = "key-a-written-the-lake-with-this-one-0001"
KEY_B = "key-b-configured-now-a-different-key-0002"
FP_A = key_fingerprint(KEY_A.encode())


def commit_with_key(final: Path, fingerprint: str | None, schema: pa.Schema | None = None) -> None:
    """An empty partition of ``schema`` (default: patient_key only) whose manifest names ``fingerprint``."""
    manifest: dict = {"run_id": "written-with-key-a"}
    if fingerprint is not None:
        manifest[KEY_FIELD] = fingerprint
    schema = schema or pa.schema([("patient_key", pa.string())])
    with atomic_partition(final, manifest) as staging:
        pq.write_table(schema.empty_table(), staging / "part-00000.parquet")


@pytest.fixture
def lake_a(tmp_path: Path, monkeypatch) -> LakePaths:
    """A lake whose every stage input was written with key A; key B configured."""
    lake = LakePaths(tmp_path / "lake")
    for final in (lake.events, lake.patients, lake.observation_periods, lake.dicom_series, lake.imaging_link,
                  lake.scores("emr_risk", AS_OF), lake.screening(AS_OF), lake.findings("ct_nodule", AS_OF)):
        commit_with_key(final, FP_A)
    # Scoring checks the timelines' columns first (in seconds, before any lock): give it real ones.
    commit_with_key(lake.timelines(AS_OF), FP_A, TIMELINES)
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY_B)
    return lake


def settings_for(lake: LakePaths):
    return load_settings({"lake.root": str(lake.root), "spark.master": "local[2]"})


def refused(partition: str):
    return pytest.raises(LakeKeyMismatch, match=f"{partition}.* written with the pseudonym key of fingerprint "
                                                 f"{FP_A}")


def test_every_stage_refuses_inputs_written_with_another_key(lake_a: LakePaths) -> None:
    from inference import cohort, ct, emr, screening, worklist
    from jobs import emr_features, imaging_link

    settings = settings_for(lake_a)
    written = (lake_a.timelines(AS_OF), lake_a.imaging_link, lake_a.scores("emr_risk", AS_OF),
               lake_a.screening(AS_OF), lake_a.findings("ct_nodule", AS_OF))
    versions_before = [version_of(p) for p in written]
    with refused("emr/events"):
        emr_features.run(settings, AS_OF)
    with refused("imaging/series"):
        imaging_link.run(settings)
    with refused(f"emr/timelines/as_of={AS_OF}"):
        emr.score(settings, AS_OF, run_id="key-b-scoring")
    with refused("scores version"):
        screening.build(settings, AS_OF, run_id="key-b-screening")
    with refused("imaging/series"):
        ct.score(settings, AS_OF, run_id="key-b-ct")
    definition = cohort.CohortDefinition(name="key_check", include_groups=["t2d"], index_start=AS_OF,
                                         index_end=AS_OF, models=["emr_risk"])
    with refused("emr/events"):
        cohort.write_index_date(lake_a.root, definition, AS_OF, pseudonym=settings.pseudonym)
    with refused(f"screening/as_of={AS_OF}"):
        worklist.build(lake_a.root, AS_OF, pseudonym=settings.pseudonym)
    # Nothing written: every partition a stage would have replaced is the version key A wrote,
    # no new output exists, and no stage left a run directory.
    assert [version_of(p) for p in written] == versions_before
    for out in (lake_a.worklist(AS_OF), lake_a.cohort("key_check")):
        assert not out.exists(), out
    assert not (lake_a.root / "runs").exists()


def test_a_lake_bound_to_another_key_is_refused_even_where_manifests_say_nothing(tmp_path, monkeypatch) -> None:
    from inference import screening

    lake = LakePaths(tmp_path / "lake")
    commit_with_key(lake.scores("emr_risk", AS_OF), None)
    bind_lake(lake.root, FP_A)
    monkeypatch.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY_B)
    with pytest.raises(LakeKeyMismatch, match=f"lake {lake.root} was written with .* fingerprint {FP_A}"):
        screening.build(settings_for(lake), AS_OF, run_id="key-b")
    assert json.loads((lake.root / "_pseudonym_key.json").read_text())[KEY_FIELD] == FP_A
