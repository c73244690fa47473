"""`python -m worker` under faults: real worker processes, real redis-server and SeaweedFS.

The supervisor keeps one rq worker running (a SIGKILLed one is replaced), the rq worker
rides out a Redis restart without exiting, and its maintenance runs the janitor on the
PICSTREAM_JANITOR_INTERVAL. Faults are signals; every wait is a poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from redis import Redis
from rq import Worker
from rq.scheduler import RQScheduler

from core.records import Records
from core.settings import Settings
from core.storage import Store
from tests import images, servers
from tests.hosts import alive
from tests.integration.conftest import ALICE_KEY
from worker.__main__ import ConversionWorker, PatientScheduler

StartWorker = Callable[..., servers.Server]
AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
OUTAGE_BEGINS = "Redis is unreachable"
OUTAGE_ENDS = "Redis answers again"


@pytest.fixture()
def start_worker(env: dict[str, str], workdir: Path) -> Iterator[StartWorker]:
    """Start `python -m worker` (the supervisor); each is stopped by SIGTERM after the test
    and must then exit cleanly, leaving no rq worker behind."""
    started: list[servers.Server] = []

    def start(name: str = "supervised", **overrides: str) -> servers.Server:
        server = servers.start_worker({**env, **overrides}, workdir / "supervised", name)
        started.append(server)
        return server

    yield start
    for server in started:
        if server.proc.poll() is not None:
            continue  # the test killed it
        children = servers.worker_pids(server)
        server.stop()
        assert server.proc.returncode == 0, server.output()[-3000:]
        for pid in children:
            wait_until(lambda pid=pid: not alive(pid), 10, f"rq worker {pid} to stop")


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def group_members(pgid: int) -> list[int]:
    """Live processes in process group `pgid`."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def rq_worker(
    supervisor: servers.Server, redis: Redis, not_pid: int = 0, *, idle: bool = True
) -> int:
    """The pid of the supervisor's rq worker (other than `not_pid`), once it is registered
    with rq and idle, i.e. listening for jobs."""
    found: list[int] = []

    def registered() -> bool:
        assert supervisor.proc.poll() is None, supervisor.output()[-3000:]
        children = [pid for pid in servers.worker_pids(supervisor) if pid != not_pid]
        # Idle, not just registered: rq registers a worker before it installs its signal
        # handlers, and a SIGTERM in between would kill it without a warm shutdown.
        # (`idle=False` after a Redis that lost its data: re-registered, state not yet set.)
        workers = Worker.all(connection=redis)
        pids = {w.pid for w in workers if not idle or w.get_state() == "idle"}
        found[:] = [pid for pid in children if pid in pids]
        return bool(found)

    wait_until(registered, 30, "the rq worker to register")
    return found[0]


def upload_and_convert(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    """PUT a small PNG and poll its record until the worker is done with it."""
    resp = client.simulate_put(
        f"/v1/images/{image_id}",
        body=images.png(40, 30),
        headers={**AS_ALICE, "Content-Type": "image/png"},
    )
    assert resp.status_code == 201, resp.text
    record: dict[str, Any] = resp.json

    def converted() -> bool:
        nonlocal record
        record = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE).json
        return bool(record["status"] != "processing")

    wait_until(converted, 30, f"the conversion of {image_id}")
    return record


def methods(cls: type) -> set[str]:
    return {
        name for name, value in vars(cls).items() if callable(value) or isinstance(value, property)
    }


def test_the_rq_methods_the_worker_overrides_still_exist() -> None:
    """ConversionWorker and PatientScheduler override rq 3.0 methods, one of them private:
    a renamed one would silently stop being called, so name them all here."""
    assert methods(PatientScheduler) - {"__init__"} == {"request_stop", "work"}
    assert hasattr(RQScheduler, "request_stop") and hasattr(RQScheduler, "work")
    overridden = methods(ConversionWorker) - {
        "__init__",
        "start_scheduler",
        "_through_outages",
        "_register_again_if_forgotten",
        "_log_pickup",  # our own, not rq's
    }
    assert overridden == {
        "dequeue_timeout",
        "main_work_horse",
        "check_for_suspension",
        "run_maintenance_tasks",
        "dequeue_job_and_maintain_ttl",
        "heartbeat",
        "execute_job",
        "maintain_heartbeats",
        "request_stop",
        "set_shutdown_requested_date",
        "_pubsub_exception_handler",
    }
    assert all(hasattr(Worker, name) for name in overridden), overridden - set(dir(Worker))
    used = ("register_birth", "key", "is_horse", "scheduler", "stop_scheduler")
    idle = Worker(["q"], connection=Redis(), prepare_for_work=False)
    assert all(hasattr(idle, name) for name in used)


def test_the_rq_worker_drains_uploads_then_deliveries_then_reconversions(
    start_worker: StartWorker, redis_client: Redis, settings: Settings
) -> None:
    """rq drains the queues a worker listens on strictly in order: a webhook delivery (a
    slow receiver) never waits in front of a fresh upload, bulk work in front of neither."""
    pid = rq_worker(start_worker(), redis_client)
    (worker,) = [w for w in Worker.all(connection=redis_client) if w.pid == pid]
    assert worker.queue_names() == [settings.queue, settings.webhook_queue, settings.bulk_queue]


def test_a_killed_rq_worker_is_restarted_and_converts(
    start_worker: StartWorker, client: falcon.testing.TestClient, redis_client: Redis
) -> None:
    supervisor = start_worker()
    first = rq_worker(supervisor, redis_client)

    os.kill(first, signal.SIGKILL)  # as the OOM killer would

    second = rq_worker(supervisor, redis_client, not_pid=first)
    # What the killed worker left in its process group (rq's scheduler) was stopped.
    wait_until(lambda: not group_members(first), 10, "the killed worker's scheduler to stop")
    record = upload_and_convert(client, "after-a-crash")
    assert record["status"] == "ready", (record, supervisor.output()[-3000:])
    assert servers.worker_pids(supervisor) == [second]
    assert "rq worker was killed by SIGKILL; restarting it" in supervisor.output()


def test_a_killed_supervisor_leaves_no_rq_worker_behind(
    start_worker: StartWorker, redis_client: Redis
) -> None:
    supervisor = start_worker()
    worker = rq_worker(supervisor, redis_client)

    supervisor.proc.kill()  # honcho does this 5 s after the first process exited
    supervisor.proc.wait()

    # Linux sends the rq worker SIGTERM (PR_SET_PDEATHSIG): it stops, with its scheduler.
    wait_until(lambda: not group_members(worker), 15, "the rq worker and its scheduler to stop")
    assert "warm shut down requested" in supervisor.output()


def test_the_worker_rides_out_a_redis_restart(
    start_worker: StartWorker,
    client_with: Callable[..., falcon.testing.TestClient],
    tmp_path: Path,
) -> None:
    redis_server = servers.start_redis(tmp_path / "redis")
    url = redis_server.extra["url"]
    redis = Redis.from_url(url)
    try:
        supervisor = start_worker("outage", REDIS_URL=url)
        worker = rq_worker(supervisor, redis)

        redis_server.stop(signal.SIGKILL)
        wait_until(lambda: OUTAGE_BEGINS in supervisor.output(), 15, "the worker to notice")
        # Redis stays away for two seconds of refused connections (several PINGs).
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            assert alive(worker), supervisor.output()[-3000:]
            time.sleep(0.1)
        redis_server = servers.start_redis(tmp_path / "redis", port=redis_server.port)
        wait_until(lambda: OUTAGE_ENDS in supervisor.output(), 15, "the worker to reconnect")

        # A Redis that lost its data (no persistence here) learns about the worker again.
        assert rq_worker(supervisor, redis, idle=False) == worker  # the same process
        record = upload_and_convert(client_with(REDIS_URL=url), "after-an-outage")
        assert record["status"] == "ready", (record, supervisor.output()[-3000:])
        log = supervisor.output()
        assert log.count(OUTAGE_BEGINS) == 1, log[-3000:]
        assert log.count(OUTAGE_ENDS) == 1, log[-3000:]
        assert "restarting it" not in log
        assert "Scheduler [PID" not in log  # rq's own would have died with a traceback

        # Stopping does not wait for Redis.
        redis_server.stop(signal.SIGKILL)
        supervisor.stop()
        assert supervisor.proc.returncode == 0, supervisor.output()[-3000:]
        wait_until(lambda: not alive(worker), 10, "the rq worker to stop")
    finally:
        redis.close()
        redis.connection_pool.disconnect()
        redis_server.stop()


def test_the_janitor_sweeps_within_its_interval(
    start_worker: StartWorker, store: Store, redis_client: Redis
) -> None:
    supervisor = start_worker(PICSTREAM_JANITOR_INTERVAL="1")
    rq_worker(supervisor, redis_client)
    records = Records(redis_client)
    # Two rounds: the second can only be done by a later sweep than the first.
    for n in (1, 2):
        prefix = f"alice/deleted-{n}/"
        store.put(f"{prefix}original", b"\x89PNG", "image/png", {})
        store.put(f"{prefix}w256.webp", b"RIFF", "image/webp", {})
        store.put(f"alice/kept-{n}/original", b"\x89PNG", "image/png", {})
        records.queue_purge(prefix)
        # The default interval is 300 s: only a 1-s schedule can be this quick.
        wait_until(lambda prefix=prefix: store.keys(prefix) == [], 10, f"a sweep of {prefix}")
    assert store.keys("") == ["alice/kept-1/original", "alice/kept-2/original"]
    assert records.due_purges() == []
