"""A job lost the way rq can lose one, and the janitor sweep that finds it (the tests of
core/inflight.py: tests/integration/test_lost_jobs.py, test_webhooks.py)."""

from __future__ import annotations

import time

from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from core import janitor
from core.jobs import requeue_for
from core.records import Records
from core.settings import Settings
from core.storage import Store


def take_the_job(redis_client: Redis, queue_name: str) -> Job:
    """What an rq worker listening on several queues does first: BLPOP the job id (it
    registers the job as started in a later write). A worker killed right after, or a
    failover to a replica that has this write and not the next, leaves the job nowhere."""
    queue = Queue(queue_name, connection=redis_client, serializer=JSONSerializer)
    job_id = redis_client.lpop(queue.key)
    assert job_id is not None
    return Job.fetch(job_id.decode(), connection=redis_client, serializer=JSONSerializer)


def sweep_later(
    store: Store, redis_client: Redis, settings: Settings, later: float
) -> janitor.Sweep:
    """One janitor sweep, as `picstream-admin janitor` runs it, `later` seconds from now."""
    requeue = requeue_for(redis_client, settings)
    return janitor.run_once(store, Records(redis_client), time.time() + later, requeue)
