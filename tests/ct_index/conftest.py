"""CT index fixtures: tiny synthetic DICOM studies written once per session, and one indexed lake."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ct_index_cases import index_folder


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small synthetic studies (48×48) with every series kind and planted broken files."""
    from synth.ct import generate

    out = tmp_path_factory.mktemp("synth_ct")
    generate(out, studies=2, seed=11, rows=48, slices=20, variable_spacing=True, gantry_tilt=True)
    return out


@pytest.fixture(scope="session")
def truth(synth_dir: Path) -> dict[str, Any]:
    return json.loads((synth_dir / "ground_truth.json").read_text())


@pytest.fixture(scope="session")
def indexed(spark, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The synthetic studies indexed once on the shared local Spark session."""
    return index_folder(spark, synth_dir, tmp_path_factory.mktemp("ct_lake"))
