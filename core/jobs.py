"""The api <-> worker contract: queue names, job paths (as strings) and payloads.

The API enqueues by dotted path so it never imports worker code (and with it the image
libraries). Payloads are JSON (both sides use rq's JSONSerializer).

Failure handling is split between the job and rq:
- the job itself records permanent failures (corrupt input...) as `failed` and returns;
- transient failures (S3/Redis unreachable) raise, and rq retries after `intervals`
  (the worker runs the scheduler so the retries fire);
- `CONVERT_FAILED` is rq's failure callback: once no retry is left (also after a timeout
  or when the job was abandoned by a dead worker) it records the image as `failed`.

Request ids: every job queued while a request id is bound (a web request, or a job that was
itself queued by one) carries it in its meta (`JOB_META_KEY`), so the worker's lines for a
conversion, its retries and the webhook deliveries it queues name the upload's request
(core/logs.py). Queues made by `make_queue` add it; nothing else has to pass it on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis import Redis
from redis.client import Pipeline
from rq import Callback, Queue, Retry
from rq.job import Job
from rq.serializers import JSONSerializer

from core.inflight import Flight, Requeue, delivery_took_off, took_off
from core.logs import JOB_META_KEY, current_request_id
from core.models import ImageRecord
from core.settings import Settings
from core.webhooks import DELIVER, event_of, payload

CONVERT = "worker.jobs.convert"
CONVERT_FAILED = "worker.jobs.conversion_failed"
DEFAULT_INTERVALS = (5, 20, 60, 180)


class TracedQueue(Queue):
    """An rq queue whose new jobs carry the bound request id in their meta."""

    def create_job(self, *args: Any, **kwargs: Any) -> Job:
        request_id = current_request_id()
        if request_id is not None:
            kwargs["meta"] = {**(kwargs.get("meta") or {}), JOB_META_KEY: request_id}
        return super().create_job(*args, **kwargs)


def make_queue(redis: Redis, name: str, job_timeout: int) -> Queue:
    return TracedQueue(
        name, connection=redis, serializer=JSONSerializer, default_timeout=job_timeout
    )


def request_id_of(job: Job) -> str | None:
    """The id of the request that queued `job` (directly or through another job), if any."""
    request_id = job.meta.get(JOB_META_KEY) if isinstance(job.meta, dict) else None
    return request_id if isinstance(request_id, str) else None


def enqueue_convert(
    queue: Queue,
    record: ImageRecord,
    vset: str,
    pipeline: Pipeline,
    *,
    intervals: Sequence[int] = DEFAULT_INTERVALS,
) -> Job:
    """Queue the conversion of one incarnation's variant set `vset` inside the caller's
    MULTI/EXEC pipeline. The job writes only while the record still is that incarnation and
    still wants that set (worker/jobs.py). The conversion is in flight from then on: the
    janitor queues it again should rq lose its job (core/inflight.py)."""
    job = queue.enqueue_call(
        CONVERT,
        kwargs={"owner": record.owner, "image_id": record.id, "gen": record.gen, "vset": vset},
        retry=Retry(max=len(intervals), interval=list(intervals)),
        on_failure=Callback(CONVERT_FAILED),
        description=f"convert {record.owner}/{record.id} {record.gen}/{vset}",
        pipeline=pipeline,
    )
    took_off(pipeline, Flight(record.owner, record.id, record.gen, vset), queue.name, job.id)
    return job


def enqueue_delivery(
    queue: Queue, url: str, record: ImageRecord, pipeline: Pipeline, intervals: Sequence[int]
) -> None:
    """Queue one webhook delivery of the record's final state on `queue` (the webhook queue)
    inside the caller's transaction, retried after each of `intervals` seconds until the
    receiver answers 2xx (core/webhooks.py)."""
    kwargs = {"url": url, "body": payload(record), "image_id": record.id, "event": event_of(record)}
    redeliver(queue, kwargs, intervals, pipeline)


def redeliver(
    queue: Queue, kwargs: dict[str, Any], intervals: Sequence[int], pipeline: Pipeline
) -> str:
    """Queue the delivery job `kwargs` inside the caller's transaction; its id. It is in
    flight from then on: the janitor queues it again should rq lose it (core/inflight.py)."""
    job = queue.enqueue_call(
        DELIVER,
        kwargs=kwargs,
        retry=Retry(max=len(intervals), interval=list(intervals)),
        description=f"webhook {kwargs.get('image_id', '')} {kwargs.get('event', '')}",
        pipeline=pipeline,
    )
    delivery_took_off(pipeline, queue.name, job.id, kwargs, intervals)
    return str(job.id)


def requeue_for(redis: Redis, settings: Settings, janitor_interval: float = 0.0) -> Requeue:
    """How this process's janitor queues lost conversions again (core/inflight.py): on the
    queue they were on when it is one of ours (fresh uploads or bulk), else on the first;
    `janitor_interval` is how often it sweeps (0: once, `picstream-admin janitor`)."""
    names = (settings.queue, settings.bulk_queue)
    queues = {name: make_queue(redis, name, settings.job_timeout) for name in names}

    def enqueue(name: str, record: ImageRecord, vset: str, pipe: Pipeline) -> None:
        queue = queues.get(name, queues[settings.queue])
        enqueue_convert(queue, record, vset, pipe, intervals=settings.retry_intervals)

    hooks = make_queue(redis, settings.webhook_queue, settings.job_timeout)

    def deliver(name: str, kwargs: dict[str, Any], waits: Sequence[int], pipe: Pipeline) -> str:
        return redeliver(hooks, kwargs, waits, pipe)  # on our webhook queue, whatever `name`

    lost_after = Requeue.lost_after_for(janitor_interval)
    return Requeue(enqueue, lost_after, settings.queue, deliver)
