"""The one exception of configuration loading."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ConfigError"]


class ConfigError(Exception):
    """Every problem found in the configuration, one line each.

    Each line names its source (``tabby.toml:12``, ``env TABBY_NETWORK_PORT``,
    ``flag --port``), the key path and what was expected. The CLI prints the lines
    and exits with status 2.
    """

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines: list[str] = list(lines)
        super().__init__("\n".join(self.lines))
