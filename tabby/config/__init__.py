"""tabby's configuration: a frozen attrs tree loaded from ``tabby.toml``.

Precedence, lowest first: built-in defaults, the TOML file (``--config PATH`` or
``./tabby.toml``), ``TABBY_<SECTION>_<KEY>`` environment variables, CLI flags.
See :func:`load_config`. The config object is passed to whoever needs it; nothing
imports a global one.
"""

from __future__ import annotations

from tabby.config.errors import ConfigError
from tabby.config.export import export_config
from tabby.config.loader import (
    DEFAULT_CONFIG_NAME,
    load_config,
    structure_config,
    structure_load_settings,
)
from tabby.config.model_settings import merge_model_settings
from tabby.config.schema import (
    LOAD_KEYS,
    UNSET,
    DeveloperConfig,
    DraftModelConfig,
    EmbeddingsConfig,
    LoggingConfig,
    LoraConfig,
    LoraEntry,
    ModelConfigSection,
    ModelDefaults,
    ModelSettings,
    NetworkConfig,
    SamplingConfig,
    TabbyConfig,
    Unset,
)
from tabby.config.sources import SHORT_FLAGS, CliOverrides, parse_cli_overrides
from tabby.config.tomlio import edit_toml, read_toml, write_toml_atomic

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "LOAD_KEYS",
    "SHORT_FLAGS",
    "UNSET",
    "CliOverrides",
    "ConfigError",
    "DeveloperConfig",
    "DraftModelConfig",
    "EmbeddingsConfig",
    "LoggingConfig",
    "LoraConfig",
    "LoraEntry",
    "ModelConfigSection",
    "ModelDefaults",
    "ModelSettings",
    "NetworkConfig",
    "SamplingConfig",
    "TabbyConfig",
    "Unset",
    "edit_toml",
    "export_config",
    "load_config",
    "merge_model_settings",
    "parse_cli_overrides",
    "read_toml",
    "structure_config",
    "structure_load_settings",
    "write_toml_atomic",
]
