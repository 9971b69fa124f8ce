"""Configuration: defaults.yaml, code groups, model cards and the settings model."""
from conf.settings import ConfigError, Settings, load_settings

__all__ = ["ConfigError", "Settings", "load_settings"]
