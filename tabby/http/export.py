"""``tabby export-openapi``: the OpenAPI document of the app a config would serve.

It builds the app offline (no actor starts: blueprint factories only capture the
handles, so placeholders do) and writes :func:`tabby.http.openapi.app_document` of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, cast

from tabby.config import ConfigError, TabbyConfig
from tabby.config.loader import load_config
from tabby.http.app import create_app
from tabby.http.openapi import app_document
from tabby.http.services import Services

__all__ = ["export_openapi_command", "offline_document"]


def offline_document(config: TabbyConfig) -> dict[str, Any]:
    """The document of the app ``config`` would serve, without starting any actor."""
    services = Services(config=config, auth=cast(Any, None), health=cast(Any, None))
    return app_document(create_app(services))


def export_openapi_command(args: list[str]) -> int:
    """``tabby export-openapi [--output PATH] [--config PATH] [config flags]``.

    Config flags work as for ``tabby serve`` (``--api-servers OAI Kobold`` selects the
    API families, as the server would mount them).
    """
    parser = argparse.ArgumentParser(
        prog="tabby export-openapi",
        description="Print (or write) the OpenAPI document of the server's HTTP API; "
        "other arguments are config flags, as for tabby serve.",
    )
    parser.add_argument("--output", type=Path, help="write to this file instead of stdout")
    ns, config_args = parser.parse_known_args(args)
    try:
        config = load_config(cli_args=config_args)
    except ConfigError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    text = json.dumps(offline_document(config), indent=2, ensure_ascii=False) + "\n"
    if ns.output is None:
        sys.stdout.write(text)
    else:
        ns.output.write_text(text, encoding="utf-8")
    return 0
