"""Several "hosts" of one deployment on this machine: web hosts (a gunicorn each) and worker
hosts (a `python -m worker` each) sharing one Redis and one S3, as the Procfile runs them on
separate machines.

Each host gets a settings file of its own (KEY=VALUE, the format `honcho -e` and
`picstream-admin --env-file` read) and is started from that file alone, so nothing leaks from
one host's environment into another's. A host dies as a machine does: `crash` SIGKILLs its
whole process tree at once, whatever process groups its processes moved to.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from admin.cli import read_env_file
from tests import servers
from tests.http import Api

# A gunicorn access line of an upload it answered 201 (deploy/gunicorn.conf.py's format:
# `... "PUT /v1/images/ID HTTP/1.1" 201 ...`).
UPLOAD_201 = re.compile(r'"(?:PUT|POST) /v1/images(?:/[^ ]*)? HTTP/1\.1" 201 ')


def wait_until(check: Callable[[], bool], timeout: float, what: str, pause: float = 0.1) -> None:
    """Poll `check` until it is true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(pause)


def write_settings(path: Path, env: Mapping[str, str]) -> Path:
    """A host's settings file: KEY=VALUE lines, readable by its owner only (keys in it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.writelines(f"{key}={value}\n" for key, value in sorted(env.items()))
    return path


@dataclass
class WebHost:
    name: str
    settings: Path
    server: servers.Server
    key: str

    @property
    def api(self) -> Api:
        return Api("127.0.0.1", self.server.port, self.key)

    def uploads_answered_201(self) -> int:
        """Uploads this host answered 201, from its own access log."""
        return len(UPLOAD_201.findall(self.server.output()))


@dataclass
class WorkerHost:
    name: str
    settings: Path
    server: servers.Server

    def pids(self) -> list[int]:
        """The supervisor and everything under it (rq worker, scheduler, work-horses)."""
        return [self.server.proc.pid, *descendants(self.server.proc.pid)]


def start_web_host(name: str, env: Mapping[str, str], workdir: Path, key: str) -> WebHost:
    """A gunicorn started from `workdir/NAME/picstream.env` (written from `env`) alone."""
    settings = write_settings(workdir / name / "picstream.env", env)
    server = servers.start_gunicorn(read_env_file(str(settings)), workdir / name)
    return WebHost(name, settings, server, key)


def start_worker_host(name: str, env: Mapping[str, str], workdir: Path) -> WorkerHost:
    """A `python -m worker` started from `workdir/NAME/picstream.env` (written from `env`)."""
    settings = write_settings(workdir / name / "picstream.env", env)
    server = servers.start_worker(read_env_file(str(settings)), workdir / name, name)
    return WorkerHost(name, settings, server)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children first, then theirs)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for child in children for d in descendants(child)]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def crash(server: servers.Server) -> list[int]:
    """SIGKILL a host's process tree as a power cut would, and return the pids killed.

    Every process is stopped (SIGSTOP) before any is killed: the worker's rq worker gets a
    SIGTERM when its supervisor dies (PR_SET_PDEATHSIG) and would shut down warmly, and a
    supervisor outliving its rq worker would restart it; neither happens on a real crash.
    The rq worker and its horses live in a process group of their own, so the tree is
    walked, not only the host's session group."""
    root = server.proc.pid
    tree = [root, *descendants(root)]
    for pid in tree:
        _signal(pid, signal.SIGSTOP)
    tree += [pid for pid in descendants(root) if pid not in tree]  # forked meanwhile
    for pid in tree:
        _signal(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):  # the session group: gunicorn's workers
        os.killpg(root, signal.SIGKILL)
    server.proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in tree), 10, f"{tree} to die")
    return tree


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
        os.kill(pid, sig)
