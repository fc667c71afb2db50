"""The one place where a load's settings are merged, typed.

Precedence, highest first: the load request, the model's own ``tabby_config.toml``,
``[model_defaults]``, ``[model]``. A layer holds only the keys it sets (a request field
left out, or a key missing from a table, does not override anything). Every layer is
checked with the rules of ``[model]``, so a load gets one valid :class:`ModelSettings`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tabby.config.schema import LOAD_KEYS, ModelDefaults, ModelSettings, TabbyConfig
from tabby.config.validation import FieldError
from tabby.errors import InvalidRequest

__all__ = ["merge_model_settings"]

_NO_DEFAULTS = ModelDefaults()


def merge_model_settings(
    config: TabbyConfig,
    model_file: ModelDefaults = _NO_DEFAULTS,
    request: Mapping[str, Any] | None = None,
) -> ModelSettings:
    """request > the model's tabby_config.toml > [model_defaults] > [model].

    ``model_file`` comes validated (see :func:`tabby.config.structure_load_settings`);
    a request value that breaks a rule of ``[model]`` is a 400 naming the field.
    """
    values = {key: getattr(config.model, key) for key in LOAD_KEYS}
    values.update(config.model_defaults.explicit())
    values.update(model_file.explicit())
    values.update((key, value) for key, value in (request or {}).items() if key in LOAD_KEYS)
    # Only request values can break a rule here: the other layers were checked on loading.
    try:
        return ModelSettings(**values)
    except FieldError as exc:
        raise InvalidRequest(f"{exc.field}: {exc.message}", param=exc.field) from None
