"""Upload leases: an upload's claim on its image id, and the fence its commit depends on.

An upload holds one lease from before its first S3 call until its commit:

    picstream:lease:{owner}:{id}   = a random token, expiring after `ttl` unless renewed

- It reserves the id: a second upload of the same id while the first runs gets 409.
- It is renewed by a keeper thread of the uploading process (every third of its ttl),
  whether or not bytes arrive, so a store that stalls mid-upload does not lose it; a dead
  process stops renewing and the id is free again within `ttl`.
- It registers the upload's multipart uploads (`picstream:multipart`, a sorted set scored
  by lease expiry), so the janitor aborts the parts of a dead process within minutes.
- It fences the commit (core/records.py `commit`): the commit WATCHes the lease key, and
  Redis aborts an EXEC when a watched key expired in between (Redis >= 6.0.9, tested in
  tests/integration/test_commit.py). A commit delayed past the lease therefore never
  happens, which is what makes a timed-out commit decidable. Freezing changes the lease's
  value, so a renewal (or an earlier try of the freeze) that reaches Redis late finds no
  lease to extend and cannot move the fence.
- It guards the incarnation's objects: a purge of the upload's prefix, due only once the
  lease has expired (plus GUARD_MARGIN), renewed with it and cancelled by the commit in its
  transaction. The objects of an upload that never committed — its process killed between
  storing the original and committing — are deleted by the janitor, and `rebuild` never
  brings such an upload back. Lease expiry and guard are set in one script, on Redis's
  clock, so a late renewal can never leave the guard due while the lease still lives; a
  plain upload takes its lease and sets its guard in one script too (one round trip).
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import cast

import redis
from redis import Redis

from core.errors import QueueUnavailable, UploadInProgress
from core.records import NS, PURGES_KEY, Purge, lease_key

log = logging.getLogger(__name__)

MULTIPART_KEY = f"{NS}:multipart"

# A guard comes due this long after the lease it follows expired: the janitor compares it
# with its own clock, which may differ from Redis's.
GUARD_MARGIN = 60.0

# The guard's due time (KEYS[2], member ARGV[3]): the lease's expiry on Redis's clock, in
# epoch seconds, + ARGV[4]. Updated only if the guard exists.
_GUARD = """
local function guard(ms)
  if ARGV[3] ~= '' then
    local now = redis.call('TIME')
    local due = tonumber(now[1]) + tonumber(now[2]) / 1e6 + ms / 1000 + tonumber(ARGV[4])
    redis.call('ZADD', KEYS[2], 'XX', due, ARGV[3])
  end
end
"""
# Renew: extend the lease (and its guard) only while it is ours and not frozen.
_RENEW = (
    _GUARD
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  guard(tonumber(ARGV[2]))
  return 1
end
return 0
"""
)
# Freeze: the lease expires in ARGV[2] ms and never again changes (its value becomes
# token:frozen, which no renewal matches). A retry of a freeze that was applied: 1.
_FREEZE = (
    _GUARD
    + """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1] .. ':frozen', 'PX', ARGV[2])
  guard(tonumber(ARGV[2]))
  return 1
end
if held == ARGV[1] .. ':frozen' then
  return 1
end
return 0
"""
)
# Acquire: take the lease (KEYS[1]) unless another upload holds it: 0. A retry of an acquire
# that was applied finds its own token: taken. With a record key (KEYS[3]) that exists: 2,
# the lease held and no guard set. Then the guard (member ARGV[3], unless ''), due as
# `_GUARD` has it: 1.
_ACQUIRE = """
local held = redis.call('GET', KEYS[1])
if held == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
elseif held ~= ARGV[1] then
  return 0
end
if #KEYS > 2 and redis.call('EXISTS', KEYS[3]) == 1 then
  return 2
end
if ARGV[3] ~= '' then
  local now = redis.call('TIME')
  local due = tonumber(now[1]) + tonumber(now[2]) / 1e6 + ARGV[2] / 1000 + tonumber(ARGV[4])
  redis.call('ZADD', KEYS[2], due, ARGV[3])
end
return 1
"""
# Release: delete the lease only while it is still ours (frozen or not).
_RELEASE = """
local held = redis.call('GET', KEYS[1])
if held == ARGV[1] or held == ARGV[1] .. ':frozen' then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def multipart_member(key: str, upload_id: str) -> str:
    return json.dumps([key, upload_id], separators=(",", ":"))


class UploadLease:
    """One upload's lease. Use through `Leases.hold`."""

    def __init__(self, client: Redis, owner: str, image_id: str, ttl: float) -> None:
        self.redis = client
        self.owner = owner
        self.image_id = image_id
        self.key = lease_key(owner, image_id)
        self.token = secrets.token_hex(16)
        self.ttl_ms = int(ttl * 1000)
        self.multipart: set[str] = set()
        self.guarded = ""  # the purge member guarding the incarnation's objects, if any
        self.lost = False
        self.frozen = False  # set by the commit: no renewal may extend the fence
        self.spent = False  # the commit deleted the lease with its write: nothing to release
        self.found = False  # `acquire` found the record it was told to look for
        self._lock = threading.Lock()

    def acquire(self, guard: str = "", unless: str = "") -> bool:
        """Take the lease; False when another upload holds it. With `guard` (this upload's
        incarnation's prefix), the deletion of everything under it is scheduled for after
        the lease, in the same round trip; the commit cancels it (core/records.py `commit`).
        With `unless` (a record's key) that exists, the lease is taken, no guard is set and
        `found` says so."""
        member = Purge(guard, 0.0).member() if guard else ""
        keys = (self.key, PURGES_KEY, unless) if unless else (self.key, PURGES_KEY)
        args = (self.token, self.ttl_ms, member, GUARD_MARGIN)
        try:
            taken = self.redis.eval(_ACQUIRE, len(keys), *keys, *args)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"id reservation failed: Redis {type(exc).__name__}") from exc
        if taken == 2:
            self.found = True
        elif taken == 1 and member:
            with self._lock:
                self.guarded = member
        return bool(taken)

    def renew(self) -> None:
        """Extend the lease and the multipart registrations (keeper thread)."""
        with self._lock:
            if self.frozen or self.lost:
                return
            members = list(self.multipart)
            expires = _now_ms() + self.ttl_ms
            pipe = self.redis.pipeline(transaction=False)
            pipe.eval(_RENEW, 2, *self._script_args(self.ttl_ms))
            for member in members:
                pipe.zadd(MULTIPART_KEY, {member: expires}, xx=True)
            held = pipe.execute()[0]
        if not held:
            self.lost = True
            log.warning("the lease of %s/%s was lost", self.owner, self.image_id)

    def freeze(self, fence_ms: int) -> bool:
        """Stop renewing and shorten the lease to `fence_ms`: the commit that follows must
        reach Redis before that, or never take effect. False if the lease is not ours."""
        with self._lock:
            self.frozen = True
            if self.lost:
                return False
            return bool(self.redis.eval(_FREEZE, 2, *self._script_args(fence_ms)))

    def _script_args(self, ms: int) -> tuple[str | int | float, ...]:
        return (self.key, PURGES_KEY, self.token, ms, self.guarded, GUARD_MARGIN)

    def unguard(self) -> None:
        """Cancel the guard: nothing was ever written under the prefix."""
        with self._lock:
            member, self.guarded = self.guarded, ""
        if member:
            try:
                self.redis.zrem(PURGES_KEY, member)
            except redis.RedisError as exc:  # the janitor's purge finds nothing to delete
                log.info("could not cancel the guard of %s: %s", self.key, type(exc).__name__)

    # The multipart tracker interface (core/storage.py `Tracker`).
    def started(self, key: str, upload_id: str) -> None:
        member = multipart_member(key, upload_id)
        try:
            self.redis.zadd(MULTIPART_KEY, {member: _now_ms() + self.ttl_ms})
        except redis.RedisError as exc:
            raise QueueUnavailable(f"upload registration failed: {type(exc).__name__}") from exc
        with self._lock:
            self.multipart.add(member)

    def ended(self, key: str, upload_id: str) -> None:
        member = multipart_member(key, upload_id)
        with self._lock:
            self.multipart.discard(member)
        try:
            self.redis.zrem(MULTIPART_KEY, member)
        except redis.RedisError as exc:  # the janitor finds it aborted or completed
            log.info("could not unregister the upload of %s: %s", key, type(exc).__name__)

    def committed(self) -> None:
        """The commit deleted the lease in its own transaction (core/records.py `commit`):
        `release` has nothing left to do, and saves a round trip on every upload."""
        with self._lock:
            self.frozen = True
            self.spent = True

    def release(self) -> None:
        """Free the id. Multipart uploads still registered (their abort failed) stay so,
        and expire with the lease: the janitor aborts them."""
        with self._lock:
            self.frozen = True
            if self.spent:
                return
        try:
            self.redis.eval(_RELEASE, 1, self.key, self.token)
        except redis.RedisError as exc:  # it expires by itself
            log.info("could not release the lease of %s: %s", self.key, type(exc).__name__)


class Leases:
    """The leases of one process, renewed by one keeper thread."""

    def __init__(self, client: Redis, ttl: float) -> None:
        self.redis = client
        self.ttl = ttl
        self._live: weakref.WeakSet[UploadLease] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def hold(
        self, owner: str, image_id: str, guard: str = "", unless: str = ""
    ) -> Iterator[UploadLease]:
        """The lease on `image_id` for the duration of the block; UploadInProgress if
        another upload holds it. `guard` and `unless` as for `UploadLease.acquire`."""
        lease = UploadLease(self.redis, owner, image_id, self.ttl)
        if not lease.acquire(guard, unless):
            raise UploadInProgress(f"an upload to image {image_id!r} is already in progress")
        self._track(lease)
        try:
            yield lease
        finally:
            with self._lock:
                self._live.discard(lease)
            lease.release()

    def _track(self, lease: UploadLease) -> None:
        with self._lock:
            self._live.add(lease)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._keep, name="lease-keeper", daemon=True)
                self._thread.start()

    def _keep(self) -> None:
        while True:
            time.sleep(self.ttl / 3)
            with self._lock:
                live = list(self._live)
            for lease in live:
                try:
                    lease.renew()
                except redis.RedisError as exc:
                    log.warning("lease renewal failed: %s", type(exc).__name__)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def expired_multipart(client: Redis, now_ms: int | None = None) -> list[tuple[str, str, str]]:
    """(key, upload_id, member) of registered multipart uploads whose lease expired."""
    found = client.zrangebyscore(MULTIPART_KEY, "-inf", now_ms or _now_ms())
    out = []
    for member in cast(list[bytes], found):
        text = member.decode() if isinstance(member, bytes) else str(member)
        key, upload_id = json.loads(text)
        out.append((key, upload_id, text))
    return out
