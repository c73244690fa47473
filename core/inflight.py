"""Conversions in flight: the net under rq's own bookkeeping.

rq keeps a job in one place at a time (its queue, its started or scheduled registry) and
hands on the jobs of dead workers. A job can still vanish from all of them, and then its
image would stay `processing` for ever:
- a worker listening on several queues takes a job with BLPOP and registers it as started
  in a second step; a worker killed, or a Redis failover, between the two loses it;
- Redis replication is asynchronous: a replica promoted by Sentinel may have missed a
  job's last writes (its registration, or the record update that ended its run) while
  the rq bookkeeping that followed reached the new master;
- a failure callback that could not reach Redis never recorded the failure.

So every conversion queued (core/jobs.py `enqueue_convert`) also enters `INFLIGHT` in the
same transaction, and leaves it in the transaction that ends its run (worker/jobs.py). The
janitor (`requeue_lost`) looks at the members not seen alive for `lost_after` seconds; one
whose rq job is alive nowhere, and whose record still wants the set, is queued again — in
one transaction with that check of the record. A conversion is idempotent and a duplicate
of a live one ends as "already finished" (worker/jobs.py), so a false alarm costs one
conversion and never data. One that no record wants any more just leaves the set.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry

from core.errors import PicstreamError
from core.models import ImageRecord
from core.records import NS, Records

log = logging.getLogger(__name__)

INFLIGHT = f"{NS}:inflight"  # sorted set: flight -> when last seen alive (Unix seconds)
INFLIGHT_JOBS = f"{NS}:inflight:jobs"  # hash: flight -> JSON [queue name, rq job id]
BATCH = 500  # flights looked at per sweep: a sweep stays short behind any backlog
# A started job is alive while rq's heartbeats for it are this recent; rq itself hands on a
# dead worker's job about a minute after its last heartbeat, and is left to do so.
LOST_FLOOR = 90.0


@dataclass(frozen=True, slots=True)
class Flight:
    """The conversion of set `vset` of incarnation `gen` of one image."""

    owner: str
    image_id: str
    gen: str
    vset: str

    @property
    def member(self) -> str:
        return json.dumps([self.owner, self.image_id, self.gen, self.vset], separators=(",", ":"))

    @classmethod
    def parse(cls, raw: bytes | str) -> Flight | None:
        try:
            owner, image_id, gen, vset = json.loads(raw)
        except (ValueError, TypeError):
            return None
        return cls(str(owner), str(image_id), str(gen), str(vset))


def took_off(pipe: Pipeline, flight: Flight, queue: str, job_id: str) -> None:
    """In the transaction that queues the flight's job."""
    pipe.zadd(INFLIGHT, {flight.member: time.time()})
    pipe.hset(INFLIGHT_JOBS, flight.member, json.dumps([queue, job_id]))


def landed(pipe: Pipeline, flight: Flight) -> None:
    """In the transaction that ends the flight's run (ready, failed, or handed over)."""
    pipe.zrem(INFLIGHT, flight.member)
    pipe.hdel(INFLIGHT_JOBS, flight.member)


@dataclass(frozen=True, slots=True)
class Requeue:
    """How the janitor queues a lost conversion again: `enqueue(queue name, record, vset,
    pipe)` (core/jobs.py `enqueue_convert` with the process's queues and retry policy),
    once `lost_after` seconds have passed without the flight's job being seen alive."""

    enqueue: Callable[[str, ImageRecord, str, Pipeline], object]
    lost_after: float
    default_queue: str

    @staticmethod
    def lost_after_for(janitor_interval: float) -> float:
        # Two sweeps apart at least: a job caught between rq's BLPOP and its registration
        # (milliseconds) was seen alive by the sweep before, so it is never a candidate.
        return max(LOST_FLOOR, 2 * janitor_interval)


def in_flight(redis: Redis) -> list[Flight]:
    """Every conversion in flight, oldest sighting first."""
    members = cast(list[bytes], redis.zrange(INFLIGHT, 0, -1))
    return [f for raw in members if (f := Flight.parse(raw)) is not None]


def requeue_lost(records: Records, requeue: Requeue, now: float | None = None) -> int:
    """Queue again the conversions whose job rq lost (see the module docstring); return how
    many. Flights seen alive are marked so; flights no record wants any more leave. `now`
    (Unix seconds) lets a test act as if later; by default Redis' clock, the same for every
    host's janitor."""
    redis = records.redis
    now = _server_time(redis) if now is None else now
    cutoff = now - requeue.lost_after
    members = cast(list[bytes], redis.zrangebyscore(INFLIGHT, "-inf", cutoff, start=0, num=BATCH))
    if not members:
        return 0
    jobs = cast(list[bytes | None], redis.hmget(INFLIGHT_JOBS, members))
    where = [_job_of(raw, requeue.default_queue) for raw in jobs]
    alive = _alive(redis, where, cutoff)
    seen = {m: now for m, ok in zip(members, alive, strict=True) if ok}
    if seen:
        redis.zadd(INFLIGHT, seen, xx=True)
    requeued = 0
    for member, (queue, _), ok in zip(members, where, alive, strict=True):
        flight = Flight.parse(member)
        if flight is None:
            _drop(redis, member)
        elif not ok:
            requeued += _requeue_one(records, requeue, flight, queue)
    return requeued


def _job_of(raw: bytes | None, default_queue: str) -> tuple[str, str]:
    try:
        queue, job_id = json.loads(raw) if raw is not None else (default_queue, "")
        return str(queue), str(job_id)
    except (ValueError, TypeError):
        return default_queue, ""


def _alive(redis: Redis, where: Sequence[tuple[str, str]], beat_after: float) -> list[bool]:
    """Whether rq holds each job somewhere it will run from: read in one transaction, so a
    job moving between its queue and a registry meanwhile is seen in one place or the other."""
    with redis.pipeline(transaction=True) as pipe:
        for queue_name, job_id in where:
            queue = Queue(queue_name, connection=redis)
            pipe.hmget(Job.key_for(job_id or "-"), "status", "last_heartbeat")
            pipe.lpos(queue.key, job_id or "-")
            pipe.lpos(queue.intermediate_queue_key, job_id or "-")
            pipe.zscore(ScheduledJobRegistry(queue=queue).key, job_id or "-")  # type: ignore[no-untyped-call]
        answers = pipe.execute()
    alive = []
    for i in range(len(where)):
        (status, beat), queued, taken, scheduled = answers[4 * i : 4 * i + 4]
        if queued is not None or taken is not None or scheduled is not None:
            alive.append(True)
        else:
            alive.append(status == JobStatus.STARTED.encode() and _beat(beat) > beat_after)
    return alive


def _beat(raw: bytes | None) -> float:
    """rq's `last_heartbeat` (UTC, ISO 8601) as Unix seconds; 0 when unset or unreadable."""
    if not raw:
        return 0.0
    try:
        return datetime.fromisoformat(raw.decode()).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


class _NotWanted(Exception):
    pass


def _requeue_one(records: Records, requeue: Requeue, flight: Flight, queue: str) -> int:
    def keep(record: ImageRecord) -> ImageRecord:
        if not record.wants(flight.gen, flight.vset):
            raise _NotWanted
        return record

    def again(pipe: Pipeline, record: ImageRecord) -> None:
        requeue.enqueue(queue, record, flight.vset, pipe)

    try:
        done = records.update(flight.owner, flight.image_id, keep, again, flight.gen)
    except _NotWanted:
        done = None
    except PicstreamError as exc:
        log.warning("could not queue the lost conversion %s again: %s", flight.member, exc)
        return 0
    if done is None:  # deleted, re-uploaded, finished: nothing to make
        _drop(records.redis, flight.member)
        return 0
    log.warning(
        "queued the conversion of %s/%s %s/%s again: its job was lost",
        flight.owner,
        flight.image_id,
        flight.gen,
        flight.vset,
    )
    return 1


def _drop(redis: Redis, member: bytes | str) -> None:
    with redis.pipeline(transaction=True) as pipe:
        pipe.zrem(INFLIGHT, member)
        pipe.hdel(INFLIGHT_JOBS, member)
        pipe.execute()


def _server_time(redis: Redis) -> float:
    """Redis' clock: every host's janitor compares against the same time."""
    seconds, micros = redis.time()
    return seconds + micros / 1_000_000
