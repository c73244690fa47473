"""A replicated Redis under Sentinel on loopback, for failover tests: a master, a replica and
three Sentinels (Debian's redis-server; a Sentinel is `redis-server CONF --sentinel`), each on
a free port, without persistence, waited for until the Sentinels know the replica and each
other (before that a failover cannot happen), and stopped by PID.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from tests.servers import Server, _popen, free_port, wait_port

MASTER_NAME = "picstream"
# How long a silent master is taken for down; the promotion follows within seconds.
DOWN_AFTER_MS = 1000
# The Sentinels try again this long after a failover attempt that failed (no leader).
FAILOVER_TIMEOUT_MS = 5000


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it holds; RuntimeError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:  # a server still starting or just stopped: ask again
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} within {timeout} s")


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if not binary:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    return binary


def _start_node(workdir: Path, name: str, master_port: int | None = None) -> Server:
    """A data node: a master, or with `master_port` its replica. Diskless full syncs that
    start at once (Redis waits 5 s for more replicas by default)."""
    port = free_port()
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    argv = [_redis_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(home), "--repl-diskless-sync", "yes"]
    argv += ["--repl-diskless-sync-delay", "0"]
    if master_port is not None:
        argv += ["--replicaof", "127.0.0.1", str(master_port)]
    proc = _popen(argv, home / "redis.log")
    wait_port(port, proc, f"redis-server ({name})")
    return Server(proc, port, home / "redis.log")


def _start_sentinel(workdir: Path, n: int, master_port: int) -> Server:
    port = free_port()
    home = workdir / f"sentinel-{n}"
    home.mkdir(parents=True, exist_ok=True)
    conf = home / "sentinel.conf"  # a Sentinel rewrites its configuration: one file each
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {home}\n"
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {MASTER_NAME} 1\n"
    )
    proc = _popen([_redis_binary(), str(conf), "--sentinel"], home / "sentinel.log")
    wait_port(port, proc, f"redis-sentinel {n}")
    return Server(proc, port, home / "sentinel.log")


@dataclass
class SentinelSet:
    """The nodes and Sentinels of one replicated Redis."""

    nodes: list[Server]
    sentinels: list[Server]
    clients: dict[int, Redis] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """REDIS_URL naming the Sentinels."""
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def _client(self, port: int) -> Redis:
        if port not in self.clients:
            self.clients[port] = Redis(port=port, socket_timeout=2, socket_connect_timeout=2)
        return self.clients[port]

    def master_port(self) -> int | None:
        """The master's port as the Sentinels that answer agree on; None while they don't."""
        seen = set()
        for sentinel in self.sentinels:
            if sentinel.proc.poll() is not None:
                continue
            try:
                addr = self._client(sentinel.port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except OSError:
                continue
            seen.add(int(addr[1]) if addr else None)
        return seen.pop() if len(seen) == 1 else None

    def node(self, port: int) -> Server:
        return next(node for node in self.nodes if node.port == port)

    def online_replicas(self, port: int) -> int:
        role = self._client(port).execute_command("ROLE")
        return len(role[2]) if role[0] in (b"master", "master") else 0

    def ready(self) -> bool:
        """The master streams to a replica, and every Sentinel knows it and the others."""
        port = self.master_port()
        if port is None or self.online_replicas(port) < 1:
            return False
        for sentinel in self.sentinels:
            state = self._client(sentinel.port).sentinel_master(MASTER_NAME)
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port()
        assert port is not None, "the Sentinels do not agree on a master"
        self.node(port).stop(signal.SIGKILL)
        return port

    def stop(self) -> None:
        for client in self.clients.values():
            client.close()
        for server in [*self.sentinels, *self.nodes]:
            server.stop()


def start_sentinel_set(workdir: Path, timeout: float = 30) -> SentinelSet:
    """A master, its replica and three Sentinels (quorum 2), ready for a failover."""
    workdir.mkdir(parents=True, exist_ok=True)
    started = SentinelSet([], [])
    try:
        master = _start_node(workdir, "master")
        started.nodes.append(master)
        started.nodes.append(_start_node(workdir, "replica", master.port))
        for n in range(3):
            started.sentinels.append(_start_sentinel(workdir, n, master.port))
        wait_for(started.ready, timeout, "the Sentinels did not see the replica and each other")
    except BaseException:
        started.stop()
        raise
    return started
