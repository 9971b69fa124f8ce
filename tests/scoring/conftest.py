"""Fixtures of the scoring tests: test models + card (session), an fp32 engine in a shared cache,
settings on a fresh lake per test, and the session's local Ray."""
from __future__ import annotations

from pathlib import Path

import pytest

from scoring_fixtures import PLATT, build_model, write_card

AS_OF = "2024-06-30"


@pytest.fixture(scope="session")
def scoring_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real ONNX models (good and deliberately broken) plus the good one's model card."""
    root = tmp_path_factory.mktemp("scoring_models")
    models = {mode: build_model(root / f"emr_risk_{mode}.onnx", mode) for mode in
              ("good", "nan", "shift")}
    models["card"] = write_card(models["good"], root / "emr_risk.yaml")
    models["shift_card"] = write_card(models["shift"], root / "emr_risk_shift.yaml")
    models["calibrated_card"] = write_card(models["good"], root / "emr_risk_calibrated.yaml",
                                           calibration=PLATT)
    models["cache"] = root / "engines"
    return models


@pytest.fixture
def scoring_settings(make_settings, scoring_models, ray_local):
    """Factory: settings whose emr_risk card is the test model, with its fp32 engine built and gated."""
    from engines import cache

    def _make(card: str = "card", **overrides):
        settings = make_settings(**{"models": {"emr_risk": str(scoring_models[card])},
                                    "engines.cache_dir": str(scoring_models["cache"] / card),
                                    "ray.actor_num_cpus": 0.5, "scoring.token_budget": 2048,
                                    **overrides})
        cache.ensure(settings, precision="fp32")
        return settings

    return _make
