"""The as-of population: deaths and observation periods from real-shaped exports decide who gets a timeline.

Two hand-written exports under tests/fixtures/emr/ (a Synthea-style FHIR Bulk
export with ``deceasedDateTime``, ``deceasedBoolean`` + ``meta.lastUpdated`` and
MR identifiers; an OMOP CDM 5.4 extract with ``death`` and
``observation_period``) go through the real ingest and features jobs. Who is
in, who is out and why, and each label, are written out below from the
fixtures by hand; the pure rules must agree with Spark row for row, there and
on random inputs.
"""
from __future__ import annotations

import datetime as dt
import random
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from emr_features_data import random_inputs, write_inputs

from conf.settings import load_settings
from lake.keys import mrn_key, pseudonymise
from lake.paths import LakePaths
from lake.schemas import OBSERVATION_PERIODS
from preprocessing.timelines import censor_date, population_status, timelines_table

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "emr"
KEY = "population-tests-key-0001-not-secret"
AS_OF = dt.date(2024, 3, 31)
LOOKBACK, MAX_TOKENS, HORIZON = 400, 16, 365
FHIR_IDS = {name: f"5f0c8a2e-1b1d-4d6e-9a3f-0a1b2c3d4e0{name[1]}" for name in
            ("p1", "p2", "p3", "p4", "p5", "p7", "p8")}


def _key(source_id: str) -> str:
    return pseudonymise(KEY.encode(), source_id)


def _read(path: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f, partitioning=None) for f in sorted(Path(path).glob("*.parquet"))])


def _settings(lake: Path, **extra: Any):
    return load_settings({"lake.root": str(lake), "spark.master": "local[2]", "spark.shuffle_partitions": 2,
                          "features.lookback_days": LOOKBACK, "features.max_tokens": MAX_TOKENS,
                          "features.horizon_days": HORIZON, **extra})


def _ingest_and_build(spark, tmp_path_factory, fmt: str) -> dict[str, Any]:
    from jobs import emr_features, emr_ingest

    lake = tmp_path_factory.mktemp(f"population_{fmt}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDSCREEN_PSEUDONYM_KEY", KEY)
        settings = _settings(lake)
        ingest = emr_ingest.run(settings, FIXTURES / f"{fmt}_population", fmt)
        summary = emr_features.run(settings, AS_OF.isoformat(), with_labels=True, run_id=f"features-{fmt}")
    paths = LakePaths(lake)
    return {"lake": lake, "ingest": ingest, "summary": summary,
            "rows": {r["patient_key"]: r for r in _read(paths.timelines(AS_OF)).to_pylist()},
            "events": _read(paths.events), "patients": _read(paths.patients),
            "periods": _read(paths.observation_periods)}


@pytest.fixture(scope="module")
def fhir(spark, tmp_path_factory) -> dict[str, Any]:
    return _ingest_and_build(spark, tmp_path_factory, "fhir")


@pytest.fixture(scope="module")
def omop(spark, tmp_path_factory) -> dict[str, Any]:
    return _ingest_and_build(spark, tmp_path_factory, "omop")


def test_fhir_deaths_mrns_and_registration_reach_the_lake(fhir) -> None:
    patients = {r["patient_key"]: r for r in fhir["patients"].to_pylist()}
    k = {name: _key(pid) for name, pid in FHIR_IDS.items()}
    # 2022-11-14T08:30-05:00 is 13:30 UTC the same day; deceasedBoolean takes meta.lastUpdated.
    assert patients[k["p2"]]["death_date"] == dt.date(2022, 11, 14)
    assert patients[k["p3"]]["death_date"] == dt.date(2023, 5, 2)
    assert patients[k["p5"]]["death_date"] == dt.date(2024, 6, 1)
    assert patients[k["p1"]]["death_date"] is None and patients[k["p4"]]["death_date"] is None
    assert patients[k["p1"]]["mrn_key"] == mrn_key(KEY.encode(), "MRN-1001")
    assert patients[k["p1"]]["mrn_key"] != _key("MRN-1001"), "MRNs are hashed in their own namespace"
    # Registration: the first record known (p1's 2015-06-01 encounter); p7 has no record at all.
    starts = {r["patient_key"]: (r["start_date"], r["end_date"], r["source"]) for r in fhir["periods"].to_pylist()}
    assert starts[k["p1"]] == (dt.date(2015, 6, 1), None, "fhir_first_record")
    assert starts[k["p4"]][0] == dt.date(2024, 5, 10)
    assert k["p7"] not in starts
    stage = fhir["ingest"]["counts"]["emr_ingest.observation_periods"]
    assert stage["balanced"] and stage["records_out"] == 6


def test_fhir_only_the_living_registered_get_timelines(fhir) -> None:
    k = {name: _key(pid) for name, pid in FHIR_IDS.items()}
    assert set(fhir["rows"]) == {k["p1"], k["p5"], k["p8"]}
    assert fhir["summary"]["patients_ignored"] == {"deceased": 2, "not_yet_registered": 2}
    assert fhir["summary"]["not_in_population"] == {"deceased": 2, "not_yet_registered": 2,
                                                    "not_under_observation": 0}
    assert fhir["rows"][k["p1"]]["length"] == 1  # the 2024-01-10 encounter; 2015 is before the lookback


def test_fhir_labels_are_censored_at_death(fhir) -> None:
    k = {name: _key(pid) for name, pid in FHIR_IDS.items()}
    labels = {name: tuple(fhir["rows"][k[name]][f"label_{h}"] for h in ("t2d", "ckd", "hf"))
              for name in ("p1", "p5", "p8")}
    assert labels["p1"] == (0, 0, 0)          # followed past the horizon, never diagnosed
    assert labels["p5"] == (1, None, None)    # diabetes a month before death; the rest censored
    assert labels["p8"] == (None, None, None)  # a diagnosis dated after death is no evidence


def test_omop_death_and_observation_periods_decide_the_population(omop) -> None:
    k = {pid: _key(str(pid)) for pid in (1, 2, 3, 4, 5, 7, 8)}
    assert set(omop["rows"]) == {k[1], k[5], k[7], k[8]}
    assert omop["summary"]["patients_ignored"] == {"deceased": 1, "not_under_observation": 1,
                                                   "not_yet_registered": 1}
    patients = {r["patient_key"]: r for r in omop["patients"].to_pylist()}
    assert patients[k[2]]["death_date"] == dt.date(2023, 2, 1)
    assert patients[k[7]]["mrn_key"] == patients[k[8]]["mrn_key"] == mrn_key(KEY.encode(), "MRN-2007")
    assert omop["periods"].num_rows == 8
    labels = {pid: tuple(omop["rows"][k[pid]][f"label_{h}"] for h in ("t2d", "ckd", "hf")) for pid in (1, 5, 7)}
    assert labels[1] == (1, 0, 0)
    # Observation ends 2024-09-30: the 2025 diagnosis and visit fall outside it, so no label at all.
    assert labels[5] == (None, None, None)
    assert labels[7] == (None, None, None)    # not followed to the end of the horizon


@pytest.mark.parametrize("which", ["fhir", "omop"])
def test_pure_rules_agree_with_spark_on_the_fixtures(which, request) -> None:
    built = request.getfixturevalue(which)
    expected = timelines_table(built["events"], built["patients"], AS_OF, LOOKBACK, MAX_TOKENS, HORIZON,
                               periods=built["periods"]).to_pylist()
    assert sorted(built["rows"]) == [r["patient_key"] for r in expected]
    for row in expected:
        assert built["rows"][row["patient_key"]] == row


def _random_population(patients: pa.Table, seed: int) -> tuple[pa.Table, pa.Table]:
    """Random deaths and observation periods (gaps, open ends, periods starting after the day)."""
    rng = random.Random(seed)
    day = lambda y0, y1: dt.date(y0, 1, 1) + dt.timedelta(days=rng.randrange((y1 - y0) * 365))  # noqa: E731
    deaths, periods = [], []
    for k in patients.column("patient_key").to_pylist():
        deaths.append(day(2023, 2026) if rng.random() < 0.3 else None)
        if k is None:
            continue
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            start = day(2015, 2026)
            end = None if rng.random() < 0.3 else start + dt.timedelta(days=rng.randrange(30, 1500))
            periods.append({"patient_key": k, "start_date": start, "end_date": end, "source": "test"})
    patients = patients.set_column(patients.schema.get_field_index("death_date"), "death_date",
                                   pa.array(deaths, pa.date32()))
    return patients, pa.Table.from_pylist(periods, schema=OBSERVATION_PERIODS)


def test_pure_rules_agree_with_spark_on_random_populations(spark, tmp_path) -> None:
    from emr_features_data import AS_OF as RANDOM_AS_OF
    from emr_features_data import HORIZON_DAYS, LOOKBACK_DAYS, MAX_TOKENS as RANDOM_MAX, features_settings
    from jobs import emr_features

    events, patients, _ = random_inputs(seed=11, n_patients=60)
    patients, periods = _random_population(patients, seed=11)
    write_inputs(tmp_path, events, patients, periods)
    summary = emr_features.run(features_settings(tmp_path), RANDOM_AS_OF.isoformat(), with_labels=True,
                               run_id="random-population")
    got = sorted(_read(Path(summary["output"])).to_pylist(), key=lambda r: r["patient_key"])
    expected = timelines_table(events, patients, RANDOM_AS_OF, LOOKBACK_DAYS, RANDOM_MAX, HORIZON_DAYS,
                               periods=periods).to_pylist()
    assert got == expected
    # Every reason occurs, and the ledger's counts are the pure rule's.
    reasons: dict[str, int] = {}
    spans: dict[str, list] = {}
    for r in periods.to_pylist():
        spans.setdefault(r["patient_key"], []).append((r["start_date"], r["end_date"]))
    counts: dict[Any, int] = {}
    for k in patients.column("patient_key").to_pylist():
        counts[k] = counts.get(k, 0) + 1
    for p in patients.to_pylist():
        k, birth = p["patient_key"], p["birth_date"]
        if k is None or counts[k] > 1 or birth is None or birth > RANDOM_AS_OF:
            continue
        why = population_status(p["death_date"], spans.get(k, []), RANDOM_AS_OF)
        if why:
            reasons[why] = reasons.get(why, 0) + 1
    assert set(reasons) == {"deceased", "not_yet_registered", "not_under_observation"}
    assert {r: summary["patients_ignored"].get(r, 0) for r in reasons} == reasons


def test_population_and_censoring_rules_at_their_edges() -> None:
    d = dt.date(2024, 3, 31)
    assert population_status(d, [(dt.date(2020, 1, 1), None)], d) == "deceased"       # dies on the day
    assert population_status(d + dt.timedelta(days=1), [(dt.date(2020, 1, 1), None)], d) is None
    assert population_status(None, [(d, d)], d) is None                                 # one-day period
    assert population_status(None, [(d + dt.timedelta(days=1), None)], d) == "not_yet_registered"
    assert population_status(None, [], d) == "not_yet_registered"
    assert population_status(None, [(dt.date(2020, 1, 1), d - dt.timedelta(days=1))], d) == "not_under_observation"
    # Censoring: the earlier of death and the covering period's end; an open period never censors.
    assert censor_date(None, [(dt.date(2020, 1, 1), None)], d) is None
    assert censor_date(dt.date(2024, 9, 1), [(dt.date(2020, 1, 1), dt.date(2025, 1, 1))], d) == dt.date(2024, 9, 1)
    assert censor_date(None, [(dt.date(2020, 1, 1), dt.date(2024, 5, 1)),
                              (dt.date(2023, 1, 1), dt.date(2024, 8, 1))], d) == dt.date(2024, 8, 1)
    assert censor_date(None, [(dt.date(2020, 1, 1), dt.date(2024, 5, 1)), (dt.date(2023, 1, 1), None)], d) is None
