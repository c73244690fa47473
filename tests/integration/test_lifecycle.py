"""Image lifecycle under reuse of ids and faults: nothing lost, nothing leaked, and the
answer a client got agrees with what the system holds afterwards.

Real Redis, SeaweedFS and (where timing matters) gunicorn; faults are injected with TCP
forwarders that refuse (`Outage`) or hold bytes (`Stall`), never with sleeps.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import falcon.testing
import pytest
from redis import Redis

from core import janitor
from core.records import Records, lease_key
from core.settings import Settings
from core.storage import Store
from tests import servers
from tests.faults import Outage, Stall
from tests.http import Api
from tests.images import Body
from tests.keys import keys_of, variant_key
from tests.lifecycle import (
    AS_ALICE,
    ClientWith,
    RunJobs,
    StartApi,
    delete_while_the_store_is_down,
    finals,
    get,
    landscape,
    portrait,
    put,
    run_job_midway,
    served_variant_sizes,
    store_as_legacy,
    stream,
    sweep_a_week_later,
    wait_until,
)
from worker.jobs import RETIRE_GRACE

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
    delete_while_the_store_is_down(client, s3_outage, "x")

    second = put(client, "x", portrait())
    assert second.status_code == 201
    run_jobs()
    # The sweep that finishes the first image's deletion, and every later one.
    sweep_a_week_later(store, redis_client)

    record = get(client, "x")
    assert record["status"] == "ready" and record["blake3"] == second.json["blake3"]
    assert store.read_bytes(keys_of(record).original) == portrait()
    assert served_variant_sizes(client, record) == {(200, 300)}
    assert store.keys(keys_of(first).prefix) == []  # the deleted image is gone for good


# ------------------------------------------------------------------ 2. delete mid-conversion


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

    run_job_midway(settings, store, redis_client, old, delete_and_reupload)  # the old job
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
    with Stall(redis_server.port) as stall:
        yield stall


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
    assert not Records(redis_client).exists("alice", "late")
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
        # The key's TTL is the only observable of a renewal (the 409 below shows the id
        # taken, not that the lease was renewed rather than set long).
        lease = lease_key("alice", "x")
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

    run_job_midway(settings, store, redis_client, first, reconvert)
    assert get(client, "x")["status"] == "processing"  # the reconversion ends this run
    run_jobs()

    record = get(client, "x")
    assert record["status"] == "ready" and record["pending"] is None
    story = stream(redis_client, record)
    assert all(e["status"] != "failed" for e in story)
    ended = finals(story)
    assert len(ended) == 1 and ended[0]["status"] == "ready"
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
    store_as_legacy(store, redis_client, made)

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
    # The lease key is the only observable of the release: a new upload of the id would
    # start a multipart upload of its own and muddle the count below.
    lease = lease_key("alice", "big")
    wait_until(lambda: not redis_client.exists(lease), 20, "the release")
    assert len(store.incomplete_uploads()) == 1  # ...but its abort could not reach the store
    records = Records(redis_client)
    wait_until(lambda: janitor.run_once(store, records).abandoned == 1, 10, "the janitor")
    assert store.incomplete_uploads() == []
