"""Fixtures of the EMR features tests."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from emr_features_data import random_inputs, write_inputs


@pytest.fixture(scope="module")
def emr_lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table, pa.Table, dict]:
    """A lake with committed random events + patients (module-wide: tests read, never write inputs)."""
    root = tmp_path_factory.mktemp("emr_lake")
    events, patients, facts = random_inputs()
    write_inputs(root, events, patients)
    return root, events, patients, facts
