"""The `tabby` command in-process: export-config, keys, config errors, dispatch."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tabby.actors.keyfile import read_key_file
from tabby.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no ./tabby.toml, files land in tmp_path
    for name in [n for n in os.environ if n.startswith("TABBY_")]:
        monkeypatch.delenv(name)


def test_export_config_equals_the_committed_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["export-config"]) == 0
    committed = (REPO / "tabby.toml").read_text(encoding="utf-8")
    assert capsys.readouterr().out == committed
    assert main(["export-config", "--output", str(tmp_path / "out.toml")]) == 0
    assert (tmp_path / "out.toml").read_text(encoding="utf-8") == committed


def test_config_errors_exit_2_with_one_line_each(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--network.nope", "1", "--network.nada", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "flag --network.nope: unknown option",
        "flag --network.nada: unknown option",
    ]
    # The default command is serve.
    assert main(["--port", "abc"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("flag --port: network.port: ")


def test_unusable_keys_file_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "api_tokens.toml").write_text("admin_key = 5\n")
    assert main(["serve", "--port", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"{tmp_path / 'api_tokens.toml'}: admin_key: expected a string, got 5"
    )


def test_keys_show_add_rotate(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.toml"
    assert main(["keys"]) == 0  # creates the file named by the (default) config
    out = capsys.readouterr().out
    first = read_key_file(path)
    assert f"created {path}" in out
    assert f"admin key: {first.admin_key}" in out
    assert f"API key:   {first.api_keys[0]}" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    path.write_text("# my note\n" + path.read_text())
    assert main(["keys", "add", "--file", str(path)]) == 0
    added = capsys.readouterr().out.split(": ")[-1].strip()
    after_add = read_key_file(path)
    assert after_add.api_keys == (*first.api_keys, added)
    assert after_add.admin_key == first.admin_key

    assert main(["keys", "rotate-admin", "--file", str(path)]) == 0
    rotated = capsys.readouterr().out.split(": ")[-1].strip()
    after_rotate = read_key_file(path)
    assert after_rotate.admin_key == rotated != first.admin_key
    assert after_rotate.api_keys == after_add.api_keys
    text = path.read_text()
    assert text.startswith("# my note\n")
    assert "Keep this file private" in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    path.write_text("admin_key = [")
    assert main(["keys", "add", "--file", str(path)]) == 2
    assert str(path) in capsys.readouterr().err
    assert path.read_text() == "admin_key = ["  # a broken file is never rewritten


def test_dispatch(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in COMMANDS:
        assert name in usage
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
