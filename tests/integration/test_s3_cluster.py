"""A SeaweedFS cluster losing a volume server while the API uploads and downloads through it
(tests/s3cluster.py: a master, three volume servers with replication "001", a filer and the
S3 gateway, each its own process).

SIGKILL one volume server: every image the API acknowledged (201) is still downloadable
with its BLAKE3, and uploads go on succeeding.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from blake3 import blake3

from core.settings import Settings
from core.storage import Store
from tests import s3cluster, servers
from tests.http import Api
from tests.images import Body, jpeg
from tests.integration.conftest import ALICE_KEY, make_env

MiB = 1024 * 1024
BUCKET = "picstream-test"


@dataclass
class Ledger:
    """What the client threads saw, each entry stamped with seconds since the kill (negative
    before it)."""

    killed_at: float = float("inf")
    acknowledged: dict[str, str] = field(default_factory=dict)  # image id -> blake3
    uploads: list[tuple[float, int]] = field(default_factory=list)
    downloads: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture()
def cluster(workdir: Path) -> Iterator[s3cluster.Cluster]:
    started = s3cluster.start_cluster(workdir / "fault-cluster")
    yield started
    started.stop()


@pytest.fixture()
def cluster_env(cluster: s3cluster.Cluster, redis_server: servers.Server) -> dict[str, str]:
    return make_env(redis_server.extra["url"], cluster.endpoint)


@pytest.fixture()
def cluster_store(cluster_env: dict[str, str]) -> Iterator[Store]:
    store = Store.from_settings(Settings.from_env(cluster_env))
    s3cluster.wait_bucket(store)
    yield store
    store.client._http.clear()


@pytest.fixture()
def cluster_api(cluster_env: dict[str, str], cluster_store: Store, workdir: Path) -> Iterator[Api]:
    """A gunicorn whose S3_ENDPOINT is the cluster's gateway."""
    web = servers.start_gunicorn(cluster_env, workdir / "web-fault-cluster")
    yield Api("127.0.0.1", web.port, ALICE_KEY)
    web.stop()


def body_for(n: int) -> bytes:
    """Small single-PUT images and, every third, one of two 5 MiB parts (multipart)."""
    if n % 3 == 2:
        return b"".join(Body(6 * MiB, seed=n))
    return jpeg(320, 240, pad=20_000 + n)


def uploader(api: Api, ledger: Ledger, stop: threading.Event, first: int) -> None:
    n = first
    while not stop.is_set():
        body = body_for(n)
        n += 10
        try:
            resp = api.upload(body)
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = 0  # the connection broke: not acknowledged
        if status == 201 and resp.json["blake3"] != blake3(body).hexdigest():
            status = -1  # acknowledged other bytes than were sent: fails the test
        with ledger.lock:
            ledger.uploads.append((time.monotonic(), status))
            if status == 201:
                ledger.acknowledged[resp.json["id"]] = resp.json["blake3"]


def downloader(api: Api, ledger: Ledger, stop: threading.Event) -> None:
    turn = 0
    while not stop.is_set():
        with ledger.lock:
            known = list(ledger.acknowledged.items())
        if not known:
            time.sleep(0.05)
            continue
        image_id, digest = known[turn % len(known)]
        turn += 1
        outcome = fetch(api, image_id, digest)
        with ledger.lock:
            ledger.downloads.append((time.monotonic(), outcome))


def fetch(api: Api, image_id: str, digest: str) -> str:
    """Download an original: "200" with the right bytes, else what went wrong."""
    try:
        got = api.request("GET", f"/v1/images/{image_id}/original")
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__  # cut mid-body: the client can tell (a short read)
    if got.status == 200 and blake3(got.body).hexdigest() != digest:
        return "wrong bytes"
    return str(got.status)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def test_losing_a_volume_server_loses_no_acknowledged_image(
    cluster: s3cluster.Cluster, cluster_api: Api, cluster_store: Store
) -> None:
    api = cluster_api
    ledger, stop = Ledger(), threading.Event()
    threads = [
        *(threading.Thread(target=uploader, args=(api, ledger, stop, i)) for i in range(3)),
        *(threading.Thread(target=downloader, args=(api, ledger, stop)) for _ in range(2)),
    ]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(ledger.acknowledged) >= 12, 30, "uploads before the kill")

        ledger.killed_at = time.monotonic()
        cluster.kill_volume(0)
        wait_until(lambda: cluster.live_volume_servers() == 2, 10, "the master drops it")
        dropped = time.monotonic() - ledger.killed_at
        acknowledged_then = len(ledger.acknowledged)
        wait_until(
            lambda: len(ledger.acknowledged) >= acknowledged_then + 20, 30, "uploads after it"
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)

    ledger.uploads = [(t - ledger.killed_at, status) for t, status in ledger.uploads]
    ledger.downloads = [(t - ledger.killed_at, outcome) for t, outcome in ledger.downloads]
    report = timeline(ledger, dropped)
    # Uploads: 201, or a 503 problem while the store fails (never another status).
    assert {status for _, status in ledger.uploads} <= {201, 503}, report
    assert all(status == 201 for t, status in ledger.uploads if t < 0), report
    # Downloads never deliver wrong bytes; before the kill they all succeed.
    assert all(outcome == "200" for t, outcome in ledger.downloads if t < 0), report
    assert "wrong bytes" not in {outcome for _, outcome in ledger.downloads}, report

    # Every acknowledged image, afterwards, with its BLAKE3; nothing of the others.
    lost = {i: fetch(api, i, digest) for i, digest in ledger.acknowledged.items()}
    assert {i: outcome for i, outcome in lost.items() if outcome != "200"} == {}, report
    assert cluster_store.incomplete_uploads() == []
    owners = {key.split("/")[1] for key in cluster_store.keys("alice/")}
    assert owners == set(ledger.acknowledged)

    # And uploads go on: one after another, each acknowledged.
    for n in range(6):
        resp = api.upload(body_for(1000 + n))
        assert resp.status == 201, (resp.status, resp.body, report)
    print(report)  # the timeline, for -s runs


def timeline(ledger: Ledger, dropped: float) -> str:
    """Per second since the kill: upload statuses and download outcomes, for the report."""
    lines = [f"master dropped the volume server {dropped:.2f} s after the kill"]
    seconds = sorted({int(t // 1) for t, _ in ledger.uploads + ledger.downloads})
    for s in seconds:
        ups = [str(st) for t, st in ledger.uploads if int(t // 1) == s]
        downs = [o for t, o in ledger.downloads if int(t // 1) == s]
        lines.append(f"{s:+3d}s uploads {' '.join(ups)} | downloads {' '.join(downs)}")
    return "\n".join(lines)
