"""An upload's lease as it is taken (core/leases.py `UploadLease.acquire`): the id's claim
and the guard of the incarnation's objects in one round trip, on a real Redis."""

from __future__ import annotations

import time

from redis import Redis

from core.leases import UploadLease
from core.models import ObjectKeys, new_generation
from core.records import Records, image_key


def due_prefixes(redis_client: Redis, later: float) -> list[str]:
    return [p.prefix for p in Records(redis_client).due_purges(time.time() + later)]


def test_taking_the_lease_guards_the_incarnation_until_the_lease_and_its_margin_end(
    redis_client: Redis,
) -> None:
    keys = ObjectKeys("alice", "x", new_generation())
    lease = UploadLease(redis_client, "alice", "x", ttl=30)
    assert lease.acquire(guard=keys.prefix)
    assert due_prefixes(redis_client, 10) == []  # not while the lease lives
    assert due_prefixes(redis_client, 3600) == [keys.prefix]
    # Another upload of the id is refused and guards nothing.
    other = UploadLease(redis_client, "alice", "x", ttl=30)
    assert not other.acquire(guard=ObjectKeys("alice", "x", new_generation()).prefix)
    assert due_prefixes(redis_client, 3600) == [keys.prefix]


def test_an_acquire_sent_again_after_a_lost_answer_holds_the_lease(redis_client: Redis) -> None:
    """redis-py sends a command again when the connection broke before its answer came:
    the lease it did take is found as its own, not taken for another upload's (409)."""
    lease = UploadLease(redis_client, "alice", "x", ttl=30)
    prefix = ObjectKeys("alice", "x", new_generation()).prefix
    assert lease.acquire(guard=prefix)
    assert lease.acquire(guard=prefix)
    assert due_prefixes(redis_client, 3600) == [prefix]


def test_a_put_finding_the_record_committed_takes_the_lease_and_guards_nothing(
    redis_client: Redis,
) -> None:
    redis_client.set(image_key("alice", "x"), "{}")  # a concurrent PUT just committed
    lease = UploadLease(redis_client, "alice", "x", ttl=30)
    prefix = ObjectKeys("alice", "x", new_generation()).prefix
    assert lease.acquire(guard=prefix, unless=image_key("alice", "x"))
    assert lease.found
    assert due_prefixes(redis_client, 3600) == []
