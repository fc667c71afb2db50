"""Atomic TOML writes keep comments, order and file mode."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import tomlkit

from tabby.actors.keyfile import create_key_file, read_key_file
from tabby.config import ConfigError, edit_toml, read_toml, write_toml_atomic

ORIGINAL = """\
# operator's notes at the top
admin_key = "aaa"  # rotate monthly

# keys for the team
api_keys = ["k1"]

[extra]
z = 1  # z before a
a = 2
"""


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_edit_keeps_comments_order_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.toml"
    path.write_text(ORIGINAL, encoding="utf-8")
    path.chmod(0o600)

    def add_key(doc: tomlkit.TOMLDocument) -> None:
        keys = doc["api_keys"]
        assert isinstance(keys, list)
        keys.append("k2")
        doc["admin_key"] = "bbb"

    edit_toml(path, add_key)
    assert path.read_text(encoding="utf-8") == ORIGINAL.replace('"aaa"', '"bbb"').replace(
        '["k1"]', '["k1", "k2"]'
    )
    assert _mode(path) == 0o600
    assert _leftovers(tmp_path) == []


def test_explicit_mode_and_new_file(tmp_path: Path) -> None:
    path = tmp_path / "new.toml"
    write_toml_atomic(path, "a = 1\n", mode=0o600)
    assert _mode(path) == 0o600
    assert path.read_text(encoding="utf-8") == "a = 1\n"
    write_toml_atomic(path, "a = 2\n", mode=0o640)
    assert _mode(path) == 0o640

    fresh = tmp_path / "fresh.toml"
    umask = os.umask(0o022)
    try:
        write_toml_atomic(fresh, tomlkit.parse("# hi\nb = true\n"))
    finally:
        os.umask(umask)
    assert _mode(fresh) == 0o644
    assert fresh.read_text(encoding="utf-8") == "# hi\nb = true\n"


def test_edit_creates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "made.toml"
    edit_toml(path, lambda doc: doc.update({"admin_key": "x"}), mode=0o600)
    assert read_toml(path).unwrap() == {"admin_key": "x"}
    assert _mode(path) == 0o600


def test_failed_edit_leaves_file_untouched(tmp_path: Path) -> None:
    path = tmp_path / "keep.toml"
    path.write_text(ORIGINAL, encoding="utf-8")

    def boom(doc: tomlkit.TOMLDocument) -> None:
        doc["admin_key"] = "changed"
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        edit_toml(path, boom)
    assert path.read_text(encoding="utf-8") == ORIGINAL
    assert _leftovers(tmp_path) == []


def test_failed_write_removes_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "keep.toml"
    path.write_text(ORIGINAL, encoding="utf-8")
    with pytest.raises(ValueError, match="surrogates"):
        write_toml_atomic(path, 'a = "\ud800"\n')  # not encodable as UTF-8
    assert path.read_text(encoding="utf-8") == ORIGINAL
    assert _leftovers(tmp_path) == []


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('a = 1\n\nb = "unterminated\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        edit_toml(path, lambda doc: None)
    [line] = info.value.lines
    assert line.startswith(f"{path}:3: TOML syntax error: ")
    assert path.read_text(encoding="utf-8") == 'a = 1\n\nb = "unterminated\n'


_ADD_KEYS = """
import sys
from pathlib import Path
from tabby.actors.keyfile import add_api_key
path = Path(sys.argv[1])
sys.stdin.readline()  # start together
for _ in range(int(sys.argv[2])):
    print(add_api_key(path), flush=True)
"""


def test_concurrent_key_adds_keep_every_key(tmp_path: Path) -> None:
    path = tmp_path / "api_tokens.toml"
    create_key_file(path)
    root = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ADD_KEYS, str(path), "3"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=root,
        )
        for _ in range(8)
    ]
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    added: list[str] = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        added.extend(out.split())
    assert len(added) == 24
    assert set(added) <= set(read_key_file(path).api_keys)
