"""The ``tabby`` command.

``tabby serve [--config PATH] [config flags]`` (also the default when no subcommand is
given), ``tabby keys [show|add|rotate-admin]``, ``tabby export-config [--output PATH]``,
``tabby download``, ``tabby export-openapi``. Each subcommand is one entry of
:data:`COMMANDS`: a name, a one-line help and a function from its arguments to an exit
code. Configuration problems print one line each to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import trio

from tabby.actors.keyfile import KeyFileError, keys_main
from tabby.actors.keyfile import add_arguments as add_keys_arguments
from tabby.config import ConfigError, TabbyConfig
from tabby.config.export import export_config
from tabby.config.loader import load_config
from tabby.config.tomlio import write_toml_atomic
from tabby.logs import setup_logging

__all__ = ["COMMANDS", "main"]

Command = Callable[[list[str]], int]

EXIT_CONFIG = 2  # invalid configuration or keys file
EXIT_STARTUP = 1  # the server could not start (port taken, ...)


def _print_lines(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)


def _load(cli_args: Sequence[str]) -> TabbyConfig | None:
    try:
        return load_config(cli_args=cli_args)
    except ConfigError as exc:
        _print_lines(exc.lines)
        return None


def serve_command(args: list[str]) -> int:
    """Start the server; every argument is a config flag (see ``tabby.toml``)."""
    if any(arg in ("-h", "--help") for arg in args):
        print("usage: tabby serve [--config PATH] [--section.key VALUE ...]")
        print("Config flags: --network.port 5001, or --host --port --model-name --model-dir")
        print("--disable-auth --api-servers --log-level; see tabby.toml for every key.")
        return 0
    config = _load(args)
    if config is None:
        return EXIT_CONFIG
    setup_logging(config.logging.log_level)
    from tabby.server import StartupError, serve

    try:
        trio.run(lambda: serve(config, handle_signals=True))
    except KeyFileError as exc:
        _print_lines(exc.lines)
        return EXIT_CONFIG
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return 0


def keys_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tabby keys", description="Show the API keys, add an API key or rotate the admin key."
    )
    add_keys_arguments(parser)
    parser.add_argument("--config", type=Path, help="the config file naming the keys file")
    ns = parser.parse_args(args)
    path: Path = ns.file
    if path is None:
        config = _load(["--config", str(ns.config)] if ns.config else [])
        if config is None:
            return EXIT_CONFIG
        path = config.resolve(config.network.api_tokens_file)
    return keys_main(path, ns.action)


def export_config_command(args: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="tabby export-config", description="Print (or write) the commented default tabby.toml."
    )
    parser.add_argument("--output", type=Path, help="write to this file instead of stdout")
    ns = parser.parse_args(args)
    text = export_config()
    if ns.output is None:
        sys.stdout.write(text)
    else:
        write_toml_atomic(ns.output, text)
    return 0


def _download(args: list[str]) -> int:
    # Imported here: huggingface_hub is slow to import and only this command needs it.
    from tabby.actors.hub import download_command

    return download_command(args)


def _export_openapi(args: list[str]) -> int:
    # Imported here: building the app pulls in quart and every route module.
    from tabby.http.export import export_openapi_command

    return export_openapi_command(args)


# name -> (help, function); a new subcommand is one more line here.
COMMANDS: dict[str, tuple[str, Command]] = {
    "serve": ("start the server (the default)", serve_command),
    "keys": ("show the API keys, add one, or rotate the admin key", keys_command),
    "export-config": ("print the commented default tabby.toml", export_config_command),
    "download": ("download a model from the Hugging Face hub", _download),
    "export-openapi": ("write the OpenAPI schema", _export_openapi),
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: tabby [COMMAND] [ARGS...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (help_, _) in COMMANDS.items()]
    lines += [
        "",
        "Without a command, tabby serves: `tabby --port 5001` = `tabby serve --port 5001`.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if not args or args[0].startswith("-"):
        return serve_command(args)
    entry = COMMANDS.get(args[0])
    if entry is None:
        print(f"tabby: unknown command {args[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return entry[1](args[1:])
