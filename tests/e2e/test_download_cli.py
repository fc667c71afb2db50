"""``tabby download`` as a subprocess against the fake hub."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.fakehub import FakeHub, FakeRepo, running_hub

FILES = {"config.json": b"{}", "model.safetensors": os.urandom(300_000), "notes.md": b"x"}


def entries(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def start_hub(nursery: trio.Nursery) -> FakeHub:
    hub = FakeHub()
    hub.add(FakeRepo("org/tiny", dict(FILES)))
    hub.add(FakeRepo("org/gated", {"a.bin": b"a"}, token="hf_cli_token"))
    hub.add(FakeRepo("org/slow", {"big.bin": os.urandom(2_000_000)}, slow_file="big.bin"))
    await running_hub(hub, nursery)
    return hub


def command(hub: FakeHub, dest: Path, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tabby.actors.hub",
        *args,
        "--endpoint",
        hub.url,
        "--dest",
        str(dest),
    ]


async def test_cli_downloads_with_progress_bar(nursery: trio.Nursery, tmp_path: Path) -> None:
    hub = await start_hub(nursery)
    args = command(
        hub, tmp_path, "org/tiny", "--include", "*.json", "*.safetensors", "--folder-name", "t"
    )
    done = await trio.run_process(args, capture_stdout=True, capture_stderr=True, check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 0, stderr
    assert done.stdout.decode().strip() == str((tmp_path / "t").resolve())
    assert "2 files" in stderr
    assert "100%" in stderr  # the tqdm bar reached the end
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    assert (tmp_path / "t" / "model.safetensors").read_bytes() == FILES["model.safetensors"]


async def test_cli_errors_are_one_line_and_keep_the_token_secret(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    hub = await start_hub(nursery)
    gated = await trio.run_process(
        command(hub, tmp_path, "org/gated"), capture_stdout=True, capture_stderr=True, check=False
    )
    assert gated.returncode == 1
    assert "gated" in gated.stderr.decode()
    wrong = await trio.run_process(
        command(hub, tmp_path, "org/tiny", "--revision", "nope", "--token", "hf_cli_token"),
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert wrong.returncode == 1
    assert "revision 'nope' not found" in wrong.stderr.decode()
    assert "hf_cli_token" not in wrong.stderr.decode() + wrong.stdout.decode()
    assert entries(tmp_path) == []


async def test_cli_interrupted_leaves_nothing(nursery: trio.Nursery, tmp_path: Path) -> None:
    hub = await start_hub(nursery)
    proc = await trio.lowlevel.open_process(
        command(hub, tmp_path, "org/slow"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert proc.stderr is not None
    seen = ""
    with trio.fail_after(20):
        # Interrupt mid-file: once the bar shows some kilobytes of the big file.
        while not re.search(r"\| *[1-9][0-9.]*k/", seen):
            seen += (await proc.stderr.receive_some()).decode()
        proc.send_signal(signal.SIGINT)
        assert await proc.wait() == 130
    assert entries(tmp_path) == []
