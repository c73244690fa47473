"""Image lifecycle under reuse of ids and faults: nothing lost, nothing leaked, and the
answer a client got agrees with what the system holds afterwards.

Real Redis, SeaweedFS and (where timing matters) gunicorn; faults are injected with TCP
forwarders that refuse (`Outage`) or hold bytes (`Stall`), never with sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import falcon.testing
import pytest
import pyvips
from redis import Redis

from core import janitor
from core.events import events_key
from core.records import Records
from core.settings import Settings
from core.storage import Store
from tests import pixels, servers
from tests.faults import Outage, Stall
from tests.http import Api
from tests.images import Body
from tests.integration.conftest import ALICE_KEY
from tests.keys import keys_of, variant_key
from worker.jobs import RETIRE_GRACE, ImageJob
from worker.services import JobServices

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
RunJobs = Callable[[], None]
ClientWith = Callable[..., falcon.testing.TestClient]
StartApi = Callable[[dict[str, str]], tuple[servers.Server, Api]]


def put(client: falcon.testing.TestClient, image_id: str, body: bytes) -> Any:
    return client.simulate_put(f"/v1/images/{image_id}", body=body, headers=AS_ALICE)


def get(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    resp = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert resp.status_code == 200, resp.text
    record: dict[str, Any] = resp.json
    return record


def landscape() -> bytes:
    return pixels.save(pixels.marked(300, 200), "PNG")


def portrait() -> bytes:
    return pixels.save(pixels.marked(200, 300), "PNG")


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def served_variant_sizes(client: falcon.testing.TestClient, record: dict[str, Any]) -> set[tuple]:
    """(width, height) of every variant as decoded from the bytes the API serves."""
    sizes = set()
    for variant in record["variants"]:
        resp = client.simulate_get(urlsplit(variant["url"]).path, headers=AS_ALICE)
        assert resp.status_code == 200, (variant["name"], resp.text)
        image = pyvips.Image.new_from_buffer(resp.content, "")
        sizes.add((image.width, image.height))
    return sizes


@pytest.fixture()
def s3_outage(s3_server: servers.Server) -> Iterator[Outage]:
    outage = Outage(s3_server.port, down=False)
    yield outage
    outage.close()


# ------------------------------------------------------------------ 1. purge vs re-upload


def test_a_failed_delete_finished_by_the_janitor_never_touches_the_next_upload(
    client_with: ClientWith,
    s3_outage: Outage,
    run_jobs: RunJobs,
    store: Store,
    redis_client: Redis,
) -> None:
    client = client_with(S3_ENDPOINT=s3_outage.endpoint)
    first = put(client, "x", landscape()).json
    run_jobs()
    s3_outage.cut()
    assert client.simulate_delete("/v1/images/x", headers=AS_ALICE).status_code == 202
    s3_outage.down = False

    second = put(client, "x", portrait())
    assert second.status_code == 201
    run_jobs()
    # The sweep that finishes the first image's deletion, and every later one.
    janitor.run_once(store, Records(redis_client), now=time.time() + 7 * 86_400)

    record = get(client, "x")
    assert record["status"] == "ready" and record["blake3"] == second.json["blake3"]
    assert store.read_bytes(keys_of(record).original) == portrait()
    assert served_variant_sizes(client, record) == {(200, 300)}
    assert store.keys(keys_of(first).prefix) == []  # the deleted image is gone for good


# ------------------------------------------------------------------ 2. delete mid-conversion


class ActingStore(Store):
    """Runs `act` once, right after a job wrote its first variant: the job is mid-way."""

    def __init__(self, store: Store, act: Callable[[], None]) -> None:
        super().__init__(store.client, store.bucket)
        self.act: Callable[[], None] | None = act

    def put(self, key: str, data: Any, content_type: str, metadata: Any) -> None:
        super().put(key, data, content_type, metadata)
        if self.act is not None and not key.endswith("record.json"):
            act, self.act = self.act, None
            act()


def test_a_conversion_of_a_deleted_image_never_writes_into_its_successor(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_client: Redis,
) -> None:
    old = put(client, "x", landscape()).json

    def delete_and_reupload() -> None:
        assert client.simulate_delete("/v1/images/x", headers=AS_ALICE).status_code == 204
        assert put(client, "x", portrait()).status_code == 201

    services = JobServices(
        settings, ActingStore(store, delete_and_reupload), Records(redis_client)
    )
    ImageJob(services, "alice", "x", old["gen"], old["vset"]).run()  # the old job, mid-way
    record = get(client, "x")
    assert record["status"] == "processing" and record["width"] == 200  # untouched
    assert all(v["status"] == "pending" for v in record["variants"])

    run_jobs()  # the old job is still queued too: it must end quietly
    record = get(client, "x")
    assert record["status"] == "ready"
    assert served_variant_sizes(client, record) == {(200, 300)}  # its own pixels
    assert store.keys(keys_of(old).prefix) == []  # the old job removed what it wrote


# ------------------------------------------------------------------ 3. Redis stalls at commit


@pytest.fixture()
def redis_stall(redis_server: servers.Server) -> Iterator[Stall]:
    stall = Stall(redis_server.port)
    yield stall
    stall.close()


def stalled_api(start_api: StartApi, env: dict[str, str], stall: Stall) -> Api:
    # A 1 s Redis timeout: the commit is fenced at 2 s.
    env = {**env, "REDIS_URL": stall.redis_url, "PICSTREAM_REDIS_TIMEOUT": "1"}
    return start_api(env)[1]


def test_a_commit_that_reaches_redis_too_late_never_happens_and_the_client_is_told(
    start_api: StartApi, env: dict[str, str], redis_stall: Stall, store: Store, redis_client: Redis
) -> None:
    api = stalled_api(start_api, env, redis_stall)
    redis_stall.hold_on(b"EXEC")
    resp = api.upload(landscape(), "late")
    assert redis_stall.held.is_set()
    assert resp.status == 503, resp.body
    assert resp.header("content-type") == "application/problem+json"
    assert resp.json["type"].endswith("queue-unavailable")

    redis_stall.release()  # the held transaction reaches Redis after its fence expired
    wait_until(redis_stall.answered.is_set, 10, "Redis to answer the late EXEC")
    assert not redis_client.exists("picstream:image:alice:late")
    assert store.keys("alice/late/") == []
    assert Records(redis_client).page("alice", 10, None)[0] == []
    assert api.upload(landscape(), "late").status == 201  # nothing blocks a retry


def test_a_commit_whose_answer_was_lost_is_found_out_and_acknowledged(
    start_api: StartApi, env: dict[str, str], redis_stall: Stall, store: Store, redis_client: Redis
) -> None:
    api = stalled_api(start_api, env, redis_stall)
    redis_stall.hold_on(b"EXEC")
    answer: list[Any] = []
    uploading = threading.Thread(target=lambda: answer.append(api.upload(landscape(), "lost")))
    uploading.start()
    # The web process gives up on the EXEC's answer (1 s) and closes that connection; the
    # transaction then reaches Redis within its fence (2 s) and commits.
    wait_until(redis_stall.client_gone.is_set, 10, "the API to give up on its EXEC")
    redis_stall.release()
    uploading.join(timeout=30)
    resp = answer[0]
    assert resp.status == 201, resp.body
    record = Records(redis_client).get("alice", "lost")
    assert record.gen == resp.json["gen"] and record.blake3 == resp.json["blake3"]
    assert store.read_bytes(record.keys.original) == landscape()


# ------------------------------------------------------------------ 4. store stalls mid-PUT


def test_an_upload_stalled_longer_than_its_lease_keeps_its_id(
    start_api: StartApi, env: dict[str, str], s3_server: servers.Server, redis_client: Redis
) -> None:
    stall = Stall(s3_server.port)
    try:
        _, api = start_api({**env, "S3_ENDPOINT": stall.endpoint, "PICSTREAM_LEASE_SECONDS": "1"})
        answers: list[Any] = []
        stall.pause()
        first = threading.Thread(target=lambda: answers.append(api.upload(landscape(), "x")))
        first.start()
        wait_until(lambda: stall.received > 0, 10, "the upload to reach the store")
        # Three lease lifetimes pass while the store does not answer: the id stays taken.
        lease = "picstream:lease:alice:x"
        renewals = 0
        last = redis_client.pttl(lease)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            now = redis_client.pttl(lease)
            assert now > 0, "the lease lapsed while the upload was alive"
            renewals += now > last
            last = now
            time.sleep(0.05)
        assert renewals >= 3
        second = api.upload(portrait(), "x")
        assert second.status == 409 and "in progress" in second.json["detail"]
        stall.resume()
        first.join(timeout=30)
        assert answers[0].status == 201
        assert api.request("GET", "/v1/images/x").json["blake3"] == answers[0].json["blake3"]
    finally:
        stall.close()


# ------------------------------------------------------------------ 5 + 6. reconvert


def stream_events(redis_client: Redis, record: dict[str, Any]) -> list[dict[str, str]]:
    key = events_key(record["owner"], record["id"], record["gen"])
    return [
        {k.decode(): v.decode() for k, v in fields.items()}
        for _, fields in redis_client.xrange(key)
    ]


def test_a_reconvert_during_the_first_conversion_supersedes_it_without_a_failure(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_client: Redis,
) -> None:
    first = put(client, "x", landscape()).json

    def reconvert() -> None:
        resp = client.simulate_post("/v1/images/x/reconvert", headers=AS_ALICE)
        assert resp.status_code == 202

    services = JobServices(settings, ActingStore(store, reconvert), Records(redis_client))
    ImageJob(services, "alice", "x", first["gen"], first["vset"]).run()
    assert get(client, "x")["status"] == "processing"  # the reconversion ends this run
    run_jobs()

    record = get(client, "x")
    assert record["status"] == "ready" and record["pending"] is None
    story = stream_events(redis_client, record)
    assert all(e["status"] != "failed" for e in story)
    finals = [e for e in story if e["type"] == "status" and e["status"] in ("ready", "failed")]
    assert len(finals) == 1 and finals[0]["status"] == "ready"
    assert served_variant_sizes(client, record) <= {(256, 171), (300, 200)}


def test_pinned_links_keep_working_through_a_reconvert(
    api: Api, run_jobs: RunJobs, store: Store, redis_client: Redis
) -> None:
    record = api.upload(landscape(), "x").json
    run_jobs()
    record = api.request("GET", "/v1/images/x").json
    links = [v["url"] for v in record["variants"]] + ["/v1/images/x/best?width=300"]
    statuses: dict[int, int] = {}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for link in links:
                status = api.request("GET", link).status
                statuses[status] = statuses.get(status, 0) + 1

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            reconverted = api.request("POST", "/v1/images/x/reconvert")
            assert reconverted.status == 202
            for link in links:  # before the worker ran: the current set still serves
                assert api.request("GET", link).status == 200
            run_jobs()
    finally:
        stop.set()
        watcher.join()
    assert statuses.get(200, 0) > 0 and set(statuses) == {200}, statuses
    final = api.request("GET", "/v1/images/x").json
    assert final["status"] == "ready" and final["vset"] != record["vset"]
    # Replaced sets are deleted by the janitor after their grace period, exactly them.
    janitor.run_once(store, Records(redis_client), now=time.time() + RETIRE_GRACE + 1)
    keys = keys_of(final)
    expected = {keys.original, keys.record} | {
        variant_key(final, v["name"]) for v in final["variants"]
    }
    assert set(store.keys("alice/x/")) == expected


# ------------------------------------------------------------------ 8. Redis lost


def admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "picstream-admin"), *args]
    return subprocess.run(
        command, env={**os.environ, **env}, capture_output=True, text=True, timeout=120, check=False
    )


def test_rebuild_brings_every_image_back_after_redis_lost_its_data(
    api: Api, run_jobs: RunJobs, env: dict[str, str], redis_client: Redis
) -> None:
    ready = api.upload(landscape(), "ready").json
    run_jobs()
    ready = api.request("GET", "/v1/images/ready").json
    waiting = api.upload(portrait(), "waiting").json  # its conversion never ran

    redis_client.flushdb()  # Redis restarted without persistence
    assert api.request("GET", "/v1/images/ready").status == 404

    done = admin(env, "rebuild")
    assert done.returncode == 0, done.stderr
    assert "2 restored (1 queued for conversion)" in done.stdout
    again = admin(env, "rebuild")
    assert again.returncode == 0 and "0 restored" in again.stdout and "2 already" in again.stdout

    back = api.request("GET", "/v1/images/ready").json
    assert back["status"] == "ready" and back["blake3"] == ready["blake3"]
    assert [v["url"] for v in back["variants"]] == [v["url"] for v in ready["variants"]]
    assert api.request("GET", back["variants"][0]["url"]).status == 200
    assert api.upload(portrait(), "ready").status == 409  # other bytes: still a conflict
    assert api.upload(landscape(), "ready").status == 200  # same bytes: idempotent

    assert api.request("GET", "/v1/images/waiting").json["blake3"] == waiting["blake3"]
    run_jobs()
    assert api.request("GET", "/v1/images/waiting").json["status"] == "ready"
    listed = api.request("GET", "/v1/images").json["images"]
    assert {i["id"] for i in listed} == {"ready", "waiting"}


# ------------------------------------------------------------------ 9. leftover multipart


def test_the_multipart_upload_of_a_killed_web_process_is_aborted_within_minutes(
    start_api: StartApi, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    server, api = start_api({**env, "PICSTREAM_LEASE_SECONDS": "1"})
    body = Body(12 * 1024 * 1024)
    head = api.headers_for("PUT", "/v1/images/big", f"Content-Length: {body.size}\r\n")
    sock = socket.create_connection((api.host, api.port))
    sock.sendall(head + body.read_all()[: 6 * 1024 * 1024])  # then nothing more
    try:
        wait_until(lambda: store.incomplete_uploads() != [], 20, "the multipart upload to start")
        os.killpg(server.proc.pid, signal.SIGKILL)  # master and workers, mid-upload
        server.proc.wait()
    finally:
        sock.close()
    started = time.monotonic()
    records = Records(redis_client)
    # What the worker's janitor does every PICSTREAM_JANITOR_INTERVAL seconds.
    wait_until(
        lambda: janitor.run_once(store, records).abandoned > 0 or not store.incomplete_uploads(),
        10,
        "the janitor to abort the dead process's upload",
    )
    assert store.incomplete_uploads() == []
    assert time.monotonic() - started < 10
    _, again = start_api(env)
    assert again.upload(landscape(), "big").status == 201  # the id is free again


# ------------------------------------------------------------------ existing data


def test_images_stored_before_incarnations_are_served_then_migrated(
    api: Api, run_jobs: RunJobs, env: dict[str, str], store: Store, redis_client: Redis
) -> None:
    # What the previous version wrote: flat keys, a record without gen or vset.
    made = api.upload(landscape(), "old").json
    run_jobs()
    made = api.request("GET", "/v1/images/old").json
    legacy = {k: v for k, v in made.items() if k not in ("gen", "vset", "pending", "url")}
    legacy = {k: v for k, v in legacy.items() if not k.endswith("url")}
    for variant in legacy["variants"]:
        variant.pop("url", None)
    moved = keys_of(made)
    store.copy(moved.original, "alice/old/original")
    for variant in made["variants"]:
        store.copy(variant_key(made, variant["name"]), f"alice/old/{variant['name']}")
    store.put_json("alice/old/record.json", legacy)
    store.delete_prefix(moved.prefix)
    redis_client.set("picstream:image:alice:old", json.dumps(legacy))

    served = api.request("GET", "/v1/images/old")
    assert served.status == 200 and served.json["gen"] == ""
    for variant in served.json["variants"]:
        assert api.request("GET", variant["url"]).status == 200
    assert api.request("GET", "/v1/images/old/original").body == landscape()
    assert api.request("POST", "/v1/images/old/reconvert").status == 409  # migrate first

    done = admin(env, "migrate")
    assert done.returncode == 0 and "1 image(s) moved" in done.stdout, done.stderr
    assert admin(env, "migrate").stdout.strip().endswith("0 image(s) moved")
    now = api.request("GET", "/v1/images/old").json
    assert now["gen"] and now["blake3"] == made["blake3"] and now["status"] == "ready"
    for variant in now["variants"]:
        assert api.request("GET", variant["url"]).status == 200
    assert [k for k in store.keys("alice/old/") if k.count("/") == 2] == []  # flat ones gone
    assert api.request("POST", "/v1/images/old/reconvert").status == 202
    run_jobs()
    assert api.request("GET", "/v1/images/old").json["status"] == "ready"
    assert api.request("DELETE", "/v1/images/old").status == 204
    assert store.keys("alice/old/") == []


def test_an_upload_whose_abort_failed_is_aborted_once_the_store_is_back(
    start_api: StartApi,
    env: dict[str, str],
    s3_outage: Outage,
    store: Store,
    redis_client: Redis,
) -> None:
    _, api = start_api({**env, "S3_ENDPOINT": s3_outage.endpoint, "PICSTREAM_LEASE_SECONDS": "1"})
    body = Body(12 * 1024 * 1024)
    head = api.headers_for("PUT", "/v1/images/big", f"Content-Length: {body.size}\r\n")
    sock = socket.create_connection((api.host, api.port))
    sock.sendall(head + body.read_all()[: 6 * 1024 * 1024])
    wait_until(lambda: store.incomplete_uploads() != [], 20, "the multipart upload to start")
    s3_outage.cut()  # the store goes away; then the client does too: the abort fails
    sock.close()
    # The web process gives up on the upload and releases the id...
    wait_until(lambda: not redis_client.exists("picstream:lease:alice:big"), 20, "the release")
    assert len(store.incomplete_uploads()) == 1  # ...but its abort could not reach the store
    records = Records(redis_client)
    wait_until(lambda: janitor.run_once(store, records).abandoned == 1, 10, "the janitor")
    assert store.incomplete_uploads() == []
