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
whose rq job two sweeps at least CONFIRM_AFTER apart found alive nowhere (not in its queue,
not scheduled for a retry, no recent heartbeat), and whose record still wants the set, is
queued again. A duplicate of a live conversion is harmless: it keeps the variants the other
run made ready, the first run to find every variant made ends the run, and the other then
finds it ended (worker/jobs.py) — so a false alarm costs one conversion, never data. A
flight no record wants any more (deleted, re-uploaded, reconverted) just leaves the set.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from redis import Redis
from redis.client import Pipeline
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry, StartedJobRegistry
from rq.utils import as_text

from core.errors import NotFound, PicstreamError
from core.models import ImageRecord
from core.records import NS, Records

log = logging.getLogger(__name__)

INFLIGHT = f"{NS}:inflight"  # sorted set: flight -> when last seen alive (Unix seconds)
INFLIGHT_JOBS = f"{NS}:inflight:jobs"  # hash: flight -> JSON [queue name, rq job id]
SUSPECTS = f"{NS}:inflight:suspects"  # hash: flight -> JSON [rq job id, first found dead]
BATCH = 500  # flights looked at per sweep: a sweep stays short behind any backlog
# A flight is lost when found dead twice this far apart: rq moves a job between its queue
# and its registries in several writes (BLPOP, then the registration; a retry's status, then
# its schedule), and a sweep may read it in between once.
CONFIRM_AFTER = 30.0
LPOS_LIMIT = 100_000
# A job is alive while rq's heartbeats for it are this recent, or while rq's started registry
# lists it (rq hands on a dead worker's job itself, about a minute after its last beat).
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


# ZADD with Redis' own clock, which the janitor compares against: the hosts' clocks never
# matter (scripts may call TIME before writing: effects replication, Redis >= 5).
_ZADD_NOW = (
    "local t = redis.call('TIME') "
    "return redis.call('ZADD', KEYS[1], t[1] + t[2] / 1000000, ARGV[1])"
)


_SUSPECT = (
    "if redis.call('ZSCORE', KEYS[1], ARGV[1]) then "
    "redis.call('HSET', KEYS[2], ARGV[1], ARGV[2]) end"
)


# A kind of flight's keys: (sorted set: member -> when last seen alive, hash: member -> its
# job, hash: member -> first found dead).
Keys = tuple[str, str, str]
_CONVERSIONS: Keys = (INFLIGHT, INFLIGHT_JOBS, SUSPECTS)


def _forget(pipe: Pipeline, keys: Keys, member: bytes | str) -> None:
    """Queue the removal of `member` from all of `keys` in `pipe`."""
    pipe.zrem(keys[0], member)
    pipe.hdel(keys[1], member)
    pipe.hdel(keys[2], member)


def _forget_now(redis: Redis, keys: Keys, member: bytes | str) -> None:
    """Remove `member` from all of `keys` in one transaction: its job never outlives the
    entry the janitor sweeps by."""
    with redis.pipeline(transaction=True) as pipe:
        _forget(pipe, keys, member)
        pipe.execute()


def _seen(redis: Redis, keys: Keys, members: list[bytes], now: float) -> None:
    """Mark `members` seen alive now (unless their run ended meanwhile: XX)."""
    if members:
        with redis.pipeline(transaction=False) as pipe:
            pipe.zadd(keys[0], dict.fromkeys(members, now), xx=True)
            pipe.hdel(keys[2], *members)
            pipe.execute()


def took_off(pipe: Pipeline, flight: Flight, queue: str, job_id: str) -> None:
    """In the transaction that queues the flight's job."""
    pipe.eval(_ZADD_NOW, 1, INFLIGHT, flight.member)
    pipe.hset(INFLIGHT_JOBS, flight.member, json.dumps([queue, job_id]))
    pipe.hdel(SUSPECTS, flight.member)


def landed(pipe: Pipeline, flight: Flight) -> None:
    """In the transaction that ends the flight's run (ready, failed, or handed over)."""
    _forget(pipe, _CONVERSIONS, flight.member)


# Queues a delivery job (queue name, its kwargs, retry waits) in a transaction: its id.
Redeliver = Callable[[str, dict[str, Any], Sequence[int], Pipeline], str]


@dataclass(frozen=True, slots=True)
class Requeue:
    """How the janitor queues a lost conversion again: `enqueue(queue name, record, vset,
    pipe)` (core/jobs.py `enqueue_convert` with the process's queues and retry policy),
    once `lost_after` seconds have passed without the flight's job being seen alive."""

    enqueue: Callable[[str, ImageRecord, str, Pipeline], object]
    lost_after: float
    default_queue: str
    # Queues a lost webhook delivery again (`redeliver_lost`); None: deliveries left alone.
    redeliver: Redeliver | None = None

    @staticmethod
    def lost_after_for(janitor_interval: float) -> float:
        # A flight seen alive is looked at again only after this long: a long queue costs
        # one look per flight every other sweep at most.
        return max(LOST_FLOOR, 2 * janitor_interval)


def in_flight(redis: Redis) -> list[Flight]:
    """Every conversion in flight, oldest sighting first."""
    members = cast(list[bytes], redis.zrange(INFLIGHT, 0, -1))
    return [f for raw in members if (f := Flight.parse(raw)) is not None]


def requeue_lost(records: Records, requeue: Requeue, now: float | None = None) -> int:
    """Queue again the conversions whose job rq lost (see the module docstring); return how
    many. A flight is lost when two sweeps CONFIRM_AFTER apart found its job alive nowhere;
    flights seen alive are marked so; flights no record wants any more leave. `now` (Unix
    seconds) lets a test act as if later; by default Redis' clock, the same for every
    host's janitor."""
    redis = records.redis
    now = _server_time(redis) if now is None else now
    cutoff = now - requeue.lost_after
    members = cast(list[bytes], redis.zrangebyscore(INFLIGHT, "-inf", cutoff, start=0, num=BATCH))
    if not members:
        return 0
    jobs = cast(list[bytes | None], redis.hmget(INFLIGHT_JOBS, members))
    suspects = cast(list[bytes | None], redis.hmget(SUSPECTS, members))
    seen: list[bytes] = []
    requeued = 0
    for member, job, suspect in zip(members, jobs, suspects, strict=True):
        flight = Flight.parse(member)
        if flight is None:
            _forget_now(redis, _CONVERSIONS, member)
            continue
        queue, job_id = _job_of(job, requeue.default_queue)
        if _alive(redis, queue, job_id, cutoff):
            seen.append(member)
            continue
        if not _wanted(records, flight):
            # Deleted, re-uploaded or reconverted: nothing to make.
            _forget_now(redis, _CONVERSIONS, member)
            continue
        if _confirmed(redis, _CONVERSIONS, member, job_id, suspect, now):
            requeued += _requeue_one(records, requeue, flight, queue)
    _seen(redis, _CONVERSIONS, seen, now)
    return requeued


def _job_of(raw: bytes | None, default_queue: str) -> tuple[str, str]:
    try:
        queue, job_id = json.loads(raw) if raw is not None else (default_queue, "")
        return str(queue), str(job_id)
    except (ValueError, TypeError):
        return default_queue, ""


def _suspect_since(raw: bytes | None, job_id: str) -> float | None:
    """When a sweep first found this very job alive nowhere (None: not yet, or another job)."""
    if raw is None:
        return None
    try:
        suspected, since = json.loads(raw)
        return float(since) if suspected == job_id else None
    except (ValueError, TypeError):
        return None


def _alive(redis: Redis, queue_name: str, job_id: str, beat_after: float) -> bool:
    """Whether rq holds the job somewhere it will run from, or a worker is on it. Read in
    several steps: a job moving meanwhile may look dead once, which is why it takes two."""
    return _state(redis, queue_name, job_id, beat_after)[0]


def _state(
    redis: Redis, queue_name: str, job_id: str, beat_after: float
) -> tuple[bool, str | None]:
    """(alive as `_alive` says, the job's rq status: None when its hash is gone)."""
    if not job_id:
        return False, None
    status, beat = redis.hmget(Job.key_for(job_id), "status", "last_heartbeat")
    state = as_text(status) if status is not None else None
    if _beat(beat) > beat_after:
        # A worker's heartbeats keep coming: it is on the job whatever status this Redis
        # holds (a promoted replica may have missed the job's registration, not the beats).
        return True, state
    queue = Queue(queue_name, connection=redis)
    if _started(redis, queue, job_id):
        # rq lists it as started: should its worker be dead, rq's own registry cleaning
        # hands it on (a retry, or the failure callback) — never both it and the janitor.
        return True, state
    if state == JobStatus.SCHEDULED:
        registry = ScheduledJobRegistry(queue=queue)  # type: ignore[no-untyped-call]
        return redis.zscore(registry.key, job_id) is not None, state
    if state == JobStatus.QUEUED:
        listed = _listed(redis, queue.key, job_id) or _listed(
            redis, queue.intermediate_queue_key, job_id
        )
        return listed, state
    # Finished or failed while the record still wants the set (the record update, or the
    # failure callback, was lost), started with no heartbeat for lost_after and listed in
    # no started registry (its registration was lost), or gone.
    return False, state


def _started(redis: Redis, queue: Queue, job_id: str) -> bool:
    """Whether rq's started registry of `queue` lists the job (as `{job id}:{execution}`;
    the registry holds one entry per job being worked on: a few per worker)."""
    registry = StartedJobRegistry(queue=queue)
    return any(True for _ in redis.zscan_iter(registry.key, match=f"{job_id}:*", count=100))


def _listed(redis: Redis, key: str, job_id: str) -> bool:
    """Whether the list `key` holds `job_id`. LPOS is O(n) with Redis blocked meanwhile: it
    looks at the first LPOS_LIMIT entries only, and a job further back counts as listed."""
    if redis.lpos(key, job_id, maxlen=LPOS_LIMIT) is not None:
        return True
    return redis.llen(key) > LPOS_LIMIT


def _beat(raw: bytes | str | None) -> float:
    """rq's `last_heartbeat` (UTC, ISO 8601) as Unix seconds; 0 when unset or unreadable."""
    if not raw:
        return 0.0
    try:
        return datetime.fromisoformat(as_text(raw)).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return 0.0


def _wanted(records: Records, flight: Flight) -> bool:
    try:
        return records.get(flight.owner, flight.image_id).wants(flight.gen, flight.vset)
    except NotFound:
        return False


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
        _forget_now(records.redis, _CONVERSIONS, flight.member)
        return 0
    log.warning(
        "queued the conversion of %s/%s %s/%s again: its job was lost",
        flight.owner,
        flight.image_id,
        flight.gen,
        flight.vset,
    )
    return 1


def _server_time(redis: Redis) -> float:
    """Redis' clock: every host's janitor compares against the same time."""
    seconds, micros = redis.time()
    return seconds + micros / 1_000_000


# ---------------------------------------------------------------------- webhook deliveries
#
# A delivery job (core/webhooks.py) can be lost the same ways. It is queued in the
# transaction of the record's final state, so it is tracked there too, by its job id, with
# what it takes to queue it again (no record says whether a delivery is still wanted). It
# leaves when the receiver answered 2xx (worker/webhooks.py), or when the janitor finds rq
# done with it: finished (delivered), failed (rq's retries spent: not tried again here),
# or its hash expired after either.

DELIVERIES = f"{NS}:inflight:deliveries"  # sorted set: job id -> when last seen alive
DELIVERY_JOBS = f"{NS}:inflight:deliveries:jobs"  # hash: job id -> JSON [queue, kwargs, waits]
DELIVERY_SUSPECTS = f"{NS}:inflight:deliveries:suspects"  # hash: job id -> first found dead
_DELIVERIES: Keys = (DELIVERIES, DELIVERY_JOBS, DELIVERY_SUSPECTS)
_DONE = {JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED, None}


def delivery_took_off(
    pipe: Pipeline, queue: str, job_id: str, kwargs: dict[str, Any], intervals: Sequence[int]
) -> None:
    """In the transaction that queues the delivery."""
    pipe.eval(_ZADD_NOW, 1, DELIVERIES, job_id)
    pipe.hset(DELIVERY_JOBS, job_id, json.dumps([queue, kwargs, list(intervals)]))


def delivery_landed(redis: Redis, job_id: str) -> None:
    """The delivery is done (delivered, or rq is done with it)."""
    _forget_now(redis, _DELIVERIES, job_id)


def deliveries_in_flight(redis: Redis) -> list[str]:
    """The job ids of every delivery in flight."""
    return [as_text(m) for m in cast(list[bytes], redis.zrange(DELIVERIES, 0, -1))]


def redeliver_lost(
    redis: Redis, redeliver: Redeliver, lost_after: float, now: float | None = None
) -> int:
    """Queue again the deliveries whose job rq lost, as `requeue_lost` does conversions;
    return how many. `redeliver(queue, kwargs, waits, pipe)` queues one in `pipe` (a
    transaction) and returns its job id."""
    now = _server_time(redis) if now is None else now
    cutoff = now - lost_after
    members = cast(list[bytes], redis.zrangebyscore(DELIVERIES, "-inf", cutoff, start=0, num=BATCH))
    if not members:
        return 0
    infos = cast(list[bytes | None], redis.hmget(DELIVERY_JOBS, members))
    suspects = cast(list[bytes | None], redis.hmget(DELIVERY_SUSPECTS, members))
    seen: list[bytes] = []
    requeued = 0
    for raw, info, suspect in zip(members, infos, suspects, strict=True):
        job_id = as_text(raw)
        try:
            queue, kwargs, waits = json.loads(info) if info is not None else ("", {}, [])
        except (ValueError, TypeError):
            queue = ""
        alive, state = _state(redis, queue, job_id, cutoff) if queue else (False, None)
        if alive:
            seen.append(raw)
        elif not queue or state in _DONE:
            _forget_now(redis, _DELIVERIES, raw)
        elif _confirmed(redis, _DELIVERIES, raw, job_id, suspect, now):
            with redis.pipeline(transaction=True) as pipe:
                pipe.multi()
                redeliver(queue, kwargs, waits, pipe)
                _forget(pipe, _DELIVERIES, raw)
                pipe.execute()
            log.warning("queued webhook delivery %s again: its job was lost", job_id)
            requeued += 1
    _seen(redis, _DELIVERIES, seen, now)
    return requeued


def _confirmed(
    redis: Redis,
    keys: Keys,
    member: bytes | str,
    job_id: str,
    raw: bytes | None,
    now: float,
) -> bool:
    """Two strikes for `member` of the flights `keys`, whose
    job `job_id` was just found dead: the first sweep to find it records when (while it is
    still in flight); one CONFIRM_AFTER later or more, the sweep whose HDEL removes that
    record is the one that queues it again (overlapping janitors queue it once)."""
    flights, _, suspects = keys
    since = _suspect_since(raw, job_id)
    if since is None:
        # Only while still in flight: a run that ended meanwhile leaves no suspicion.
        redis.eval(_SUSPECT, 2, flights, suspects, member, json.dumps([job_id, now]))
        return False
    return now - since >= CONFIRM_AFTER and redis.hdel(suspects, member) == 1
