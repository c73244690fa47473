"""The whole system on loopback for one benchmark run: redis-server, SeaweedFS, gunicorn
(one worker process, so its RSS and CPU can be read), optionally the production front (nginx
from deploy/nginx.conf in front of a second gunicorn on a unix socket, downloads handed off,
as `make run` runs it) and optionally `python -m worker`s. Everything is stopped by PID when
the block ends."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.settings import Settings
from core.storage import Store
from tests import servers
from tests.http import Api


@dataclass(frozen=True)
class Stack:
    env: dict[str, str]
    settings: Settings
    store: Store
    api: Api
    redis: servers.Server
    s3: servers.Server
    web: servers.Server
    front: servers.Front | None = None

    @property
    def web_worker_pid(self) -> int:
        """The gunicorn worker process that serves the requests."""
        (pid,) = servers.worker_pids(self.web)
        return pid

    @property
    def front_api(self) -> Api:
        """The API through nginx."""
        assert self.front is not None, "start the stack with front=True"
        return Api("127.0.0.1", self.front.port, self.api.key)

    @property
    def front_worker_pid(self) -> int:
        """The gunicorn worker process behind nginx."""
        assert self.front is not None, "start the stack with front=True"
        (pid,) = servers.worker_pids(self.front.web)
        return pid

    @property
    def nginx_pids(self) -> list[int]:
        """nginx's master and worker processes."""
        assert self.front is not None, "start the stack with front=True"
        return [self.front.nginx.proc.pid, *servers.worker_pids(self.front.nginx)]


def stack_env(redis: servers.Server, s3: servers.Server, owner: str, key: str) -> dict[str, str]:
    """The settings every bench process shares: the Redis and SeaweedFS just started, the
    `bench` bucket, one API key, quiet logs."""
    return {
        "REDIS_URL": redis.extra["url"],
        "S3_ENDPOINT": s3.extra["endpoint"],
        "S3_ACCESS_KEY": servers.S3_KEY,
        "S3_SECRET_KEY": servers.S3_SECRET,
        "S3_BUCKET": "bench",
        "PICSTREAM_API_KEYS": f"{owner}:{key}",
        "PICSTREAM_LOG_LEVEL": "warning",
    }


@contextmanager
def running(
    owner: str, key: str, *, workers: int = 0, front: bool = False, **overrides: str
) -> Iterator[Stack]:
    """Start everything with `PICSTREAM_*`/`S3_*` overrides; yield it; stop it."""
    with tempfile.TemporaryDirectory(prefix="picstream-bench-") as tmp:
        work = Path(tmp)
        started = [servers.start_redis(work / "redis"), servers.start_seaweedfs(work / "s3")]
        try:
            redis, s3 = started
            env = {
                **stack_env(redis, s3, owner, key),
                "PORT": str(servers.free_port()),
                "PICSTREAM_WEB_WORKERS": "1",
                **overrides,
            }
            settings = Settings.from_env(env)
            store = Store.from_settings(settings)
            store.ensure_bucket()
            web = servers.start_gunicorn(env, work / "web")
            started.append(web)
            behind = None
            if front:
                behind = servers.start_front(
                    {**env, "PORT": str(servers.free_port())}, work / "front"
                )
                started += [behind.web, behind.nginx]
            for n in range(workers):
                started.append(servers.start_worker(env, work / "workers", f"worker-{n + 1}"))
            time.sleep(1)  # let gunicorn boot its worker process
            api = Api("127.0.0.1", web.port, key)
            yield Stack(env, settings, store, api, redis, s3, web, behind)
        finally:
            for server in reversed(started):
                server.stop()
