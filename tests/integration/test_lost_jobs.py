"""A conversion whose rq job was lost is queued again by the janitor (core/inflight.py).

Each test puts Redis in the state a fault leaves (a worker that took the job and died
before registering it; a failover to a replica that missed the record's last update) with
rq's own operations, then runs a janitor sweep and the jobs, and looks at what a client
sees: the image's status and variants, and what is queued.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

import falcon.testing
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from core import janitor
from core.inflight import INFLIGHT, LOST_FLOOR, in_flight
from core.jobs import requeue_for
from core.records import Records
from core.settings import Settings
from core.storage import Store
from tests import pixels
from tests.integration.conftest import ALICE_KEY

AS_ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
LATER = 100.0  # the sweeps below act as if this many seconds had passed
LOST_AFTER = LOST_FLOOR  # a flight not seen alive for this long is lost


def upload(client: falcon.testing.TestClient) -> str:
    resp = client.simulate_post(
        "/v1/images", body=pixels.save(pixels.marked(), "JPEG"), headers=AS_ALICE
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json["id"])


def image(client: falcon.testing.TestClient, image_id: str) -> dict[str, Any]:
    resp = client.simulate_get(f"/v1/images/{image_id}", headers=AS_ALICE)
    return dict(resp.json) if resp.status_code == 200 else {"status": resp.status_code}


def sweep(store: Store, redis_client: Redis, settings: Settings) -> int:
    """One janitor sweep as the workers run it, as if LATER seconds had passed."""
    requeue = requeue_for(redis_client, settings)  # as `picstream-admin janitor` sweeps
    done = janitor.run_once(store, Records(redis_client), time.time() + LATER, requeue)
    return done.requeued


def queued(redis_client: Redis, settings: Settings) -> list[Job]:
    queue = Queue(settings.queue, connection=redis_client, serializer=JSONSerializer)
    return queue.get_jobs()


def lose_the_job(redis_client: Redis, settings: Settings) -> Job:
    """What a worker killed between taking the job (BLPOP, as rq does when it listens on
    several queues) and registering it leaves: the job is in no queue and no registry."""
    queue = Queue(settings.queue, connection=redis_client, serializer=JSONSerializer)
    job_id = redis_client.lpop(queue.key)
    assert job_id is not None
    return Job.fetch(job_id.decode(), connection=redis_client, serializer=JSONSerializer)


def test_a_job_lost_by_a_dying_worker_is_queued_again_and_the_image_ends_ready(
    client: falcon.testing.TestClient,
    run_jobs: Any,
    store: Store,
    redis_client: Redis,
    settings: Settings,
) -> None:
    image_id = upload(client)
    lose_the_job(redis_client, settings)
    run_jobs()
    assert image(client, image_id)["status"] == "processing"  # stuck, as it was before

    assert sweep(store, redis_client, settings) == 1
    assert len(queued(redis_client, settings)) == 1
    run_jobs()
    record = image(client, image_id)
    assert record["status"] == "ready"
    assert all(v["status"] == "ready" for v in record["variants"])
    assert in_flight(redis_client) == []  # its run ended: nothing for the janitor to watch


def test_a_job_waiting_in_its_queue_is_left_alone(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    upload(client)
    upload(client)
    before = [job.id for job in queued(redis_client, settings)]
    assert sweep(store, redis_client, settings) == 0
    assert [job.id for job in queued(redis_client, settings)] == before
    assert len(in_flight(redis_client)) == 2
    # Seen alive now: the next sweep within LOST_AFTER does not even look at them.
    assert sweep(store, redis_client, settings) == 0


def test_a_started_job_is_alive_while_its_heartbeats_are_recent(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    """A job rq marked started whose registration the failover lost: alive while its
    worker's heartbeats come (it will end the run), lost once they stopped."""
    upload(client)
    job = lose_the_job(redis_client, settings)
    job.set_status(JobStatus.STARTED)
    now = time.time() + LATER
    job.heartbeat(datetime.fromtimestamp(now - 10, UTC), 60)
    assert sweep(store, redis_client, settings) == 0
    assert queued(redis_client, settings) == []

    job.heartbeat(datetime.fromtimestamp(now - LOST_AFTER - 10, UTC), 60)
    # Seen alive by the sweep before: a candidate again only LOST_AFTER later.
    assert sweep(store, redis_client, settings) == 0
    requeue = requeue_for(redis_client, settings)  # as `picstream-admin janitor` sweeps
    later = janitor.run_once(store, Records(redis_client), now + LOST_AFTER + 1, requeue)
    assert later.requeued == 1
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
    records = Records(redis_client)
    accepted = records.get("alice", image_id)
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

    assert sweep(store, redis_client, settings) == 1
    run_jobs()
    record = image(client, image_id)
    assert record["status"] == "ready"
    assert all(v["status"] == "ready" for v in record["variants"])
    assert in_flight(redis_client) == []


def test_a_lost_job_of_a_deleted_image_is_not_queued_again(
    client: falcon.testing.TestClient, store: Store, redis_client: Redis, settings: Settings
) -> None:
    image_id = upload(client)
    lose_the_job(redis_client, settings)
    resp = client.simulate_delete(f"/v1/images/{image_id}", headers=AS_ALICE)
    assert resp.status_code == 204
    assert sweep(store, redis_client, settings) == 0
    assert queued(redis_client, settings) == []
    assert in_flight(redis_client) == []
    assert image(client, image_id) == {"status": 404}
