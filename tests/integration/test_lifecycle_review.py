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
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, cast
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
from core.events import events_key
from core.jobs import CONVERT, make_queue
from core.leases import UploadLease
from core.migrate import migrate_image
from core.models import ImageRecord, new_generation
from core.rebuild import rebuild
from core.records import Records, connect
from core.settings import Settings
from core.storage import Store
from tests import pixels, servers
from tests.faults import Outage, Stall
from tests.http import Api
from tests.integration.conftest import ALICE_KEY, ConfigureJobs, close_services
from tests.keys import keys_of, variant_key
from worker.jobs import ImageJob, conversion_failed
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


def wait_until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stream(redis_client: Redis, record: dict[str, Any]) -> list[dict[str, str]]:
    key = events_key(record["owner"], record["id"], record["gen"])
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], redis_client.xrange(key))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def finals(story: list[dict[str, str]]) -> list[dict[str, str]]:
    return [e for e in story if e["type"] == "status" and e["status"] in ("ready", "failed")]


def while_watching(redis_client: Redis, image_id: str, act: Callable[[], None]) -> list[Any]:
    """Every state of the record seen while `act` runs (polled as fast as Redis answers)."""
    seen: list[ImageRecord] = []
    done = threading.Event()
    records = Records(redis_client)

    def watch() -> None:
        while not done.is_set():
            seen.append(records.get("alice", image_id))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        act()
    finally:
        done.set()
        watcher.join()
    seen.append(records.get("alice", image_id))
    return seen


class ActingStore(Store):
    """Runs `act` once, the first time `when(method, key)` holds, before that call."""

    def __init__(
        self, store: Store, when: Callable[[str, str], bool], act: Callable[[], None]
    ) -> None:
        super().__init__(store.client, store.bucket)
        self.when = when
        self.act: Callable[[], None] | None = act

    def _maybe(self, method: str, key: str) -> None:
        if self.act is not None and self.when(method, key):
            act, self.act = self.act, None
            act()

    def put_json(self, key: str, value: Any) -> None:
        self._maybe("put_json", key)
        super().put_json(key, value)

    def delete_prefix(self, prefix: str) -> int:
        self._maybe("delete_prefix", prefix)
        return super().delete_prefix(prefix)


@pytest.fixture()
def s3_outage(s3_server: servers.Server) -> Iterator[Outage]:
    outage = Outage(s3_server.port, down=False)
    yield outage
    outage.close()


@pytest.fixture()
def redis_outage(redis_server: servers.Server) -> Iterator[Outage]:
    outage = Outage(redis_server.port, down=False)
    yield outage
    outage.close()


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
    legacy = Records(redis_client).get("alice", image_id).to_dict()
    for name in ("gen", "vset", "pending"):
        legacy.pop(name)
    if status is not None:
        legacy["status"] = status
    moved = keys_of(made)
    store.copy(moved.original, f"alice/{image_id}/original")
    for variant in made["variants"]:
        store.copy(variant_key(made, variant["name"]), f"alice/{image_id}/{variant['name']}")
    store.put_json(f"alice/{image_id}/record.json", legacy)
    store.delete_prefix(moved.prefix)
    redis_client.set(f"picstream:image:alice:{image_id}", json.dumps(legacy))
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
    flaky = Store.from_settings(replace(settings, s3_endpoint=s3_outage.endpoint))
    cutting = ActingStore(flaky, lambda method, key: method == "put_json", s3_outage.cut)
    first = JobServices(settings, cutting, Records(redis_client))
    with pytest.raises(StorageUnavailable):
        ImageJob(first, "alice", "x", made["gen"], made["vset"]).run()
    ready = get(client, "x")
    assert ready["status"] == "ready"
    s3_outage.down = False

    again = JobServices(settings, store, Records(redis_client))
    job = ImageJob(again, "alice", "x", made["gen"], made["vset"])
    seen = while_watching(redis_client, "x", job.run)  # rq's retry
    assert {r.status for r in seen} == {"ready"}, "the retry took a ready image back"
    assert get(client, "x") == ready
    assert len(finals(stream(redis_client, ready))) == 1
    assert store.get_json(keys_of(ready).record)["status"] == "ready"  # the copy caught up

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
    flaky = Store.from_settings(replace(settings, s3_endpoint=s3_outage.endpoint))
    cutting = ActingStore(flaky, lambda method, key: method == "put_json", s3_outage.cut)
    first = JobServices(settings, cutting, Records(redis_client))
    with pytest.raises(StorageUnavailable):
        ImageJob(first, "alice", "x", pending.gen, vset).run()
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
    s3_outage.cut()
    assert client.simulate_delete("/v1/images/x", headers=AS_ALICE).status_code == 202
    s3_outage.down = False

    # The operator runs a rebuild (safe on a live system) before the janitor got to it.
    done = rebuild(store, Records(redis_client), settings)
    assert done.restored == 0, done
    assert client.simulate_get("/v1/images/x", headers=AS_ALICE).status_code == 404
    assert client.simulate_get("/v1/images/x/original", headers=AS_ALICE).status_code == 404
    janitor.run_once(store, Records(redis_client), now=time.time() + 7 * 86_400)
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
        assert not redis_client.exists("picstream:image:alice:x"), "committed after all"
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
        wait_until(
            lambda: not redis_client.exists("picstream:lease:alice:x"), 30, "the lease to lapse"
        )
        stall.release()  # the dead process's EXEC, too late
        wait_until(stall.answered.is_set, 10, "Redis to refuse the late EXEC")
    finally:
        stall.close()
    assert not redis_client.exists("picstream:image:alice:x")

    records = Records(redis_client)
    assert rebuild(store, records, settings).restored == 0  # never acknowledged
    assert not redis_client.exists("picstream:image:alice:x")
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
    assert not redis_client.exists("picstream:image:alice:x")
    janitor.run_once(store, Records(redis_client), now=time.time() + 7 * 86_400)
    assert store.keys(keys_of(made).prefix) == []
