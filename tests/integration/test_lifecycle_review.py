"""Lifecycle faults found in review: each test is one scenario that lost an image, leaked a
deleted one, left half state, or told a client something the system did not hold.

Real Redis, SeaweedFS and (where a process must die) gunicorn; faults are injected with the
TCP forwarders of tests/faults.py or at a precise step through a store that acts once,
never with sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import falcon.testing
import pytest
from redis import Redis
from rq.job import Job
from rq.serializers import JSONSerializer

from api.app import Collaborators, create_app
from api.main import build_collaborators
from core import janitor
from core.errors import QueueUnavailable, StorageUnavailable
from core.jobs import CONVERT, make_queue
from core.leases import UploadLease
from core.migrate import migrate_image
from core.models import ImageRecord, new_generation
from core.rebuild import rebuild
from core.records import Records, connect, lease_key
from core.settings import Settings
from core.storage import Store
from tests import servers
from tests.faults import Outage, Stall
from tests.integration.conftest import ConfigureJobs, close_services
from tests.keys import keys_of
from tests.lifecycle import (
    AS_ALICE,
    ActingStore,
    ClientWith,
    RunJobs,
    StartApi,
    delete_while_the_store_is_down,
    finals,
    get,
    landscape,
    put,
    run_job_losing_the_store_at_its_record_copy,
    store_as_legacy,
    stream,
    sweep_a_week_later,
    wait_until,
    while_watching,
)
from worker.jobs import ImageJob, conversion_failed
from worker.services import JobServices


@pytest.fixture()
def redis_outage(redis_server: servers.Server) -> Iterator[Outage]:
    with Outage(redis_server.port, down=False) as outage:
        yield outage


def make_legacy(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    redis_client: Redis,
    image_id: str,
    status: str | None = None,
) -> dict[str, Any]:
    """An image as the version before incarnations stored it: flat keys, no gen/vset."""
    assert put(client, image_id, landscape()).status_code == 201
    run_jobs()
    made = get(client, image_id)
    store_as_legacy(store, redis_client, made, status)
    return made


# ------------------------------------------------------------------ two migrations at once


def test_two_migrations_of_one_image_at_once_keep_it(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_client: Redis,
) -> None:
    """`picstream-admin migrate` while a legacy job migrates the same image (or two migrate
    runs): both copy into the same derived incarnation; the one that loses the race must
    not delete what the winner made live."""
    made = make_legacy(client, run_jobs, store, redis_client, "old")
    records = Records(redis_client)

    def other_migration() -> None:
        assert migrate_image(store, records, settings, "alice", "old")

    racing = ActingStore(store, lambda method, key: method == "put_json", other_migration)
    assert not migrate_image(racing, records, settings, "alice", "old")

    record = get(client, "old")
    assert record["gen"] and record["blake3"] == made["blake3"]
    original = client.simulate_get("/v1/images/old/original", headers=AS_ALICE)
    assert original.status_code == 200 and original.content == landscape()
    for variant in record["variants"]:
        path = urlsplit(variant["url"]).path
        assert client.simulate_get(path, headers=AS_ALICE).status_code == 200, variant


def test_deleting_a_legacy_image_after_an_interrupted_migration_leaves_no_copy(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_outage: Outage,
    redis_client: Redis,
) -> None:
    """`migrate` stopped after copying an image (Redis went away before the record was
    switched); the image is then deleted. Its copies under the new layout must go too: no
    record will ever name them, and `rebuild` would bring the deleted image back."""
    make_legacy(client, run_jobs, store, redis_client, "old")
    flaky = connect(replace(settings, redis_url=f"redis://127.0.0.1:{redis_outage.port}/0"))
    cutting = ActingStore(store, lambda method, key: method == "put_json", redis_outage.cut)
    with pytest.raises(QueueUnavailable):
        migrate_image(cutting, Records(flaky), settings, "alice", "old")
    flaky.close()
    flaky.connection_pool.disconnect()
    copied = [k for k in store.keys("alice/old/") if k.count("/") == 3]
    assert any(k.endswith("/record.json") for k in copied)  # copies and their record

    assert client.simulate_delete("/v1/images/old", headers=AS_ALICE).status_code == 204
    assert rebuild(store, Records(redis_client), settings).restored == 0
    assert client.simulate_get("/v1/images/old", headers=AS_ALICE).status_code == 404
    assert store.keys("alice/old/") == []


# ------------------------------------------------------------------ a job that runs again


def test_a_job_run_again_after_it_finished_changes_nothing_and_ends_nothing_twice(
    client: falcon.testing.TestClient,
    settings: Settings,
    store: Store,
    s3_outage: Outage,
    redis_client: Redis,
    configure_jobs: ConfigureJobs,
) -> None:
    """The record switched to `ready` (with its final event and webhook), then the bucket
    copy could not be written: the job raised and rq runs it again. The retry must not
    take the served variants back to `pending`, nor end the run a second time; and once
    the retries are spent, giving up must not turn the ready image into `failed`."""
    made = put(client, "x", landscape()).json
    run_job_losing_the_store_at_its_record_copy(
        settings, s3_outage, redis_client, "x", made["gen"], made["vset"]
    )
    ready = get(client, "x")
    assert ready["status"] == "ready"
    s3_outage.down = False

    again = JobServices(settings, store, Records(redis_client))
    job = ImageJob(again, "alice", "x", made["gen"], made["vset"])
    seen = while_watching(redis_client, "x", job.run)  # rq's retry
    assert {r.status for r in seen} == {"ready"}, "the retry took a ready image back"
    assert get(client, "x") == ready
    assert len(finals(stream(redis_client, ready))) == 1
    copy = json.loads(store.read_bytes(keys_of(ready).record))
    assert copy["status"] == "ready"  # the bucket copy caught up

    queue = make_queue(redis_client, settings.queue, settings.job_timeout)
    kwargs = {"owner": "alice", "image_id": "x", "gen": made["gen"], "vset": made["vset"]}
    spent = Job.fetch(
        queue.enqueue_call(CONVERT, kwargs=kwargs).id,
        connection=redis_client,
        serializer=JSONSerializer,
    )
    spent.retries_left = 0  # the last attempt failed the same way: rq gives up
    conversion_failed(spent, redis_client, StorageUnavailable, StorageUnavailable("x"), None)
    assert get(client, "x") == ready
    assert len(finals(stream(redis_client, ready))) == 1


def test_a_reconvert_job_run_again_after_its_switch_leaves_the_served_set_alone(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    settings: Settings,
    store: Store,
    s3_outage: Outage,
    redis_client: Redis,
) -> None:
    assert put(client, "x", landscape()).status_code == 201
    run_jobs()
    assert client.simulate_post("/v1/images/x/reconvert", headers=AS_ALICE).status_code == 202
    pending = Records(redis_client).get("alice", "x")
    assert pending.pending is not None
    vset = pending.pending.vset
    run_job_losing_the_store_at_its_record_copy(
        settings, s3_outage, redis_client, "x", pending.gen, vset
    )
    switched = get(client, "x")
    assert switched["status"] == "ready" and switched["vset"] == vset
    s3_outage.down = False

    # A second reconvert is queued meanwhile: the image is `processing` again.
    assert client.simulate_post("/v1/images/x/reconvert", headers=AS_ALICE).status_code == 202
    before = get(client, "x")
    again = JobServices(settings, store, Records(redis_client))
    retry = ImageJob(again, "alice", "x", pending.gen, vset)
    seen = while_watching(redis_client, "x", retry.run)  # rq's retry of the first reconvert
    served = {tuple(v.status for v in r.variants) for r in seen}
    assert served == {("ready",) * len(before["variants"])}, "served variants went pending"
    assert get(client, "x") == before
    run_jobs()
    done = get(client, "x")
    assert done["status"] == "ready"
    assert len(finals(stream(redis_client, done))) == 3  # upload, reconvert, reconvert


# ------------------------------------------------------------------ legacy job gives up


def test_a_legacy_job_that_gives_up_does_not_leave_its_image_processing(
    client: falcon.testing.TestClient,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_client: Redis,
    configure_jobs: ConfigureJobs,
) -> None:
    """A conversion queued by the previous version ({owner, image_id}) whose last attempt
    failed: the image must end `failed`, not stay `processing` with nothing queued."""
    make_legacy(client, run_jobs, store, redis_client, "old", status="processing")
    queue = make_queue(redis_client, settings.queue, settings.job_timeout)
    queued = queue.enqueue_call(
        CONVERT, kwargs={"owner": "alice", "image_id": "old"}, on_failure=None
    )
    job = Job.fetch(queued.id, connection=redis_client, serializer=JSONSerializer)
    job.retries_left = 0
    conversion_failed(job, redis_client, StorageUnavailable, StorageUnavailable("x"), None)
    record = get(client, "old")
    assert record["status"] == "failed" and record["gen"] == "", record


# ------------------------------------------------------------------ rebuild on a live system


def test_rebuild_never_brings_back_an_image_deleted_while_the_store_was_down(
    client_with: ClientWith,
    s3_outage: Outage,
    run_jobs: RunJobs,
    store: Store,
    settings: Settings,
    redis_client: Redis,
) -> None:
    client = client_with(S3_ENDPOINT=s3_outage.endpoint)
    made = put(client, "x", landscape()).json
    run_jobs()
    delete_while_the_store_is_down(client, s3_outage, "x")

    # The operator runs a rebuild (safe on a live system) before the janitor got to it.
    done = rebuild(store, Records(redis_client), settings)
    assert done.restored == 0, done
    assert client.simulate_get("/v1/images/x", headers=AS_ALICE).status_code == 404
    assert client.simulate_get("/v1/images/x/original", headers=AS_ALICE).status_code == 404
    sweep_a_week_later(store, redis_client)
    assert store.keys(keys_of(made).prefix) == []


# ------------------------------------------------------------------ the commit fence


def test_a_commit_whose_fence_was_set_late_is_decided_after_that_fence(
    redis_server: servers.Server, env: dict[str, str], redis_client: Redis
) -> None:
    """Redis stalls as the commit shortens its lease: the first two tries time out and
    redis-py's retry sets the fence a couple of seconds later than the commit started.
    When the EXEC's answer is then lost, "not committed" may only be concluded once that
    fence has passed: an EXEC arriving after the API answered 503 (and deleted the
    objects) must not commit a record that names a missing original."""
    inner = Stall(redis_server.port)  # holds the EXEC
    middle = Stall(inner.port)  # holds the second try of the freeze
    outer = Stall(middle.port)  # holds the first try of the freeze
    stalls = (outer, middle, inner)
    try:
        settings = Settings.from_env(
            {**env, "REDIS_URL": outer.redis_url, "PICSTREAM_REDIS_TIMEOUT": "1"}
        )
        client = connect(settings)
        lease = UploadLease(client, "alice", "x", ttl=30)
        assert lease.acquire()
        for stall in (outer, middle):
            stall.hold_on(b"$4\r\n2000\r\n")  # the freeze's PEXPIRE argument
        inner.hold_on(b"EXEC")
        record = ImageRecord(
            id="x", owner="alice", size=1, blake3="0" * 64, format="png",
            content_type="image/png", width=1, height=1, orientation=1, filename=None,
            created_at="2026-01-01T00:00:00.000Z", gen=new_generation(), vset=new_generation(),
        )  # fmt: skip
        outcome: list[BaseException | None] = []

        def commit() -> None:
            try:
                Records(client).commit(record, lease, lambda pipe: None, fence=2.0)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the test inspects it
                outcome.append(exc)

        committing = threading.Thread(target=commit)
        committing.start()
        committing.join(timeout=30)
        assert outer.held.is_set() and middle.held.is_set() and inner.client_gone.is_set()
        assert isinstance(outcome[0], QueueUnavailable), outcome  # "not committed"
        inner.release()  # and now the EXEC arrives
        wait_until(inner.answered.is_set, 10, "Redis to answer the late EXEC")
        assert not Records(redis_client).exists("alice", "x"), "committed after all"
        client.close()
        client.connection_pool.disconnect()
    finally:
        for stall in stalls:
            stall.close()


# ------------------------------------------------------------------ a web process dies


def test_a_web_process_killed_after_storing_the_original_leaves_nothing_behind(
    start_api: StartApi,
    env: dict[str, str],
    redis_server: servers.Server,
    store: Store,
    settings: Settings,
    redis_client: Redis,
) -> None:
    """Killed between writing the original (+ record.json) and its commit: no record, so
    the objects must be purged by the janitor — and never brought back by `rebuild`."""
    stall = Stall(redis_server.port)
    try:
        server, api = start_api({**env, "REDIS_URL": stall.redis_url})
        stall.hold_on(b"EXEC")
        answers: list[Any] = []

        def upload() -> None:
            try:
                answers.append(api.upload(landscape(), "x"))
            except OSError as exc:
                answers.append(exc)

        uploading = threading.Thread(target=upload)
        uploading.start()
        wait_until(stall.held.is_set, 20, "the upload to reach its commit")
        assert store.keys("alice/x/")  # original and record.json are stored
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        uploading.join(timeout=30)
        # The lease key is the only observable of its lapse short of a new upload, which
        # would take the id and hide whether the dead process's EXEC could still commit.
        lease = lease_key("alice", "x")
        wait_until(lambda: not redis_client.exists(lease), 30, "the lease to lapse")
        stall.release()  # the dead process's EXEC, too late
        wait_until(stall.answered.is_set, 10, "Redis to refuse the late EXEC")
    finally:
        stall.close()
    assert not Records(redis_client).exists("alice", "x")

    records = Records(redis_client)
    assert rebuild(store, records, settings).restored == 0  # never acknowledged
    assert not Records(redis_client).exists("alice", "x")
    janitor.run_once(store, records, now=time.time() + 3600)
    assert store.keys("alice/x/") == []


def test_uploads_that_commit_or_never_reach_the_store_leave_no_purge_behind(
    client: falcon.testing.TestClient, redis_client: Redis
) -> None:
    """The guard of an upload's objects costs nothing once decided: cancelled by the
    commit, or at once when the body was rejected before any S3 call."""
    assert put(client, "x", b"not an image at all").status_code == 415
    assert put(client, "x", landscape()).status_code == 201
    assert Records(redis_client).due_purges(now=time.time() + 86_400) == []


# ------------------------------------------------------------------ answers that disagree


def test_a_reconvert_whose_bucket_copy_fails_is_still_accepted(
    client_with: ClientWith,
    s3_outage: Outage,
    run_jobs: RunJobs,
    redis_client: Redis,
) -> None:
    """The reconversion is committed and queued before the bucket copy of the record is
    written: a store failure there must not answer 503 for a reconvert that will run."""
    client = client_with(S3_ENDPOINT=s3_outage.endpoint)
    assert put(client, "x", landscape()).status_code == 201
    run_jobs()
    before = get(client, "x")
    s3_outage.cut()
    resp = client.simulate_post("/v1/images/x/reconvert", headers=AS_ALICE)
    s3_outage.down = False
    record = Records(redis_client).get("alice", "x")
    assert record.pending is not None  # it was accepted...
    assert resp.status_code == 202, resp.text  # ...and the client must be told so
    run_jobs()
    after = get(client, "x")
    assert after["status"] == "ready" and after["vset"] != before["vset"]


def test_a_delete_committed_before_redis_went_away_is_answered_as_done(
    env: dict[str, str],
    s3_outage: Outage,
    redis_outage: Outage,
    store: Store,
    redis_client: Redis,
) -> None:
    """The record is deleted (with a purge in the same transaction); then the store fails
    and Redis goes away before the early purge is queued: the image is gone and its files
    will be purged, so the answer is 202, not 503."""
    redis_url = f"redis://127.0.0.1:{redis_outage.port}/0"
    settings = Settings.from_env({**env, "S3_ENDPOINT": s3_outage.endpoint, "REDIS_URL": redis_url})
    services: Collaborators = build_collaborators(settings)
    try:

        def both_down() -> None:
            s3_outage.cut()
            redis_outage.cut()

        services = replace(
            services,
            store=ActingStore(
                services.store, lambda method, key: method == "delete_prefix", both_down
            ),
        )
        client = falcon.testing.TestClient(create_app(services))
        made = put(client, "x", landscape()).json
        resp = client.simulate_delete("/v1/images/x", headers=AS_ALICE)
        assert resp.status_code == 202, resp.text
    finally:
        close_services(services)
    s3_outage.down = redis_outage.down = False
    assert not Records(redis_client).exists("alice", "x")
    sweep_a_week_later(store, redis_client)
    assert store.keys(keys_of(made).prefix) == []
