"""Image records in Redis: the live index both processes read and write.

Keys (all under `picstream:`):
  image:{owner}:{id}    the record as JSON
  images:{owner}        sorted set of ids by creation time (milliseconds), for listing
  lease:{owner}:{id}    held while an upload of that id runs (core/leases.py)
  purges                sorted set of object prefixes still to delete, scored by when
                        (also the guards of uploads not yet committed: core/leases.py)

Every redis error is translated to `QueueUnavailable` here.
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
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.exceptions import WatchError
from redis.retry import Retry

from core.errors import Conflict, NotFound, QueueUnavailable
from core.models import ImageRecord
from core.settings import Settings

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
    ten retries."""
    return Redis.from_url(
        settings.redis_url,
        socket_timeout=settings.redis_timeout,
        socket_connect_timeout=min(3.0, settings.redis_timeout),
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        health_check_interval=30,
    )


@contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Redis failures inside the block become QueueUnavailable naming `action`."""
    try:
        yield
    except redis.RedisError as exc:
        raise QueueUnavailable(f"{action} failed: Redis {type(exc).__name__}") from exc


def _image_key(owner: str, image_id: str) -> str:
    return f"{NS}:image:{owner}:{image_id}"


def lease_key(owner: str, image_id: str) -> str:
    """Held while an upload of this id runs (core/leases.py)."""
    return f"{NS}:lease:{owner}:{image_id}"


def _index_key(owner: str) -> str:
    return f"{NS}:images:{owner}"


def created_ms(record: ImageRecord) -> int:
    return int(record.created.timestamp() * 1000)


class Records:
    def __init__(self, client: Redis) -> None:
        self.redis = client

    def ping(self) -> None:
        with redis_errors("Redis ping"):
            self.redis.ping()

    def get(self, owner: str, image_id: str) -> ImageRecord:
        """The record, or NotFound (also for another owner's id: keys are owner-scoped)."""
        with redis_errors("record read"):
            raw = self.redis.get(_image_key(owner, image_id))
        if raw is None:
            raise NotFound(f"no image {image_id!r}")
        return ImageRecord.from_dict(json.loads(raw))

    def exists(self, owner: str, image_id: str) -> bool:
        with redis_errors("record read"):
            return bool(self.redis.exists(_image_key(owner, image_id)))

    def commit(
        self,
        record: ImageRecord,
        lease: UploadLease,
        enqueue: Callable[[Pipeline], object],
        fence: float,
    ) -> None:
        """Write the record, index it and enqueue its job in one MULTI/EXEC: all or nothing,
        and decided before this returns.

        The lease is first shortened to `fence` seconds and the transaction WATCHes it, so
        an EXEC that reaches Redis later than that is aborted by Redis itself. When the
        EXEC's answer is lost (timeout, broken connection), the outcome is looked up once
        the fence has passed: the record with this incarnation exists, or never will.
        Raises Conflict if the id was taken meanwhile, QueueUnavailable if not committed.
        """
        key = _image_key(record.owner, record.id)
        body = json.dumps(record.to_dict(), separators=(",", ":"))
        fence_ms = int(fence * 1000)
        with redis_errors("record write"):
            if not lease.freeze(fence_ms):
                raise QueueUnavailable("the upload's lease expired before its commit")
        # Redis set the fence before it answered (a retried freeze too: see _FREEZE), so it
        # expires at the latest `fence` from now.
        started = time.monotonic()
        try:
            with self.redis.pipeline(transaction=True) as pipe:
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
                pipe.execute()
                lease.committed()
                return
        except WatchError as exc:
            # redis-py also raises WatchError when the connection fails while watching;
            # only an EXEC that Redis refused (no underlying error) is a sure "no".
            if not isinstance(exc.__context__, redis.RedisError | OSError):
                raise QueueUnavailable("the upload's lease expired during its commit") from None
            log.warning("commit of %s/%s: %s; finding out", record.owner, record.id, exc)
        except redis.RedisError as exc:
            log.warning("commit of %s/%s: %s; finding out", record.owner, record.id, exc)
        if not self._committed(record, started + fence + 0.5, started + 2 * fence + 5):
            raise QueueUnavailable("record write failed: Redis did not answer in time")
        lease.committed()

    def _committed(self, record: ImageRecord, decidable: float, give_up: float) -> bool:
        """After an ambiguous EXEC: True once the record with this incarnation is seen,
        False once Redis answers after `decidable` (the fence has expired, so the EXEC
        can no longer run) without it, or when Redis stays unreachable until `give_up`."""
        key = _image_key(record.owner, record.id)
        while True:
            now = time.monotonic()
            try:
                raw = self.redis.get(key)
                if raw is not None and json.loads(raw).get("gen") == record.gen:
                    return True
                if now >= decidable:
                    return False
            except redis.RedisError:
                if now >= give_up:
                    log.error("commit of %s/%s undecided: Redis unreachable", record.owner, key)
                    return False
            time.sleep(0.1)  # polling a remote outcome, bounded by give_up

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
        key = _image_key(record.owner, record.id)
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
                self.redis.mget([_image_key(owner, image_id) for _, image_id in ids]) if ids else []
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
        key = _image_key(owner, image_id)
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
