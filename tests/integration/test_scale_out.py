"""Scale-out: two web hosts and two worker hosts on one Redis and one S3, losing one of each.

Each host is started from a settings file of its own (tests/hosts.py), as a separate machine
would be; what must be equal everywhere (keys, signing key, bucket, queues, profiles) is equal,
what is the host's own (its port) differs. One scenario, its phases overlapping so the test
takes about as long as rq needs to notice a dead worker (~70 s), not that plus the rest:

1. a worker host dies (SIGKILL of its supervisor, rq worker, scheduler and work-horse) while
   it converts an image;
2. meanwhile uploads from several client threads go to both web hosts, and every image is
   served by the host that did not take it;
3. a web host dies (SIGKILL of its master and workers) in the middle of an upload's body; the
   client's retry on the other host succeeds, and once the janitor has run nothing of the
   killed upload is left: no incomplete multipart upload, no object, no lease;
4. the dead worker's job finishes on the other worker host within 120 s of the crash.

Every wait is a poll with a deadline; the kills land at states the test has observed.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pyvips
from redis import Redis
from rq import Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from core import janitor
from core.jobs import make_queue
from core.leases import GUARD_MARGIN, MULTIPART_KEY
from core.records import Records, lease_key
from core.settings import Settings
from core.storage import Store
from deploy.seaweed import free_port
from tests import images, servers
from tests.hosts import WebHost, WorkerHost, crash, start_web_host, start_worker_host, wait_until
from tests.http import Api
from tests.integration.conftest import ALICE_KEY
from tests.keys import keys_of

LEASE_SECONDS = 2  # the web hosts' upload leases: a dead host's id is free again this soon
RECOVERY_LIMIT = 120  # seconds from a worker host's crash to its job done elsewhere

# `slow` takes minutes (AVIF at effort 8), so the doomed conversion is surely mid-way when
# its host dies; it is made fast once the host is dead, so the re-run does not take minutes.
PROFILES = """
[profiles.default]
formats = ["webp"]
widths = [200]

[profiles.slow]
formats = ["avif"]
widths = [2000]
[profiles.slow.avif]
effort = {effort}
"""
SLOW = PROFILES.format(effort=8)
FAST = """
[profiles.default]
formats = ["webp"]
widths = [200]

[profiles.slow]
formats = ["webp"]
widths = [200]
"""


@pytest.fixture()
def profiles(tmp_path: Path) -> Path:
    """The profiles file every host is configured with (one file here; copies kept
    identical by the deployment on real machines)."""
    path = tmp_path / "profiles.toml"
    path.write_text(SLOW)
    return path


@pytest.fixture()
def web_hosts(
    env: dict[str, str], workdir: Path, store: Store, profiles: Path
) -> Iterator[list[WebHost]]:
    started: list[WebHost] = []
    try:
        for name in ("web-a", "web-b"):
            host_env = {
                **env,
                "PORT": str(free_port()),  # the host's own; everything else shared
                "PICSTREAM_WEB_WORKERS": "2",
                "PICSTREAM_LEASE_SECONDS": str(LEASE_SECONDS),
                "PICSTREAM_PROFILES": str(profiles),
            }
            started.append(start_web_host(name, host_env, workdir / "scale-out", ALICE_KEY))
        yield started
    finally:
        for host in started:
            host.server.stop()


@pytest.fixture()
def worker_hosts(env: dict[str, str], workdir: Path, profiles: Path) -> Iterator[list[WorkerHost]]:
    started: list[WorkerHost] = []
    try:
        for name in ("worker-a", "worker-b"):
            host_env = {**env, "PICSTREAM_PROFILES": str(profiles)}
            started.append(start_worker_host(name, host_env, workdir / "scale-out"))
        yield started
    finally:
        for host in started:
            host.server.stop()


def noise_jpeg(width: int, height: int) -> bytes:
    noise = pyvips.Image.gaussnoise(width, height, sigma=50, mean=128)
    photo = noise.bandjoin([noise, noise]).cast("uchar").copy(interpretation="srgb")
    return bytes(photo.jpegsave_buffer(Q=90))


def rq_workers_of(hosts: list[WorkerHost], redis_client: Redis) -> dict[str, WorkerHost]:
    """rq worker name -> its host, once every host's rq worker has registered."""
    found: dict[str, WorkerHost] = {}

    def registered() -> bool:
        for host in hosts:
            assert host.server.proc.poll() is None, host.server.output()[-3000:]
        pids = {host.name: set(host.pids()) for host in hosts}
        found.clear()
        for worker in Worker.all(connection=redis_client):
            for host in hosts:
                if worker.pid in pids[host.name]:
                    found[worker.name] = host
        return len(found) == len(hosts)

    wait_until(registered, 30, "both worker hosts' rq workers to register")
    return found


# ------------------------------------------------------------------ 1. a worker host dies


def crash_the_converting_worker_host(
    api: Api, hosts: list[WorkerHost], redis_client: Redis, settings: Settings
) -> tuple[str, str, WorkerHost, float]:
    """Upload an image to the slow profile, SIGKILL the worker host whose work-horse is
    converting it; return (image id, job id, the surviving host, when it crashed)."""
    names = rq_workers_of(hosts, redis_client)
    resp = api.upload(noise_jpeg(2000, 1500), query="?profile=slow")
    assert resp.status == 201, resp.body
    started = StartedJobRegistry(queue=make_queue(redis_client, settings.queue, 60))
    taken_by: list[str] = []

    def taken() -> bool:
        # The job enters the started registry a moment before its worker's name is saved.
        for started_id in started.get_job_ids():
            found = Job.fetch(started_id, connection=redis_client, serializer=JSONSerializer)
            if found.worker_name:
                taken_by[:] = [started_id, found.worker_name]
        return bool(taken_by)

    wait_until(taken, 30, "a worker to start the conversion")
    job_id, worker_name = taken_by
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    doomed = names[worker_name]
    # The horse is working: a child of the rq worker (pids: supervisor, rq worker, then the
    # rq worker's children) that has burnt CPU on the image; rq's scheduler burns next to none.
    wait_until(
        lambda: any(servers.cpu_seconds(pid) > 0.5 for pid in doomed.pids()[2:]),
        30,
        f"{doomed.name}'s work-horse to be converting",
    )
    killed = crash(doomed.server)
    crashed_at = time.monotonic()
    # Supervisor, rq worker and work-horse; and rq's scheduler, when this host holds the
    # scheduler lock (one worker of all does).
    assert len(killed) >= 3, killed
    (survivor,) = [host for host in hosts if host is not doomed]
    assert job.get_status(refresh=True) == "started"  # orphaned, nobody finishes it yet
    return resp.json["id"], job_id, survivor, crashed_at


# ------------------------------------------------------------------ 2. uploads spread


def upload_from_threads(hosts: list[WebHost], clients: int, each: int) -> dict[str, int]:
    """`clients` threads uploading `each` small images, alternating between the hosts;
    return image id -> the index of the host that took it."""
    taken: dict[str, int] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        for k in range(each):
            index = (n + k) % len(hosts)
            image_id = f"spread-{n}-{k}"
            resp = hosts[index].api.upload(images.png(30 + n, 20 + k), image_id)
            with lock:
                if resp.status == 201:
                    taken[image_id] = index
                else:
                    failures.append(f"{image_id}: {resp.status} {resp.body[:200]!r}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    return taken


# ------------------------------------------------------------------ 3. a web host dies


def crash_mid_body(host: WebHost, store: Store, body: images.Body, image_id: str) -> None:
    """Send the upload's head and half its body, and SIGKILL the host once the upload has
    reached the store (its multipart upload exists): the kill lands mid-body."""
    api = host.api
    head = api.headers_for(
        "PUT",
        f"/v1/images/{image_id}",
        f"Content-Length: {body.size}\r\nContent-Type: application/octet-stream\r\n",
    )
    sock = socket.create_connection((api.host, api.port))
    try:
        sock.sendall(head + body.read_all()[: body.size // 2])
        wait_until(lambda: store.incomplete_uploads() != [], 20, "the multipart upload to start")
        crash(host.server)
    finally:
        sock.close()


def retry_on(host: WebHost, body: images.Body, image_id: str) -> dict[str, Any]:
    """The client's retry on another host: the same PUT, again while the dead host's lease on
    the id lives (409: an upload in progress), at most a few lease lengths."""
    deadline = time.monotonic() + 5 * LEASE_SECONDS
    while True:
        resp = host.api.upload(body, image_id)
        if resp.status != 409 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert resp.status == 201, (resp.status, resp.body)
    record: dict[str, Any] = resp.json
    return record


def assert_nothing_left_of_the_killed_upload(
    store: Store, redis_client: Redis, record: dict[str, Any]
) -> None:
    """What the worker's janitor does every PICSTREAM_JANITOR_INTERVAL, run as if the dead
    host's lease and its guard were long past: abort its multipart upload, delete its
    incarnation's objects. Afterwards only the retry's incarnation is in the store."""
    records = Records(redis_client)
    later = time.time() + LEASE_SECONDS + GUARD_MARGIN + 1
    sweep = janitor.run_once(store, records, now=later)
    assert sweep.abandoned == 1, sweep
    assert store.incomplete_uploads() == []
    assert redis_client.zcard(MULTIPART_KEY) == 0
    assert not redis_client.exists(lease_key("alice", record["id"]))
    assert records.due_purges(later) == []
    prefix = keys_of(record).prefix
    leftovers = [k for k in store.keys(f"alice/{record['id']}/") if not k.startswith(prefix)]
    assert leftovers == []


# ------------------------------------------------------------------ the scenario


def status(api: Api, image_id: str) -> str:
    return str(api.request("GET", f"/v1/images/{image_id}").json["status"])


def test_two_web_hosts_and_two_worker_hosts_each_lose_a_host(
    web_hosts: list[WebHost],
    worker_hosts: list[WorkerHost],
    store: Store,
    redis_client: Redis,
    settings: Settings,
    profiles: Path,
) -> None:
    web_a, web_b = web_hosts

    # 1. A worker host dies mid-conversion; the slow profile is then made fast everywhere.
    doomed_image, job_id, survivor, crashed_at = crash_the_converting_worker_host(
        web_a.api, worker_hosts, redis_client, settings
    )
    profiles.write_text(FAST)

    # 2. Meanwhile: uploads from 4 threads to both web hosts; each host serves the others'.
    taken = upload_from_threads(web_hosts, clients=4, each=3)
    counts = [host.uploads_answered_201() for host in web_hosts]
    assert counts[0] >= 1 and counts[1] >= 1, counts  # as each host's access log tells
    for image_id, index in taken.items():
        other = web_hosts[1 - index].api
        assert other.request("GET", f"/v1/images/{image_id}").status == 200
        original = other.request("GET", f"/v1/images/{image_id}/original")
        assert original.status == 200 and original.body.startswith(b"\x89PNG")

    # 3. A web host dies mid-body; the retry on the other host succeeds; nothing is left.
    body = images.Body(12 * 1024 * 1024, seed=7)
    crash_mid_body(web_a, store, body, "big")
    record = retry_on(web_b, body, "big")
    assert record["blake3"] == body.blake3
    assert_nothing_left_of_the_killed_upload(store, redis_client, record)
    assert web_b.api.request("GET", "/v1/images/big/original").body == body.read_all()

    # 4. The dead worker's job finishes on the survivor; the spread uploads converted too.
    api = web_b.api
    wait_until(
        lambda: status(api, doomed_image) != "processing",
        RECOVERY_LIMIT + 10,
        "the dead worker host's job to finish elsewhere",
        pause=0.5,
    )
    took = time.monotonic() - crashed_at
    assert status(api, doomed_image) == "ready", survivor.server.output()[-3000:]
    assert took < RECOVERY_LIMIT, f"recovered {took:.0f} s after the crash"
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert rq_workers_of([survivor], redis_client).get(str(job.worker_name)) is survivor
    assert all(status(api, image_id) == "ready" for image_id in taken)
    print(f"the dead worker host's job completed on the other {took:.0f} s after the crash")
