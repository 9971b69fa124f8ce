"""Cohort definition and point-in-time member selection (inference.cohort) on tiny hand-made tables."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lake import schemas
from lake.commit import atomic_partition, is_committed, read_manifest
from lake.keys import key_fingerprint
from lake.paths import LakePaths
from inference import cohort

GROUPS = ["ckd", "heart_failure", "hypertension", "t2d"]
UTC = dt.timezone.utc


def _params(**over):
    p = {"cohort_name": "t2d-no-ckd", "include_groups": ["t2d"], "exclude_groups": ["ckd"],
         "age_min_years": 40, "age_max_years": 80, "index_start": "2024-01-31",
         "index_end": "2024-03-31", "step_days": 30, "models": ["emr_risk"]}
    p.update(over)
    return p


def _event(key: str, when: dt.datetime, groups: list[str], assertion: str = "affirmed",
           kind: str = "dx", known: dt.datetime | None = None) -> dict:
    return {"patient_key": key, "event_time": when, "known_time": known or when, "kind": kind,
            "code_system": "icd10cm", "code": "E11.9", "value": None, "unit": None, "assertion": assertion,
            "code_groups": groups, "source": "fhir", "source_ref": "r"}


@pytest.fixture
def lake(tmp_path: Path) -> Path:
    """Five patients whose membership at 2024-02-01 / 2024-03-31 is known by construction."""
    root = tmp_path / "lake"
    lp = LakePaths(root)
    t = lambda y, m, d, h=12: dt.datetime(y, m, d, h, tzinfo=UTC)  # noqa: E731
    events = [
        _event("a" * 32, t(2020, 5, 1), ["diabetes", "t2d"]),          # in from the start
        _event("b" * 32, t(2024, 3, 1), ["t2d"]),                      # in only from March
        _event("c" * 32, t(2019, 1, 1), ["t2d"]),
        _event("c" * 32, t(2024, 2, 15), ["ckd"]),                     # excluded from Feb 15
        _event("d" * 32, t(2020, 1, 1), ["t2d"], assertion="negated"),  # never affirmed
        _event("e" * 32, t(2020, 1, 1), ["t2d"], kind="dx_text"),      # in, but too young
        _event("a" * 32, t(2024, 2, 1, 23), ["hypertension"]),
        # f: a SNOMED-coded T2D resolved long ago (history) counts; g: T2D with an onset in 2019
        # only recorded in March 2024 is not known on Feb 1; h: a provisional T2D never counts.
        {**_event("f" * 32, t(2019, 6, 1), ["diabetes", "t2d"], assertion="history"),
         "code_system": "snomed", "code": "44054006"},
        _event("g" * 32, t(2019, 6, 1), ["t2d"], known=t(2024, 3, 2)),
        _event("h" * 32, t(2019, 6, 1), ["t2d"], assertion="possible"),
    ]
    with atomic_partition(lp.events) as staging:
        pq.write_table(pa.Table.from_pylist(events, schema=schemas.EVENTS), staging / "part-0.parquet")
    patients = [{"patient_key": k * 32, "birth_date": b, "sex": s, "source": "fhir"}
                for k, b, s in (("a", dt.date(1960, 1, 1), "F"), ("b", dt.date(1950, 6, 1), "M"),
                                ("c", dt.date(1970, 1, 1), "F"), ("d", dt.date(1960, 1, 1), "M"),
                                ("e", dt.date(1990, 1, 1), "U"), ("f", dt.date(1955, 1, 1), "F"),
                                ("g", dt.date(1955, 1, 1), "M"), ("h", dt.date(1955, 1, 1), "F"))]
    with atomic_partition(lp.patients) as staging:
        pq.write_table(pa.Table.from_pylist(patients, schema=schemas.PATIENTS), staging / "part-0.parquet")
    return root


def test_definition_validates_every_field_and_names_the_bad_one() -> None:
    d = cohort.define_cohort(_params(), GROUPS)
    assert d.index_dates() == ["2024-01-31", "2024-03-01", "2024-03-31"]
    with pytest.raises(cohort.CohortDefinitionError) as err:
        cohort.define_cohort(_params(cohort_name="Bad Name!", include_groups=["nope"],
                                     age_min_years=90, age_max_years=10,
                                     index_start="2024-05-01", index_end="2024-01-01"), GROUPS)
    msg = str(err.value)
    for needle in ("cohort_name", "unknown code group(s) ['nope']", "age range", "before index_start"):
        assert needle in msg
    with pytest.raises(cohort.CohortDefinitionError, match="both included and excluded"):
        cohort.define_cohort(_params(exclude_groups=["t2d"]), GROUPS)
    with pytest.raises(cohort.CohortDefinitionError, match="at most"):
        cohort.define_cohort(_params(index_start="2000-01-01", index_end="2024-01-01", step_days=1),
                             GROUPS)


def test_code_group_names_come_from_conf() -> None:
    from conf.settings import load_settings

    names = cohort.code_group_names(load_settings().extraction.code_groups_file)
    assert {"t2d", "ckd"} <= set(names)


def test_selection_is_point_in_time(lake: Path) -> None:
    d = cohort.define_cohort(_params(), GROUPS)
    feb = cohort.select_members(lake, d, "2024-02-01").column("patient_key").to_pylist()
    # b's diagnosis is in March; c's exclusion is after Feb 1; d negated; e aged 34; g's recorded
    # only in March; h's only possible.
    assert feb == ["a" * 32, "c" * 32, "f" * 32]
    mar = cohort.select_members(lake, d, "2024-03-31").column("patient_key").to_pylist()
    assert mar == ["a" * 32, "b" * 32, "f" * 32, "g" * 32]
    # An event late on the index day (23:00 UTC) counts for that day.
    htn = cohort.define_cohort(_params(include_groups=["hypertension"], exclude_groups=[]), GROUPS)
    assert cohort.select_members(lake, htn, "2024-02-01").num_rows == 1
    assert cohort.select_members(lake, htn, "2024-01-31").num_rows == 0


def test_index_date_partition_joins_scores_and_stores_definition(lake: Path, _pseudonym_key: str) -> None:
    d = cohort.define_cohort(_params(), GROUPS)
    cohort.store_definition(lake, d)
    lp = LakePaths(lake)
    scores = pa.Table.from_pylist([
        {"patient_key": k * 32, "as_of": dt.date(2024, 2, 1), "model": "emr_risk", "model_version": "1",
         "engine_fingerprint": "f", "precision": "fp32", "run_id": "r1", "score_t2d": p,
         "score_ckd": p, "score_hf": p} for k, p in (("a", 0.9), ("b", 0.1), ("d", 0.5))],
        schema=schemas.SCORES)
    with atomic_partition(lp.scores("emr_risk", "2024-02-01"), {"run_id": "r1"}) as staging:
        pq.write_table(scores, staging / "part-0.parquet")
    counts = cohort.write_index_date(lake, d, "2024-02-01")
    assert counts == {"index_date": "2024-02-01", "members": 3, "members_scored": 1}  # a, c, f
    part = lp.cohort(d.name) / "index_date=2024-02-01"
    assert is_committed(part)
    # The cohort's manifest names the key its members' pseudonyms were made with.
    assert read_manifest(part)["key_fingerprint"] == key_fingerprint(_pseudonym_key.encode())
    members = pq.read_table(part / "members.parquet").to_pylist()
    assert [(m["patient_key"][0], m["score_t2d"]) for m in members] == [("a", pytest.approx(0.9)),
                                                                       ("c", None), ("f", None)]
    assert json.loads((lp.cohort(d.name) / "definition.json").read_text())["include_groups"] == ["t2d"]
    # Same name, different definition: refused unless replace is asked for.
    other = cohort.define_cohort(_params(age_min_years=50), GROUPS)
    with pytest.raises(cohort.CohortDefinitionError, match="already exists"):
        cohort.store_definition(lake, other)
    cohort.store_definition(lake, other, replace=True)
    assert not part.exists()


def test_missing_scores_fail_with_the_task_to_run(lake: Path) -> None:
    d = cohort.define_cohort(_params(), GROUPS)
    with pytest.raises(FileNotFoundError, match="score_emr"):
        cohort.write_index_date(lake, d, "2024-02-01")
