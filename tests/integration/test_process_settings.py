"""Each process reads and checks only the settings it uses, through its real entry point: a
worker converts while a web-only variable is broken, the web serves while a conversion-only
one is, and a process given a bad variable it does use refuses to start with one line
naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import servers
from tests.http import Api
from tests.pixels import jpeg_with_orientation

StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]

BROKEN_WEB = {
    "PICSTREAM_WEB_THREADS": "abc",
    "PICSTREAM_CORS_ORIGINS": "https://app.example.com/",  # a path: not an origin
    "PICSTREAM_API_KEYS": "alice:short",
}
BROKEN_CONVERSION = {
    "PICSTREAM_MAX_FRAMES": "lots",
    "PICSTREAM_JOB_MEMORY": "1 furlong",
    "PICSTREAM_JANITOR_INTERVAL": "-5",
    "PICSTREAM_WEBHOOK_SECRET": "short",
}


@pytest.fixture()
def worker_with(env: dict[str, str], workdir: Path) -> Iterator[Callable[..., servers.Server]]:
    """Start `python -m worker` with overrides; stopped by SIGTERM after the test, and it
    must then exit cleanly."""
    started: list[servers.Server] = []

    def start(**overrides: str) -> servers.Server:
        started.append(servers.start_worker({**env, **overrides}, workdir / "settings"))
        return started[-1]

    yield start
    for server in started:
        server.stop()
        assert server.proc.returncode == 0, server.output()[-3000:]


def wait_until_converted(api: Api, image_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        record: dict[str, Any] = api.request("GET", f"/v1/images/{image_id}").json
        if record["status"] != "processing" or time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        env={**os.environ, **env},
        cwd=servers.ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


GUNICORN = [str(servers.BIN / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "api.main:app()"]
WORKER = [sys.executable, "-m", "worker"]
ADMIN = [str(servers.BIN / "picstream-admin")]


def test_a_worker_converts_with_broken_web_only_settings(
    api: Api, worker_with: Callable[..., servers.Server]
) -> None:
    worker = worker_with(**BROKEN_WEB)
    resp = api.upload(jpeg_with_orientation(1), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 201, resp.body
    record = wait_until_converted(api, resp.json["id"])
    assert record["status"] == "ready", (record, worker.output()[-3000:])
    assert record["variants"]


def test_the_web_serves_with_broken_conversion_only_settings(
    start_api: StartApi, env: dict[str, str]
) -> None:
    _server, api = start_api({**env, **BROKEN_CONVERSION})
    resp = api.upload(jpeg_with_orientation(1), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 201, resp.body
    assert api.request("GET", f"/v1/images/{resp.json['id']}").json["status"] == "processing"


def test_the_admin_janitor_runs_with_broken_web_and_conversion_settings(
    env: dict[str, str],
) -> None:
    done = run([*ADMIN, "janitor"], {**env, **BROKEN_WEB, **BROKEN_CONVERSION})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("janitor: 0 abandoned")


@pytest.mark.parametrize(
    ("argv", "variable", "line"),
    [
        (GUNICORN, "PICSTREAM_WEB_THREADS", "web: PICSTREAM_WEB_THREADS must be a whole number"),
        (GUNICORN, "PICSTREAM_MAX_PIXELS", "web: PICSTREAM_MAX_PIXELS must be a whole number"),
        (WORKER, "PICSTREAM_MAX_FRAMES", "worker: PICSTREAM_MAX_FRAMES must be a whole number"),
        (WORKER, "PICSTREAM_MAX_PIXELS", "worker: PICSTREAM_MAX_PIXELS must be a whole number"),
        (
            [*ADMIN, "rebuild"],
            "PICSTREAM_JOB_TIMEOUT",
            "picstream-admin: PICSTREAM_JOB_TIMEOUT must be a whole number",
        ),
    ],
)
def test_a_process_refuses_a_bad_setting_it_uses_in_one_line(
    env: dict[str, str], argv: list[str], variable: str, line: str
) -> None:
    refused = run(argv, {**env, "PORT": str(servers.free_port()), variable: "lots"})
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.strip() == f"{line}, got 'lots'"
