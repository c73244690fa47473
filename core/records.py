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

import redis
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.retry import Retry

from core.errors import NotFound, QueueUnavailable
from core.models import ImageRecord
from core.settings import Settings

NS = "picstream"


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
