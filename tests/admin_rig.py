"""Shared setup of the admin route tests: a temp model_dir with tiny real models, LoRA and
draft folders, the repo's templates and presets, and an SSE reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tabby.config import TabbyConfig
from tabby.config.loader import structure_config
from tabby.testing.tiny import make_tiny_hf

REPO = Path(__file__).resolve().parents[1]
MODELS = ("tiny", "tiny2")


def admin_config(tmp_path: Path, *, model_name: str = "tiny", **sections: Any) -> TabbyConfig:
    """Two tiny models (``tiny`` loaded at startup unless ``model_name`` says otherwise),
    a LoRA folder ``style`` and a draft model folder ``draft``; ``sections`` update the
    ``[model]`` and ``[network]`` tables."""
    models = tmp_path / "models"
    if not models.exists():
        make_tiny_hf(models / "tiny")
        make_tiny_hf(models / "tiny2", seed=1)
        (tmp_path / "loras" / "style").mkdir(parents=True)
        (tmp_path / "drafts" / "draft").mkdir(parents=True)
        (tmp_path / "drafts" / "draft" / "config.json").write_text("{}")
    values: dict[str, Any] = {
        "network": {"host": "127.0.0.1", "port": 0, "shutdown_grace": 1.0,
                    **sections.pop("network", {})},
        "model": {
            "model_dir": str(models),
            "model_name": model_name,
            "templates_dir": str(REPO / "templates"),
            "max_seq_len": 256,
            "cache_size": 1024,
            **sections.pop("model", {}),
        },
        "sampling": {"override_preset": "", "overrides_dir": str(REPO / "sampler_overrides")},
        "lora": {"lora_dir": str(tmp_path / "loras")},
        "draft_model": {"draft_model_dir": str(tmp_path / "drafts")},
    }
    assert not sections, f"unknown sections {sorted(sections)}"
    return structure_config(values, base_dir=tmp_path)


async def sse_events(response: httpx.Response) -> list[Any]:
    """Every ``data:`` payload of an SSE response, JSON-decoded, until it ends."""
    events: list[Any] = []
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line[len("data: "):]))
    return events
