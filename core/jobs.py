"""The api <-> worker contract: queue names, job paths (as strings) and payloads.

The API enqueues by dotted path so it never imports worker code (and with it the image
libraries). Payloads are JSON (both sides use rq's JSONSerializer).
"""

from __future__ import annotations

from redis import Redis
from redis.client import Pipeline
from rq import Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

CONVERT = "worker.jobs.convert"
# Transient failures (S3/Redis unreachable) retry with backoff; the worker runs the scheduler.
CONVERT_RETRY = Retry(max=4, interval=[5, 20, 60, 180])


def make_queue(redis: Redis, name: str, job_timeout: int) -> Queue:
    return Queue(name, connection=redis, serializer=JSONSerializer, default_timeout=job_timeout)


def enqueue_convert(queue: Queue, owner: str, image_id: str, pipeline: Pipeline) -> Job:
    """Queue the conversion of one image inside the caller's MULTI/EXEC pipeline."""
    return queue.enqueue_call(
        CONVERT,
        kwargs={"owner": owner, "image_id": image_id},
        retry=CONVERT_RETRY,
        description=f"convert {owner}/{image_id}",
        pipeline=pipeline,
    )
