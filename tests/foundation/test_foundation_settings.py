"""Configuration: defaults, environment overrides, CLI precedence, one clear message per bad key."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conf.settings import ConfigError, load_settings


def test_defaults_load():
    s = load_settings()
    assert s.spark.master == "local[2]"
    assert s.features.max_tokens == 256
    assert s.inputs.emr_format == "fhir"


def test_token_budget_unset_is_the_devices_and_a_set_one_wins_everywhere():
    unset = load_settings()
    assert unset.scoring.token_budget is None
    assert (unset.scoring.token_budget_for(gpu=True), unset.scoring.token_budget_for(gpu=False)) == (262_144, 65_536)
    assert unset.on_device(True).scoring.token_budget == 262_144
    assert unset.on_device(False).scoring.token_budget == 65_536
    chosen = load_settings({"scoring.token_budget": 32_768})
    assert chosen.on_device(True).scoring.token_budget == chosen.on_device(False).scoring.token_budget == 32_768


def test_env_overrides_yaml_and_flags_override_env(monkeypatch):
    monkeypatch.setenv("MEDSCREEN_LAKE__ROOT", "/data/lake-from-env")
    monkeypatch.setenv("MEDSCREEN_FEATURES__LOOKBACK_DAYS", "30")
    s = load_settings()
    assert str(s.lake.root) == "/data/lake-from-env" and s.features.lookback_days == 30
    s = load_settings({"lake.root": "/data/from-flag", "features.lookback_days": None})
    assert str(s.lake.root) == "/data/from-flag" and s.features.lookback_days == 30


def test_bad_value_names_key_env_var_and_allowed_values(monkeypatch):
    monkeypatch.setenv("MEDSCREEN_INPUTS__EMR_FORMAT", "hl7v2")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    msg = str(exc.value)
    assert "inputs.emr_format" in msg and "MEDSCREEN_INPUTS__EMR_FORMAT" in msg
    assert "'fhir' or 'omop'" in msg and "hl7v2" in msg


def test_unknown_key_is_rejected(monkeypatch, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spark:\n  mastr: local[4]\n")
    monkeypatch.setenv("MEDSCREEN_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match="spark.mastr"):
        load_settings()


def test_cli_reports_config_error_in_one_message(tmp_path):
    env = {"MEDSCREEN_FEATURES__MAX_TOKENS": "not-a-number", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "medscreen", "emr", "features", "--as-of",
                          "2024-06-30", "--lake", str(tmp_path)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "features.max_tokens" in out.stderr and "Traceback" not in out.stderr
