"""Synthetic EMR fixtures: small exports generated once per test session."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from synth.emr import generate

SEED = 11


@pytest.fixture(scope="session")
def fhir_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A 400-patient FHIR export with 5 % bad records (enough of every kind to count)."""
    out = tmp_path_factory.mktemp("synth") / "fhir"
    return out, generate(out, patients=400, seed=SEED, bad_share=0.05, fmt="fhir")


@pytest.fixture(scope="session")
def clean_fhir_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A 1500-patient export without bad records: big enough to see the planted signal."""
    out = tmp_path_factory.mktemp("synth") / "fhir_clean"
    return out, generate(out, patients=1500, seed=SEED, bad_share=0.0, fmt="fhir")


@pytest.fixture(scope="session")
def omop_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The same 400 patients as ``fhir_export``, as OMOP CDM tables."""
    out = tmp_path_factory.mktemp("synth") / "omop"
    return out, generate(out, patients=400, seed=SEED, bad_share=0.05, fmt="omop")
