"""Every kind of bad input in tests/fixtures/bad/ gets its documented outcome — a quarantine or
ignore reason, a DICOM verdict, or an error naming the problem — with no crash and a balanced ledger;
the test writes the kind → outcome table to docs/bad_inputs.md.

Records go through the parsers the ingest job runs in its Spark tasks (FHIR lines, OMOP rows read
from CSV and Parquet the way the job reads them: every field a string, empty = null), DICOM files
through the index's header reader and series judge, configuration through the settings loader.
"""
from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conf.settings import ConfigError, ExtractionSettings, load_settings
from lake.ledger import StageLedger
from preprocessing.code_groups import load_code_groups
from preprocessing.dicom_header import judge_series, read_instance_header
from preprocessing.emr_record import ParseContext, parse_datetime_us
from preprocessing.fhir import parse_fhir_line
from preprocessing.notes import NoteExtractor
from preprocessing.omop import parse_omop_row

REPO = Path(__file__).resolve().parents[2]
BAD = REPO / "tests" / "fixtures" / "bad"
CASES = json.loads((BAD / "cases.json").read_text())
TABLE = REPO / "docs" / "bad_inputs.md"
EXPORT_US = parse_datetime_us("2024-01-01T00:00:00Z")
MIN_SLICES = 16
OUTCOMES: dict[str, str] = {}


@pytest.fixture(scope="module")
def ctx() -> ParseContext:
    ex = ExtractionSettings()
    return ParseContext(key=b"bad-corpus-key-not-secret-01", extractor=NoteExtractor.from_settings(ex),
                        groups=load_code_groups(ex.code_groups_file), now_us=EXPORT_US)


def _ledger(kind: str, records) -> StageLedger:
    outcomes = Counter((r.status, r.reason) for r in records)
    ledger = StageLedger(kind, records_in=len(records), records_out=outcomes.pop(("ok", None), 0))
    for (status, reason), n in outcomes.items():
        bucket = ledger.quarantined if status == "quarantine" else ledger.ignored
        bucket[reason] = bucket.get(reason, 0) + n
    return ledger.check()


def _omop_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as fh:
            return [{k: (v if v != "" else None) for k, v in row.items()} for row in csv.DictReader(fh)]
    return pq.read_table(path).to_pylist()


def outcome(case: dict, ctx: ParseContext) -> str:
    path = BAD / case["file"]
    area = case["area"]
    if area == "FHIR":
        lines = path.read_text().split("\n")[:-1]
        records = [parse_fhir_line(line, ctx, path.name) for line in lines]
        _ledger(case["kind"], records)
        assert records[0].status == "ok", "the good Patient line beside the bad one must still be read"
        bad = records[1]
        return f"{bad.status}: {bad.reason}"
    if area.startswith("OMOP"):
        table = path.stem
        records = [parse_omop_row(table, row, ctx) for row in _omop_rows(path)]
        _ledger(case["kind"], records)
        (bad,) = records
        return f"{bad.status}: {bad.reason}"
    if area == "DICOM series":
        instances = [read_instance_header(p) for p in sorted(path.glob("*.dcm"))]
        assert not [i for i in instances if "quarantine" in i], "every file of the series is readable"
        return f"verdict: {judge_series(instances, MIN_SLICES, 'correct')['verdict']}"
    if area == "DICOM file":
        return f"file quarantined: {read_instance_header(path).get('quarantine')}"
    if area == "configuration":
        import os

        old = os.environ.get("MEDSCREEN_CONFIG")
        os.environ["MEDSCREEN_CONFIG"] = str(path)
        try:
            load_settings()
        except ConfigError as exc:
            return f"error: {exc}"
        finally:
            if old is None:
                os.environ.pop("MEDSCREEN_CONFIG")
            else:
                os.environ["MEDSCREEN_CONFIG"] = old
        return "accepted"
    raise AssertionError(f"unknown area {area}")


def expected(case: dict) -> str:
    e = case["expect"]
    if "status" in e:
        return f"{e['status']}: {e['reason']}"
    if "verdict" in e:
        return f"verdict: {e['verdict']}"
    if "file_reason" in e:
        return f"file quarantined: {e['file_reason']}"
    return e["error"]


def test_the_corpus_covers_forty_kinds_across_every_source():
    assert len({c["kind"] for c in CASES}) == len(CASES) >= 40
    assert {c["area"] for c in CASES} >= {"FHIR", "OMOP CSV", "OMOP Parquet", "DICOM series", "DICOM file",
                                          "configuration"}
    assert all((BAD / c["file"]).exists() for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["file"] for c in CASES])
def test_each_bad_input_gets_its_documented_outcome(case, ctx):
    got = outcome(case, ctx)
    OUTCOMES[case["kind"]] = got
    want = expected(case)
    if case["area"] == "configuration":
        assert got.startswith("error: ") and want in got, got
    else:
        assert got == want


def test_write_the_outcome_table():
    """Runs after the cases (file order): the table in docs/ is what this run observed."""
    missing = [c["kind"] for c in CASES if c["kind"] not in OUTCOMES]
    assert not missing, f"cases that did not run: {missing}"
    lines = ["# Bad inputs and what the pipeline does with them", "",
             "Written by `tests/trust/test_trust_bad_inputs.py` from the corpus in `tests/fixtures/bad/`",
             "(index: `cases.json`, built by `build_corpus.py`). Records are quarantined or ignored with a",
             "reason code and every ledger balances; DICOM series get a verdict, damaged DICOM files a file",
             "reason; bad configuration stops with an error naming the key or file.", "",
             "| source | kind | file | outcome |", "|---|---|---|---|"]
    for c in CASES:
        # Paths relative to the repository: the table must not carry this checkout's location.
        shown = OUTCOMES[c["kind"]].replace(str(REPO) + "/", "").replace("\n", " ").replace("|", "\\|")
        if len(shown) > 160:
            shown = shown[:157] + "…"
        lines.append(f"| {c['area']} | {c['kind']} ({c['what']}) | `{c['file']}` | {shown} |")
    TABLE.write_text("\n".join(lines) + "\n")
