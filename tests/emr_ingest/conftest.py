"""EMR ingest fixtures: the hand-written exports, a parse context, and ingested lakes (once per session)."""
from __future__ import annotations

from typing import Any

import pytest
from emr_ingest_support import FIXTURES, ingest, make_ctx

from preprocessing.emr_record import ParseContext


@pytest.fixture(scope="session")
def ctx() -> ParseContext:
    return make_ctx()


@pytest.fixture(scope="session")
def fhir_ingest(spark, tmp_path_factory) -> dict[str, Any]:
    """The hand-written FHIR export ingested twice into one lake (the second run replaces)."""
    return ingest(spark, tmp_path_factory, "fhir", FIXTURES / "fhir", runs=2)


@pytest.fixture(scope="session")
def omop_ingest(spark, tmp_path_factory) -> dict[str, Any]:
    return ingest(spark, tmp_path_factory, "omop", FIXTURES / "omop")
