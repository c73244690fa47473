"""`make run` as a new user meets it: deploy/devstack.py started as a process, with its own
var/ directory (PICSTREAM_DEV_VAR), its own Redis, SeaweedFS, nginx, gunicorn and worker."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.http import Api
from tests.images import png
from tests.servers import ROOT, free_port

DEVSTACK = [sys.executable, str(ROOT / "deploy" / "devstack.py")]


class Stack:
    """One devstack process, its output collected line by line."""

    def __init__(self, var: Path, **env: str) -> None:
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("PICSTREAM_", "S3_"))}
        clean.pop("REDIS_URL", None)
        clean.pop("PORT", None)
        self.proc = subprocess.Popen(
            DEVSTACK,
            env={**clean, "PICSTREAM_DEV_VAR": str(var), **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.banner = threading.Event()
        self.ended = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("  try:"):
                self.banner.set()
        self.proc.stdout.close()
        self.ended.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C in its terminal
        return self.proc.wait(timeout=60)


@pytest.fixture()
def stacks() -> Iterator[list[Stack]]:
    started: list[Stack] = []
    yield started
    for stack in started:  # as Ctrl-C would: devstack stops the servers it started
        try:
            stack.stop()
        except subprocess.TimeoutExpired:
            os.killpg(stack.proc.pid, signal.SIGKILL)
            stack.proc.wait()
        stack.ended.wait(10)


def field(output: str, name: str) -> str:
    """The first word after a banner label (`  API key    <key>   (...)`)."""
    line = next(x.strip() for x in output.splitlines() if x.strip().startswith(name))
    return line[len(name) :].split()[0]


def test_make_run_tells_a_new_user_everything_once_it_serves(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    port = free_port()
    stack = Stack(tmp_path / "var", PORT=str(port))
    stacks.append(stack)
    assert stack.banner.wait(120), stack.output
    out = stack.output
    assert f"console    http://127.0.0.1:{port}/" in out
    key = (tmp_path / "var" / "dev-api-key").read_text().strip()
    assert field(out, "API key") == key
    endpoint = field(out, "S3 store")
    assert endpoint.startswith("http://127.0.0.1:")
    env_file = (tmp_path / "var" / "dev.env").read_text()
    assert f"S3_ENDPOINT={endpoint}" in env_file and "S3_SECRET_KEY=" in env_file
    assert oct((tmp_path / "var" / "dev.env").stat().st_mode & 0o777) == "0o600"
    # The banner comes once the API answers: an upload works at once.
    api = Api("127.0.0.1", port, key)
    assert api.request("GET", "/readyz", key=None).status == 200
    assert api.upload(png(8, 8), "first").status == 201

    # A second `make run` on the same var/ says so in one line and starts nothing.
    second = subprocess.run(
        DEVSTACK,
        env={**os.environ, "PICSTREAM_DEV_VAR": str(tmp_path / "var"), "PORT": str(free_port())},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "another `make run`" in second.stderr and "Traceback" not in second.stderr

    # Ctrl-C stops everything it started.
    assert stack.stop() == 0
    assert stack.ended.wait(30)
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert "the app has stopped" in stack.output


def test_a_taken_port_is_one_clear_line_before_anything_starts(
    tmp_path: Path, stacks: list[Stack]
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = subprocess.run(
            DEVSTACK,
            env={**os.environ, "PICSTREAM_DEV_VAR": str(tmp_path / "a"), "PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert refused.returncode != 0
    assert refused.stderr.strip() == f"port {port} is in use: set PORT to a free one, or unset it"
    assert not (tmp_path / "a" / "redis").exists()  # nothing was started


def test_a_killed_make_run_leaves_no_server_behind(tmp_path: Path, stacks: list[Stack]) -> None:
    port = free_port()
    stack = Stack(tmp_path / "var", PORT=str(port))
    stacks.append(stack)
    assert stack.banner.wait(120), stack.output
    redis_port = int(field(stack.output, "Redis").rsplit(":", 1)[1].split("/")[0])
    s3_port = int(field(stack.output, "S3 store").rsplit(":", 1)[1])

    os.kill(stack.proc.pid, signal.SIGKILL)  # devstack alone, as `kill -9` would
    stack.proc.wait()

    def serving(p: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", p)) == 0

    deadline = time.monotonic() + 30
    while any(serving(p) for p in (port, redis_port, s3_port)):
        assert time.monotonic() < deadline, "servers outlived their devstack"
        time.sleep(0.2)  # polling ports closing, bounded by the deadline
