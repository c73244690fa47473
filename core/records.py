"""Image records in Redis: the live index both processes read and write.

Keys (all under `picstream:`):
  image:{owner}:{id}    the record as JSON
  images:{owner}        sorted set of ids by creation time (milliseconds), for listing
  lease:{owner}:{id}    held while an upload of that id runs (core/leases.py)
  purges                sorted set of object prefixes still to delete, scored by when
                        (also the guards of uploads not yet committed: core/leases.py)

Every redis error is translated to `QueueUnavailable` here.

Replication: the commit of an upload (`Records.commit`) is answered only once the replicas
that are online have it (WAIT; `Durability`), so a Sentinel failover never loses an image
that was answered 201. What a WAIT that falls short means is decided by `enough`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import redis
from redis import Redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.client import Pipeline
from redis.connection import ConnectionPool
from redis.exceptions import WatchError
from redis.retry import Retry
from redis.sentinel import Sentinel

from core import metrics
from core.errors import Conflict, NotFound, QueueUnavailable
from core.models import ImageRecord
from core.settings import SentinelTarget, Settings, sentinel_target

if TYPE_CHECKING:
    from core.leases import UploadLease

log = logging.getLogger(__name__)

NS = "picstream"
PURGES_KEY = f"{NS}:purges"
# Optimistic updates give up after this many lost races (each loss means another writer
# committed in between, so this is never reached under sane contention).
_MAX_RACES = 50

Change = Callable[[ImageRecord], ImageRecord]
Also = Callable[[Pipeline, ImageRecord], object]


def connect(settings: Settings) -> Redis:
    """A client that fails within seconds when Redis is down, instead of redis-py 8's default
    ten retries. With a `redis+sentinel://` REDIS_URL it is a client of the master the
    Sentinels name (core/settings.py `sentinel_target`), found again after a failover."""
    options: dict[str, object] = {
        "socket_timeout": settings.redis_timeout,
        "socket_connect_timeout": min(3.0, settings.redis_timeout),
        # Three tries ~0.3 s apart: a connection dropped at an idle moment is reopened, a
        # master that is gone fails the request (503) instead of holding it.
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        "health_check_interval": 30,
    }
    target = sentinel_target(settings.redis_url)
    if target is None:
        return Redis.from_url(settings.redis_url, **options)
    return _sentinel_master(target, settings.redis_timeout, options)


def _sentinel_master(target: SentinelTarget, timeout: float, options: dict[str, object]) -> Redis:
    """A client of the master named `target.service`. Every new connection asks the
    Sentinels for the master's address (redis-py's SentinelConnectionPool); a connection to
    a master that was demoted answers READONLY, which redis-py turns into a ConnectionError
    and a fresh look-up. While no Sentinel names a live master (the seconds between its
    death and the promotion), connecting raises MasterNotFoundError, a ConnectionError:
    QueueUnavailable (503) like any Redis outage."""
    sentinels = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        # Sentinels are asked one after the other: a dead one must cost little, and is not
        # retried (redis-py 8 would try a Redis ten times by default).
        sentinel_kwargs={
            "socket_timeout": min(1.0, timeout),
            "socket_connect_timeout": min(1.0, timeout),
            "retry": Retry(NoBackoff(), 0),
        },
    )
    master: Redis = sentinels.master_for(  # type: ignore[no-untyped-call]
        target.service,
        db=target.db,
        username=target.username,
        password=target.password,
        **options,
    )
    return master


@dataclass(frozen=True, slots=True)
class Durability:
    """How long an upload's commit waits for replicas (PICSTREAM_REDIS_WAIT_REPLICAS and
    PICSTREAM_REDIS_WAIT_TIMEOUT), and how long a conversion queued with a commit that is
    then taken back may still write (the job timeout: its variants are purged after it)."""

    replicas: int = 0  # 0: never wait
    timeout: float = 1.0
    job_timeout: float = 600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> Durability:
        return cls(settings.redis_wait_replicas, settings.redis_wait_timeout, settings.job_timeout)


NO_WAIT = Durability()


def enough(wanted: int, online: int, acked: int) -> bool:
    """Whether a commit that `acked` replicas acknowledged is durable, when `wanted` are
    asked for and `online` are connected to the master (ROLE) now. Replicas that are not
    connected do not count: with none left (the single Redis of the dev stack, a master
    whose replica died or which was just promoted), the master holds the only copy and no
    failover can lose it, as there is nobody to promote."""
    return acked >= min(wanted, online)


class _Pinned:
    """One connection of `pool`, kept until `give_back()`: a pipeline built on it (as its
    pool) still has that connection after its EXEC. WAIT counts only the writes of its own
    connection (a fresh one "has" everything at once), and redis-py's Pipeline hands its
    connection back to the pool at EXEC; everything else is the real pool's."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self.connection = pool.get_connection()

    def get_connection(self, *args: object, **kwargs: object) -> object:
        return self.connection

    def release(self, connection: object) -> None:
        pass  # given back once, by give_back()

    def give_back(self) -> None:
        self._pool.release(self.connection)

    def __getattr__(self, name: str) -> object:
        return getattr(self._pool, name)

    def pipeline(self, client: Redis) -> Pipeline:
        return Pipeline(cast(ConnectionPool, self), client.response_callbacks, True, None)

    def command(self, *args: object) -> object:
        """One command on this connection, never retried (a WAIT after an EXEC must not
        send the EXEC again, as a retried pipeline would) nor sent on a new connection (a
        new one, perhaps to another master, would WAIT for nothing)."""
        if not self.connection.is_connected:
            raise redis.ConnectionError("the connection of the write was lost")
        self.connection.send_command(*args)  # type: ignore[no-untyped-call]
        return self.connection.read_response()


def _online(role: object) -> int:
    """The replicas ROLE lists on a master (only those online: synced and streaming)."""
    if isinstance(role, list | tuple) and len(role) >= 3 and isinstance(role[2], list):
        return len(role[2])
    return 0


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Redis failures inside the block become QueueUnavailable naming `action`. The block
    is timed, and counted when it failed, under `action` (core/metrics.py)."""
    try:
        with metrics.REDIS_DURATION.labels(action).time():
            yield
    except redis.RedisError as exc:
        metrics.REDIS_ERRORS.labels(action).inc()
        raise QueueUnavailable(f"{action} failed: Redis {type(exc).__name__}") from exc


def image_key(owner: str, image_id: str) -> str:
    """The record of an image (core/leases.py looks for it as it takes a lease)."""
    return f"{NS}:image:{owner}:{image_id}"


def lease_key(owner: str, image_id: str) -> str:
    """Held while an upload of this id runs (core/leases.py)."""
    return f"{NS}:lease:{owner}:{image_id}"


def _index_key(owner: str) -> str:
    return f"{NS}:images:{owner}"


def created_ms(record: ImageRecord) -> int:
    return int(record.created.timestamp() * 1000)


class Records:
    """The records of one process. `durability` is what an upload's commit waits for."""

    def __init__(self, client: Redis, durability: Durability = NO_WAIT) -> None:
        self.redis = client
        self.durability = durability

    def ping(self) -> None:
        with redis_errors("Redis ping"):
            self.redis.ping()

    def get(self, owner: str, image_id: str) -> ImageRecord:
        """The record, or NotFound (also for another owner's id: keys are owner-scoped)."""
        with redis_errors("record read"):
            raw = self.redis.get(image_key(owner, image_id))
        if raw is None:
            raise NotFound(f"no image {image_id!r}")
        return ImageRecord.from_dict(json.loads(raw))

    def exists(self, owner: str, image_id: str) -> bool:
        with redis_errors("record read"):
            return bool(self.redis.exists(image_key(owner, image_id)))

    def commit(
        self,
        record: ImageRecord,
        lease: UploadLease,
        enqueue: Callable[[Pipeline], object],
        fence: float,
    ) -> None:
        """Write the record, index it and enqueue its job in one MULTI/EXEC: all or nothing,
        durable and decided before this returns.

        The lease is first shortened to `fence` seconds and the transaction WATCHes it, so
        an EXEC that reaches Redis later than that is aborted by Redis itself. When the
        EXEC's answer is lost (timeout, broken connection), the outcome is looked up once
        the fence has passed: the record with this incarnation exists, or never will.

        Durable: after the EXEC, on the same connection, WAIT until the replicas online at
        the EXEC (at most `durability.replicas`) have it. A WAIT that falls short while
        replicas are still online takes the commit back (`_take_back`) and fails: the
        record was on the master alone, and a failover to a replica that lacks it would
        lose an image already answered 201. A WAIT whose connection failed (the master
        died) is decided like a lost EXEC answer, on whichever master Redis has then.
        Raises Conflict if the id was taken meanwhile, QueueUnavailable if not committed.
        """
        key = image_key(record.owner, record.id)
        body = json.dumps(record.to_dict(), separators=(",", ":"))
        fence_ms = int(fence * 1000)
        with redis_errors("record write"):
            if not lease.freeze(fence_ms):
                raise QueueUnavailable("the upload's lease expired before its commit")
            pinned = _Pinned(self.redis.connection_pool)  # nothing sent yet: a sure "no"
        # Redis set the fence before it answered (a retried freeze too: see _FREEZE), so it
        # expires at the latest `fence` from now.
        started = time.monotonic()
        try:
            online = self._commit_on(pinned, record, key, body, lease, enqueue)
            if online is not None:
                lease.committed()
                durable = self._replicated(pinned, online)
                if durable is not None:
                    if not durable:
                        self._take_back(record)
                    return
        finally:
            pinned.give_back()
        if not self._committed(record, started + fence + 0.5, started + 2 * fence + 5):
            raise QueueUnavailable("record write failed: Redis did not answer in time")
        lease.committed()

    def _commit_on(
        self,
        pinned: _Pinned,
        record: ImageRecord,
        key: str,
        body: str,
        lease: UploadLease,
        enqueue: Callable[[Pipeline], object],
    ) -> int | None:
        """The commit's transaction on `pinned`: the replicas online at its EXEC (ROLE, in
        the transaction), or None when its answer was lost (it may have run)."""
        try:
            with pinned.pipeline(self.redis) as pipe:
                pipe.watch(lease.key, key)  # type: ignore[no-untyped-call]
                if pipe.exists(key):
                    raise Conflict(f"image {record.id!r} was created by another upload")
                pipe.multi()  # explicit, so rq's enqueue joins this transaction
                enqueue(pipe)
                pipe.set(key, body)
                pipe.zadd(_index_key(record.owner), {record.id: created_ms(record)})
                pipe.delete(lease.key)
                if lease.guarded:  # the objects are the record's now
                    pipe.zrem(PURGES_KEY, lease.guarded)
                pipe.execute_command("ROLE")  # type: ignore[no-untyped-call]
                return _online(pipe.execute()[-1])
        except WatchError as exc:
            # redis-py also raises WatchError when the connection fails while watching;
            # only an EXEC that Redis refused (no underlying error) is a sure "no".
            if not isinstance(exc.__context__, redis.RedisError | OSError):
                raise QueueUnavailable("the upload's lease expired during its commit") from None
            log.warning("commit of %s/%s: %s; finding out", record.owner, record.id, exc)
        except redis.RedisError as exc:
            log.warning("commit of %s/%s: %s; finding out", record.owner, record.id, exc)
        return None

    def _replicated(self, pinned: _Pinned, online: int) -> bool | None:
        """After a write on `pinned`, with `online` replicas at that moment: True once
        enough replicas acknowledged it (`enough`), False when they did not within the
        timeout while replicas are still online, None when the connection failed (the
        master may have died: the write may or may not be on the replica)."""
        wanted = self.durability.replicas
        if min(wanted, online) == 0:
            return True
        timeout_ms = max(1, int(self.durability.timeout * 1000))
        try:
            acked = int(cast(int, pinned.command("WAIT", min(wanted, online), timeout_ms)))
            if acked >= min(wanted, online):
                return True
            # Fewer than asked for: a replica that disconnected meanwhile (it died) no
            # longer counts; one that is still online but silent is behind.
            now_online = _online(pinned.command("ROLE"))
        except (redis.RedisError, OSError) as exc:
            log.warning("WAIT for replicas failed (%s); finding out", type(exc).__name__)
            return None
        if enough(wanted, now_online, acked):
            return True
        log.warning(
            "%d of %d replicas acknowledged a commit within %.1f s",
            acked,
            min(wanted, now_online),
            self.durability.timeout,
        )
        return False

    def _committed(self, record: ImageRecord, decidable: float, give_up: float) -> bool:
        """After an ambiguous EXEC or WAIT: True once the record with this incarnation is
        seen and replicated (`_confirm`), False once Redis answers after `decidable` (the
        fence has expired, so the EXEC can no longer run) without it, or when Redis stays
        unreachable until `give_up`. After a failover "Redis" is the promoted replica: the
        record is there (the replica had it: durable) or never will be."""
        key = image_key(record.owner, record.id)
        while True:
            now = time.monotonic()
            try:
                raw = self.redis.get(key)
                if raw is not None and json.loads(raw).get("gen") == record.gen:
                    return self._confirm(record)
                if now >= decidable:
                    return False
            except redis.RedisError:
                if now >= give_up:
                    log.error("commit of %s/%s undecided: Redis unreachable", record.owner, key)
                    return False
            time.sleep(0.1)  # polling a remote outcome, bounded by give_up

    def _confirm(self, record: ImageRecord) -> bool:
        """The record is on the master now: make sure its replicas have it. WAIT counts the
        writes of its own connection, so the record is written again as it is (WATCHed: a
        conversion's update in between means reading it again), then WAITed for; a WAIT
        that falls short takes the commit back. Raises RedisError when Redis fails again."""
        key = image_key(record.owner, record.id)
        pinned = _Pinned(self.redis.connection_pool)
        try:
            for _ in range(_MAX_RACES):
                try:
                    with pinned.pipeline(self.redis) as pipe:
                        pipe.watch(key)  # type: ignore[no-untyped-call]
                        raw = pipe.get(key)
                        if raw is None or json.loads(raw).get("gen") != record.gen:
                            return False  # gone again (deleted): not this upload's to answer
                        pipe.multi()
                        pipe.set(key, raw, keepttl=True)
                        pipe.execute_command("ROLE")  # type: ignore[no-untyped-call]
                        online = _online(pipe.execute()[-1])
                except WatchError as exc:
                    if isinstance(exc.__context__, redis.RedisError | OSError):
                        raise redis.ConnectionError("lost while confirming a commit") from exc
                    continue
                durable = self._replicated(pinned, online)
                if durable is None:
                    raise redis.ConnectionError("lost while waiting for replicas")
                if not durable:
                    self._take_back(record)
                return durable
        finally:
            pinned.give_back()
        return False

    def _take_back(self, record: ImageRecord) -> None:
        """Undo a commit that the replicas did not acknowledge in time, then fail the
        upload (503): the record and its index entry go, this incarnation only; the job
        queued with it finds no record and ends; whatever a conversion already wrote is
        purged after the job timeout (the events such a conversion appended expire within
        a day, as a deleted image's do). A failure here is QueueUnavailable too: the
        record then stays (logged), which a 503 cannot promise."""
        prefix = record.keys.prefix
        until = time.time() + self.durability.job_timeout + 60

        def also(pipe: Pipeline, current: ImageRecord) -> None:
            self.schedule_purge(Purge(prefix, until), until, pipe)

        try:
            self.delete(record.owner, record.id, also=also, gen=record.gen)
        except NotFound:
            pass
        except QueueUnavailable:
            log.error("could not take back the commit of %s/%s", record.owner, record.id)
            raise
        raise QueueUnavailable(
            "record write failed: no replica acknowledged it within"
            f" {self.durability.timeout:g} s (taken back)"
        )

    def update(
        self,
        owner: str,
        image_id: str,
        change: Change,
        also: Also | None = None,
        gen: str | None = None,
    ) -> ImageRecord | None:
        """Read-modify-write one record atomically (WATCH/MULTI), and queue `also` (events,
        a job) in the same transaction. Returns the new record, or None when the record does
        not exist — or, with `gen`, is another incarnation: an update never recreates a
        deleted image nor touches the image uploaded under its id afterwards. `change` may
        raise to abort.
        """

        def write(pipe: Pipeline, key: str, record: ImageRecord) -> ImageRecord | None:
            if gen is not None and record.gen != gen:
                return None
            record = change(record)
            pipe.multi()
            pipe.set(key, json.dumps(record.to_dict(), separators=(",", ":")))
            if also is not None:
                also(pipe, record)
            return record

        return self._watched(owner, image_id, "record update", write)

    def all_ids(self) -> Iterator[tuple[str, str]]:
        """(owner, id) of every record, in no particular order (SCAN: safe on a live
        system; ids added meanwhile may or may not be seen)."""
        prefix = f"{NS}:image:"
        with redis_errors("record scan"):
            for raw in self.redis.scan_iter(match=f"{prefix}*", count=1000):
                owner, _, image_id = raw.decode()[len(prefix) :].partition(":")
                yield owner, image_id

    def restore(self, record: ImageRecord, enqueue: Callable[[Pipeline], object] | None) -> bool:
        """Recreate a record from its bucket copy unless the id has a record or an upload
        in progress (then False). Record, index entry and job in one transaction."""
        key = image_key(record.owner, record.id)
        lease = lease_key(record.owner, record.id)
        body = json.dumps(record.to_dict(), separators=(",", ":"))
        with redis_errors("record restore"), self.redis.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key, lease)  # type: ignore[no-untyped-call]
                if pipe.exists(key) or pipe.exists(lease):
                    return False
                pipe.multi()
                if enqueue is not None:
                    enqueue(pipe)
                pipe.set(key, body)
                pipe.zadd(_index_key(record.owner), {record.id: created_ms(record)})
                pipe.execute()
                return True
            except WatchError:
                return False

    def page(
        self, owner: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[list[ImageRecord], tuple[int, str] | None]:
        """Newest first: up to `limit` records after the cursor (creation ms, id), and the
        cursor of the next page (None on the last). New uploads sort before any cursor, so
        pages stay stable while images arrive."""
        found = self._index_after(owner, limit + 1, after)
        ids = found[:limit]
        with redis_errors("record read"):
            raws = (
                self.redis.mget([image_key(owner, image_id) for _, image_id in ids]) if ids else []
            )
        records = [ImageRecord.from_dict(json.loads(raw)) for raw in raws if raw is not None]
        return records, (ids[-1] if len(found) > limit else None)

    def _index_after(
        self, owner: str, count: int, after: tuple[int, str] | None
    ) -> list[tuple[int, str]]:
        # ZREVRANGEBYSCORE orders by (score, member) descending; entries sharing the
        # cursor's millisecond are filtered by id, so a page boundary inside one
        # millisecond neither repeats nor skips anything.
        top: float | int = float("inf") if after is None else after[0]
        found: list[tuple[int, str]] = []
        offset = 0
        while len(found) < count:
            with redis_errors("index read"):
                batch = self.redis.zrevrangebyscore(
                    _index_key(owner), top, "-inf", start=offset, num=count, withscores=True
                )
            if not batch:
                break
            offset += len(batch)
            for member, score in cast(list[tuple[bytes, float]], batch):
                entry = (int(score), member.decode())
                if after is None or entry < after:
                    found.append(entry)
        return found[:count]

    def delete(
        self, owner: str, image_id: str, also: Also | None = None, gen: str | None = None
    ) -> ImageRecord:
        """Remove the record and its index entry (and queue `also`, e.g. an event) in one
        transaction. A conversion in flight loses its WATCH race and stops writing. With
        `gen`, only that incarnation (NotFound otherwise)."""

        def remove(pipe: Pipeline, key: str, record: ImageRecord) -> ImageRecord | None:
            if gen is not None and record.gen != gen:
                return None
            pipe.multi()
            pipe.delete(key)
            pipe.zrem(_index_key(owner), image_id)
            if also is not None:
                also(pipe, record)
            return record

        record = self._watched(owner, image_id, "record delete", remove)
        if record is None:
            raise NotFound(f"no image {image_id!r}")
        return record

    def _watched(
        self,
        owner: str,
        image_id: str,
        action: str,
        write: Callable[[Pipeline, str, ImageRecord], ImageRecord | None],
    ) -> ImageRecord | None:
        """Optimistic transaction on one record: WATCH, read, let `write` queue commands
        after MULTI, EXEC; start over when another writer got in between. None when the
        record does not exist."""
        key = image_key(owner, image_id)
        with redis_errors(action), self.redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_RACES):
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    record = write(pipe, key, ImageRecord.from_dict(json.loads(raw)))
                    if record is None:
                        return None
                    pipe.execute()
                    return record
                except WatchError as exc:
                    if isinstance(exc.__context__, redis.RedisError | OSError):
                        raise  # the connection failed: the EXEC may have run, never redo it
                    continue  # another writer got in between: read again
                finally:
                    pipe.reset()
        raise QueueUnavailable(f"{action} of {image_id!r} lost {_MAX_RACES} races in a row")

    def schedule_purge(self, purge: Purge, due: float, pipe: Pipeline | None = None) -> None:
        """Remember objects to delete at `due` (epoch seconds), in `pipe` when given."""
        if pipe is not None:
            pipe.zadd(PURGES_KEY, {purge.member(): due})
            return
        with redis_errors("purge list"):
            self.redis.zadd(PURGES_KEY, {purge.member(): due})

    def queue_purge(self, prefix: str) -> None:
        """Delete everything under `prefix` at the janitor's next sweep."""
        self.schedule_purge(Purge(prefix, until=0.0), due=time.time())

    def purging(self, prefix: str) -> bool:
        """Whether a purge of exactly `prefix` is pending: its objects belong to an image
        that was deleted, or to an upload that never committed (core/leases.py)."""
        with redis_errors("purge list"):
            found = self.redis.zrange(PURGES_KEY, 0, -1)
        return any(Purge.parse(m).prefix == prefix for m in cast(list[bytes], found))

    def due_purges(self, now: float | None = None) -> list[Purge]:
        with redis_errors("purge list"):
            found = self.redis.zrangebyscore(PURGES_KEY, "-inf", now or time.time())
        return [Purge.parse(m) for m in cast(list[bytes], found)]

    def purged(self, purge: Purge, now: float | None = None) -> None:
        """The purge ran: drop it, or keep it for one more run at its `until`."""
        with redis_errors("purge list"):
            if (now or time.time()) < purge.until:
                self.redis.zadd(PURGES_KEY, {purge.member(): purge.until}, xx=True)
            else:
                self.redis.zrem(PURGES_KEY, purge.member())


@dataclass(frozen=True, slots=True)
class Purge:
    """Objects to delete: everything under `prefix` (one incarnation or variant set, never
    an id's whole prefix), or with `flat` only the objects directly under it (the legacy
    layout). Deleted when due and once more at `until`, after any job that could still
    write there has timed out."""

    prefix: str
    until: float
    flat: bool = False

    def member(self) -> str:
        return json.dumps([self.prefix, round(self.until, 3), self.flat], separators=(",", ":"))

    @classmethod
    def parse(cls, raw: bytes | str) -> Purge:
        prefix, until, flat = json.loads(raw)
        return cls(str(prefix), float(until), bool(flat))
