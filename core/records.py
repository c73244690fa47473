"""Image records in Redis: the live index both processes read and write.

Keys (all under `picstream:`):
  image:{owner}:{id}    the record as JSON
  images:{owner}        sorted set of ids by creation time (milliseconds), for listing
  reserve:{owner}:{id}  held while a client-chosen id is being uploaded (PUT)

Every redis error is translated to `QueueUnavailable` here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import cast

import redis
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.exceptions import WatchError
from redis.retry import Retry

from core.errors import NotFound, QueueUnavailable
from core.models import ImageRecord
from core.settings import Settings

NS = "picstream"
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
        socket_timeout=5,
        socket_connect_timeout=3,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
        health_check_interval=30,
    )


@contextmanager
def _translated(action: str) -> Iterator[None]:
    try:
        yield
    except redis.RedisError as exc:
        raise QueueUnavailable(f"{action} failed: Redis {type(exc).__name__}") from exc


def _image_key(owner: str, image_id: str) -> str:
    return f"{NS}:image:{owner}:{image_id}"


def _index_key(owner: str) -> str:
    return f"{NS}:images:{owner}"


def _reserve_key(owner: str, image_id: str) -> str:
    return f"{NS}:reserve:{owner}:{image_id}"


def _created_ms(record: ImageRecord) -> int:
    stamp = datetime.fromisoformat(record.created_at.replace("Z", "+00:00"))
    return int(stamp.timestamp() * 1000)


class Records:
    def __init__(self, client: Redis) -> None:
        self.redis = client

    def ping(self) -> None:
        with _translated("Redis ping"):
            self.redis.ping()

    def get(self, owner: str, image_id: str) -> ImageRecord:
        """The record, or NotFound (also for another owner's id: keys are owner-scoped)."""
        with _translated("record read"):
            raw = self.redis.get(_image_key(owner, image_id))
        if raw is None:
            raise NotFound(f"no image {image_id!r}")
        return ImageRecord.from_dict(json.loads(raw))

    def exists(self, owner: str, image_id: str) -> bool:
        with _translated("record read"):
            return bool(self.redis.exists(_image_key(owner, image_id)))

    def reserve(self, owner: str, image_id: str, ttl: int) -> bool:
        """Claim a client-chosen id for an upload in progress; False if someone holds it."""
        with _translated("id reservation"):
            return bool(self.redis.set(_reserve_key(owner, image_id), "1", nx=True, ex=ttl))

    def extend(self, owner: str, image_id: str, ttl: int) -> None:
        with _translated("id reservation"):
            self.redis.expire(_reserve_key(owner, image_id), ttl)

    def release(self, owner: str, image_id: str) -> None:
        with _translated("id reservation"):
            self.redis.delete(_reserve_key(owner, image_id))

    def create(self, record: ImageRecord, enqueue: Callable[[Pipeline], object]) -> None:
        """Write the record, index it and enqueue its job in one MULTI/EXEC: all or nothing."""
        body = json.dumps(record.to_dict(), separators=(",", ":"))
        with _translated("record write"), self.redis.pipeline(transaction=True) as pipe:
            pipe.multi()  # explicit, so rq's enqueue joins this transaction
            enqueue(pipe)
            pipe.set(_image_key(record.owner, record.id), body)
            pipe.zadd(_index_key(record.owner), {record.id: _created_ms(record)})
            pipe.delete(_reserve_key(record.owner, record.id))
            pipe.execute()

    def update(
        self, owner: str, image_id: str, change: Change, also: Also | None = None
    ) -> ImageRecord | None:
        """Read-modify-write one record atomically (WATCH/MULTI), and queue `also` (events,
        a job) in the same transaction. Returns the new record, or None when the record does
        not exist: an update never recreates a deleted image. `change` may raise to abort.
        """

        def write(pipe: Pipeline, key: str, record: ImageRecord) -> ImageRecord:
            record = change(record)
            pipe.multi()
            pipe.set(key, json.dumps(record.to_dict(), separators=(",", ":")))
            if also is not None:
                also(pipe, record)
            return record

        return self._watched(owner, image_id, "record update", write)

    def page(
        self, owner: str, limit: int, after: tuple[int, str] | None
    ) -> tuple[list[ImageRecord], tuple[int, str] | None]:
        """Newest first: up to `limit` records after the cursor (creation ms, id), and the
        cursor of the next page (None on the last). New uploads sort before any cursor, so
        pages stay stable while images arrive."""
        found = self._index_after(owner, limit + 1, after)
        ids = found[:limit]
        with _translated("record read"):
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
            with _translated("index read"):
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

    def delete(self, owner: str, image_id: str, also: Also | None = None) -> ImageRecord:
        """Remove the record and its index entry (and queue `also`, e.g. an event) in one
        transaction. A conversion in flight loses its WATCH race and stops writing."""

        def remove(pipe: Pipeline, key: str, record: ImageRecord) -> ImageRecord:
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
        write: Callable[[Pipeline, str, ImageRecord], ImageRecord],
    ) -> ImageRecord | None:
        """Optimistic transaction on one record: WATCH, read, let `write` queue commands
        after MULTI, EXEC; start over when another writer got in between. None when the
        record does not exist."""
        key = _image_key(owner, image_id)
        with _translated(action), self.redis.pipeline(transaction=True) as pipe:
            for _ in range(_MAX_RACES):
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    if raw is None:
                        return None
                    record = write(pipe, key, ImageRecord.from_dict(json.loads(raw)))
                    pipe.execute()
                    return record
                except WatchError:
                    continue
                finally:
                    pipe.reset()
        raise QueueUnavailable(f"{action} of {image_id!r} lost {_MAX_RACES} races in a row")

    def queue_purge(self, prefix: str) -> None:
        """Remember an image prefix whose objects still have to be deleted (core/janitor)."""
        with _translated("purge list"):
            self.redis.sadd(f"{NS}:purge", prefix)

    def purges(self) -> list[str]:
        with _translated("purge list"):
            return sorted(p.decode() for p in self.redis.smembers(f"{NS}:purge"))  # type: ignore[union-attr]

    def purged(self, prefix: str) -> None:
        with _translated("purge list"):
            self.redis.srem(f"{NS}:purge", prefix)
