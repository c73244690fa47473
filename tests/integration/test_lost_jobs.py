"""A conversion whose rq job was lost is queued again by the janitor (core/inflight.py).

Each test puts Redis in the state a fault leaves (a worker that took the job and died
before registering it; a failover to a replica that missed the job's registration or the
record's last update) with rq's own operations, then runs janitor sweeps (as if later:
`now`) and the jobs, and looks at what a client sees: the image's status and variants, and
what is queued.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

import falcon.testing
import pytest
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core import inflight
from core.events import events_key
from core.inflight import CONFIRM_AFTER, INFLIGHT, LOST_FLOOR, in_flight
from core.jobs import requeue_for
from core.profiles import parse_profiles
from core.records import Records
from core.settings import Settings
from core.storage import Store
from tests import pixels
from tests.integration.conftest import ALICE_KEY
from tests.lost import sweep_later, take_the_job
from worker.jobs import ImageJob, current_profiles
from worker.services import JobServices

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
LATER = 100.0  # the first sweep acts as if this many seconds had passed: past LOST_AFTER
LOST_AFTER = LOST_FLOOR  # a flight not seen alive for this long is looked at
CONFIRMED = LATER + CONFIRM_AFTER  # the sweep that finds it dead a second time


def upload(client: falcon.testing.TestClient) -> str:
    body = pixels.save(pixels.marked(), "JPEG")
    resp = client.simulate_post("/v1/images", body=body, headers=AS_ALICE)
    assert resp.status_code == 201, resp.text
    return str(resp.json["id"])


def image(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    resp = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE)
    return dict(resp.json) if resp.status_code == 200 else {"status": resp.status_code}


def assert_converted(client: falcon.testing.TestClient, redis_client: Redis, image_id: str) -> None:
    record = image(client, image_id)
    assert record["status"] == "ready", record
    assert record["variants"] and all(v["status"] == "ready" for v in record["variants"])
    assert in_flight(redis_client) == []  # its run ended: nothing for the janitor to watch


def sweep(store: Store, redis_client: Redis, settings: Settings, later: float) -> int:
    """How many conversions a janitor sweep `later` seconds from now queued again."""
    return sweep_later(store, redis_client, settings, later).requeued


def queued(redis_client: Redis, settings: Settings) -> list[Job]:
    queue = Queue(settings.queue, connection=redis_client, serializer=JSONSerializer)
    return queue.get_jobs()


def test_a_job_lost_by_a_dying_worker_is_queued_again_and_the_image_ends_ready(
    client: falcon.testing.TestClient,
    run_jobs: Any,
    store: Store,
    redis_client: Redis,
    settings: Settings,
) -> None:
    image_id = upload(client)
    take_the_job(redis_client, settings.queue)
    run_jobs()
    assert image(client, image_id)["status"] == "processing"  # stuck, as it was before

    assert sweep(store, redis_client, settings, LATER) == 0  # dead once: suspected
    assert sweep(store, redis_client, settings, LATER + CONFIRM_AFTER / 2) == 0
    assert sweep(store, redis_client, settings, CONFIRMED) == 1
    assert len(queued(redis_client, settings)) == 1
    run_jobs()
    assert_converted(client, redis_client, image_id)


def test_a_job_caught_between_two_of_rqs_writes_once_is_not_queued_again(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    """A sweep that reads a live job between rq's BLPOP and its registration finds it
    nowhere, once: by the next sweep it is started, with heartbeats."""
    upload(client)
    job = take_the_job(redis_client, settings.queue)
    assert sweep(store, redis_client, settings, LATER) == 0
    job.set_status(JobStatus.STARTED)
    job.heartbeat(datetime.fromtimestamp(time.time() + CONFIRMED - 5, UTC), 60)
    assert sweep(store, redis_client, settings, CONFIRMED) == 0
    assert queued(redis_client, settings) == []


def test_a_job_waiting_in_its_queue_is_left_alone(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    upload(client)
    upload(client)
    before = [job.id for job in queued(redis_client, settings)]
    for later in (LATER, CONFIRMED, CONFIRMED + LOST_AFTER + 1):
        assert sweep(store, redis_client, settings, later) == 0
    assert [job.id for job in queued(redis_client, settings)] == before
    assert len(in_flight(redis_client)) == 2


@pytest.mark.parametrize("status", [JobStatus.STARTED, JobStatus.QUEUED])
def test_a_job_with_recent_heartbeats_is_alive_whatever_its_status(
    client: falcon.testing.TestClient,
    store: Store,
    redis_client: Redis,
    settings: Settings,
    status: JobStatus,
) -> None:
    """A work-horse converting while the failover lost the job's registration (status
    `queued` on the promoted replica): its worker's heartbeats still reach the new master.
    Once they stop for LOST_AFTER, the job is lost."""
    upload(client)
    job = take_the_job(redis_client, settings.queue)
    job.set_status(status)
    for later in (LATER, CONFIRMED):
        job.heartbeat(datetime.fromtimestamp(time.time() + later - 5, UTC), 60)
        assert sweep(store, redis_client, settings, later) == 0
    assert queued(redis_client, settings) == []

    # The heartbeats stopped: found dead a LOST_AFTER after the last sighting, and again.
    gone = CONFIRMED + LOST_AFTER + 1
    assert sweep(store, redis_client, settings, gone) == 0
    assert sweep(store, redis_client, settings, gone + CONFIRM_AFTER) == 1
    assert len(queued(redis_client, settings)) == 1


def test_a_finished_job_whose_record_update_was_lost_is_converted_again(
    client: falcon.testing.TestClient,
    run_jobs: Any,
    store: Store,
    redis_client: Redis,
    settings: Settings,
) -> None:
    """A failover to a replica that missed the job's last record update, while rq's
    bookkeeping (job finished) reached the new master: the record says `processing`."""
    image_id = upload(client)
    accepted = Records(redis_client).get("alice", image_id)
    flights = in_flight(redis_client)
    run_jobs()
    assert image(client, image_id)["status"] == "ready"
    # The replica's state: the record as committed, still in flight; the job finished.
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.multi()
        pipe.set(f"picstream:image:alice:{image_id}", json.dumps(accepted.to_dict()))
        for flight in flights:
            pipe.zadd(INFLIGHT, {flight.member: time.time()})
        pipe.execute()
    assert image(client, image_id)["status"] == "processing"

    assert sweep(store, redis_client, settings, LATER) == 0
    assert sweep(store, redis_client, settings, CONFIRMED) == 1
    run_jobs()
    assert_converted(client, redis_client, image_id)


def test_a_lost_job_of_a_deleted_image_is_not_queued_again(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    image_id = upload(client)
    take_the_job(redis_client, settings.queue)
    resp = client.simulate_delete(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert resp.status_code == 204
    assert sweep(store, redis_client, settings, LATER) == 0
    assert in_flight(redis_client) == []  # left at the first look: nothing wants it
    assert queued(redis_client, settings) == []
    assert image(client, image_id) == {"status": 404}


def test_overlapping_janitors_queue_a_lost_job_again_once(
    client: falcon.testing.TestClient,
    store: Store,
    redis_client: Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sweep that outlives its lock, or `picstream-admin janitor` beside the workers':
    both find the job lost, one queues it again."""
    upload(client)
    take_the_job(redis_client, settings.queue)
    records = Records(redis_client)
    requeue = requeue_for(redis_client, settings)
    now = time.time()
    assert inflight.requeue_lost(records, requeue, now + LATER) == 0
    real_alive = inflight._alive
    nested: list[int] = []

    def alive_then_the_other_janitor(*args: Any) -> bool:
        seen = real_alive(*args)
        if not nested:  # the other janitor runs its whole sweep right here
            nested.append(0)
            nested[0] = inflight.requeue_lost(records, requeue, now + CONFIRMED)
        return seen

    monkeypatch.setattr(inflight, "_alive", alive_then_the_other_janitor)
    assert inflight.requeue_lost(records, requeue, now + CONFIRMED) + sum(nested) == 1
    assert len(queued(redis_client, settings)) == 1


def test_a_duplicate_beside_a_live_conversion_leaves_the_image_ready(
    client: falcon.testing.TestClient,
    redis_client: Redis,
    configure_jobs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A false alarm's duplicate (or rq's retry of a job whose worker it wrongly took for
    dead) starts while the first run is finishing: neither sends the other's variants back
    to `pending`, and the image ends `ready`, once."""
    image_id = upload(client)
    record = Records(redis_client).get("alice", image_id)
    services = JobServices.current()
    first = ImageJob(services, "alice", image_id, record.gen, record.vset)
    duplicate = ImageJob(services, "alice", image_id, record.gen, record.vset)
    real_finish = ImageJob._finish

    def finish(self: ImageJob) -> None:
        if self is first:  # the duplicate has decoded the original and starts now
            current = services.records.get("alice", image_id)
            profile = current_profiles(duplicate.conversion).require(current.profile)
            with tempfile.TemporaryDirectory() as tmp:
                conversion = duplicate._open(os.path.join(tmp, "original"), current, profile)
                assert conversion is not None
                duplicate._start(conversion)
        real_finish(self)

    monkeypatch.setattr(ImageJob, "_finish", finish)
    first.run()
    duplicate.run()
    assert_converted(client, redis_client, image_id)
    finals = [e for e in events(redis_client, record.gen, image_id) if e["type"] == "status"]
    assert [e["status"] for e in finals].count("ready") == 1  # one final event


def events(redis_client: Redis, gen: str, image_id: str) -> list[dict[str, str]]:
    entries = redis_client.xrange(events_key("alice", image_id, gen))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


SMALLER_PLAN = """
[profiles.default]
formats = ["jpeg"]
widths = [64]
"""


def test_a_run_replanned_by_a_duplicate_leaves_the_set_to_it(
    client: falcon.testing.TestClient,
    redis_client: Redis,
    store: Store,
    configure_jobs: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The profiles file changed between two runs of one set (a duplicate started while
    the first ran): the first run's next variant is not in the set any more. It stops and
    deletes nothing: the set is the other run's, and the image ends `ready` with it."""
    image_id = upload(client)
    record = Records(redis_client).get("alice", image_id)
    services = JobServices.current()
    first = ImageJob(services, "alice", image_id, record.gen, record.vset)
    duplicate = ImageJob(services, "alice", image_id, record.gen, record.vset)
    real_set_variant = ImageJob._set_variant

    def set_variant(self: ImageJob, variant: Any) -> None:
        if self is first and not getattr(first, "replanned", False):
            first.replanned = True  # type: ignore[attr-defined]
            current = services.records.get("alice", image_id)
            smaller = parse_profiles(SMALLER_PLAN, "test").require(None)
            with tempfile.TemporaryDirectory() as tmp:
                conversion = duplicate._open(os.path.join(tmp, "original"), current, smaller)
                assert conversion is not None
                duplicate._start(conversion)
                for made in conversion.render_all(1):  # made and stored, not yet finished
                    real_set_variant(duplicate, duplicate._store(made))
        real_set_variant(self, variant)

    monkeypatch.setattr(ImageJob, "_set_variant", set_variant)
    first.run()
    duplicate._finish()
    assert_converted(client, redis_client, image_id)
    names = [v["name"] for v in image(client, image_id)["variants"]]
    assert names == ["w64.jpg"]
    download = client.simulate_get(f"/v1/images/{image_id}/variants/w64.jpg", headers=AS_ALICE)
    assert download.status_code == 200  # its object is still there
