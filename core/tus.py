"""Resumable uploads (tus 1.0): their state in Redis and the writer of one PATCH.

A resumable upload is one S3 multipart upload that many requests, in any web process, add
to. Nothing about it lives in a process between requests:

    picstream:tus:{uid}   a hash: owner, target image and incarnation, Upload-Length and
                          offset, the parts completed so far (number, ETag), the tail, the
                          sniffed head, expiry... (`TusState`)

- **Lock and fence.** A PATCH holds the upload's lease (core/leases.py, keyed
  `tus-{uid}`), renewed by the process's keeper thread; a second PATCH gets 423. Every
  change of the state is a script that applies it only while the lease still holds this
  PATCH's token, so a PATCH that stalled past its lease (its process SIGSTOPped, say) can
  never write the state again. The S3 writes of such a PATCH cannot be fenced, so none of
  them can clash: each part gets a number never used before (HINCRBY), each tail a key of its
  own, and only the parts the state lists are ever completed.
- **Parts and the 5 MiB minimum.** S3 wants every part but the last to be at least 5 MiB; a
  PATCH may carry one byte. Bytes are gathered into a part buffer; a full buffer becomes the
  next part (one in flight while the next fills, as for plain uploads), and what is left at
  the end of a PATCH is written as a *tail object* beside the upload, read back into the
  buffer by the next PATCH. Memory per PATCH: at most three part buffers (filling, in
  flight, and the tail read back into a buffer); no temporary files. A PATCH cut mid-way
  keeps what it received (up to the cut) the same way, so the client resumes from there.
- **The exact BLAKE3.** A hash cannot leave the process that computed it (blake3 cannot be
  serialised), so each process keeps the running hash of the uploads it served last
  (`Hashers`). While every PATCH of an upload lands on the process that served the one
  before, the hash is computed as the bytes pass. Once one does not, the upload is marked
  and its object is read back once when complete (a second pass over the bytes: about the
  cost of a download from the store).
- **Expiry.** An upload must complete within PICSTREAM_TUS_EXPIRY of its creation (below
  the store's own expiry of incomplete multipart uploads). Its multipart upload is
  registered with the janitor at that expiry (`picstream:multipart`), and its objects are
  guarded by a purge due after it (`picstream:purges`), which the commit of the image
  cancels: the janitor aborts and deletes what an abandoned upload left. Its state outlives
  the expiry by a day, so a late request gets 410 rather than 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, Future
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis
from blake3 import blake3
from redis import Redis

from core.errors import (
    ChecksumMismatch,
    ClientDisconnected,
    ClientTimeout,
    NotFound,
    PicstreamError,
    TooLarge,
    UploadExhausted,
    UploadExpired,
    UploadInProgress,
    UploadLocked,
)
from core.ingest import READ_SIZE, Limits, PartBuffer, Source, check_sniffed
from core.leases import GUARD_MARGIN, MULTIPART_KEY, Leases, UploadLease, multipart_member
from core.models import META_GEN, META_ID, META_OWNER, ObjectKeys
from core.records import NS, PURGES_KEY, Purge, redis_errors
from core.settings import S3_MAX_PARTS, S3_MIN_PART
from core.sink import object_metadata
from core.sniff import NeedMore, Sniffed, sniff
from core.storage import COPY_LIMIT, MultipartUpload, Part, Store

log = logging.getLogger(__name__)

STATE_PREFIX = f"{NS}:tus:"
# How long a request waits for another that holds the upload before answering 423.
LOCK_WAIT = 3.0
# Part numbers kept in reserve for PATCHes that will be abandoned (cut, or checksum refused).
PART_MARGIN = 64
# After its expiry an upload answers 410 for this long, then its state is gone (404).
KEEP_AFTER_EXPIRY = 86_400

# Apply field changes (ARGV[2..]) only while the lease (KEYS[2]) holds this PATCH's token.
_SAVE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
if redis.call('GET', KEYS[2]) ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# The next part number, only while the upload exists (a late request must not bring back a
# state without its TTL and fields).
_NEXT_PART = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return -1
end
return redis.call('HINCRBY', KEYS[1], 'next_part', 1)
"""


def tails_prefix(state: TusState) -> str:
    """Where the upload's tails are: inside its incarnation (guarded with it), apart from
    the original and the variant sets (whose names are generation ids)."""
    return f"{state.keys.prefix}tus/"


def state_key(uid: str) -> str:
    return f"{STATE_PREFIX}{uid}"


def new_upload_id() -> str:
    """A resumable upload's id: 128 random bits, URL-safe (it is the upload's only name)."""
    return secrets.token_urlsafe(16)


@dataclass(slots=True)
class TusState:
    """One resumable upload, as kept in Redis."""

    uid: str
    owner: str
    image_id: str
    gen: str  # the incarnation its original is written under
    length: int | None  # Upload-Length; None while deferred
    expires: float  # epoch seconds
    profile: str
    metadata: str  # Upload-Metadata as the client sent it (echoed by HEAD)
    max_bytes: int
    formats: tuple[str, ...]
    filename: str = ""
    callback: str = ""
    alt: str | None = None  # the image's alt text, from Upload-Metadata `alt` (validated)
    image_metadata: dict[str, Any] | None = None  # from Upload-Metadata `metadata` (validated)
    jti: str = ""  # the upload token it was created with, if any
    offset: int = 0
    upload_id: str = ""  # the S3 multipart upload, once the first part is sent
    parts: list[tuple[int, str]] = field(default_factory=list)  # (number, ETag)
    tail_key: str = ""
    tail_len: int = 0
    sniffed: str = ""  # JSON of the decided Sniffed
    hasher: str = ""  # the process holding the running BLAKE3 ("" once lost)
    blake3: str = ""  # set once the whole original is stored
    done: bool = False  # the image's record is committed

    @property
    def keys(self) -> ObjectKeys:
        return ObjectKeys(self.owner, self.image_id, self.gen)

    @property
    def stored(self) -> bool:
        return bool(self.blake3)

    @property
    def guard(self) -> str:
        """The purge member guarding this upload's objects until its image is committed."""
        return Purge(self.keys.prefix, 0.0).member()

    @property
    def head(self) -> Sniffed | None:
        return Sniffed(**json.loads(self.sniffed)) if self.sniffed else None

    def limits(self, base: Limits) -> Limits:
        return replace(base, max_bytes=self.max_bytes, allowed_formats=frozenset(self.formats))

    def to_fields(self) -> dict[str, str]:
        out = {}
        for name, value in asdict(self).items():
            out[name] = json.dumps(value, separators=(",", ":"))
        return out

    @classmethod
    def from_fields(cls, raw: Mapping[bytes, bytes]) -> TusState:
        values: dict[str, Any] = {
            k.decode(): json.loads(v) for k, v in raw.items() if k.decode() in _FIELDS
        }
        values["formats"] = tuple(values["formats"])
        values["parts"] = [(int(n), str(etag)) for n, etag in values.get("parts", [])]
        return cls(**values)


_FIELDS = frozenset(TusState.__dataclass_fields__)


def changes(**values: Any) -> dict[str, str]:
    """State fields as the fenced save writes them."""
    unknown = set(values) - _FIELDS
    assert not unknown, unknown
    return {k: json.dumps(v, separators=(",", ":")) for k, v in values.items()}


class TusStates:
    """The state of resumable uploads in Redis, and their locks."""

    def __init__(self, client: Redis, leases: Leases) -> None:
        self.redis = client
        self.leases = leases

    def create(self, state: TusState) -> None:
        """Store a new upload, register the guard of its objects (due after its expiry)."""
        key = state_key(state.uid)
        with redis_errors("upload creation"), self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=state.to_fields())  # type: ignore[arg-type]
            pipe.expireat(key, int(state.expires + KEEP_AFTER_EXPIRY))
            pipe.zadd(PURGES_KEY, {state.guard: state.expires + GUARD_MARGIN})
            pipe.execute()

    def load(self, uid: str) -> TusState | None:
        with redis_errors("upload read"):
            raw = self.redis.hgetall(state_key(uid))
        return TusState.from_fields(raw) if raw else None  # type: ignore[arg-type]

    @contextmanager
    def locked(self, state: TusState, wait: float = LOCK_WAIT) -> Iterator[UploadLease]:
        """The upload's lock for the block, waiting up to `wait` seconds for a request that
        holds it (a PATCH cut by its client finishes saving what it received first: the
        resumed PATCH then learns the new offset at once, instead of retrying on 423);
        UploadLocked after that."""
        deadline = time.monotonic() + wait
        with ExitStack() as stack:
            while True:
                try:
                    lease = stack.enter_context(self.leases.hold(state.owner, f"tus-{state.uid}"))
                    break
                except UploadInProgress:
                    if time.monotonic() >= deadline:
                        raise UploadLocked(
                            "another request is writing to this upload; retry"
                        ) from None
                    time.sleep(0.05)  # polling a lock in Redis, bounded by `wait`
            yield lease

    def save(self, state: TusState, lease: UploadLease, **values: Any) -> None:
        """Apply `values` to the state, fenced by the lock: UploadLocked if it was lost."""
        flat = [item for pair in changes(**values).items() for item in pair]
        if time.time() > state.expires and not values.get("done"):
            # Past the expiry the janitor may have aborted the upload and consumed its
            # guard: nothing more may be stored or promised.
            raise UploadExpired("this upload expired before it was finished; start a new one")
        with redis_errors("upload state write"):
            ok = self.redis.eval(_SAVE, 2, state_key(state.uid), lease.key, lease.token, *flat)
        if ok == -1:
            raise UploadExpired("this upload is gone (it expired or was terminated)")
        if not ok:
            raise UploadLocked("this request lost its hold on the upload (it took too long)")
        for name, value in values.items():
            setattr(state, name, value)

    def next_part(self, state: TusState) -> int:
        """A part number no request of this upload has used (S3 allows up to 10,000)."""
        with redis_errors("part numbering"):
            number = int(self.redis.eval(_NEXT_PART, 1, state_key(state.uid)))
        if number < 0:
            raise UploadExpired("this upload is gone (it expired or was terminated)")
        if number > S3_MAX_PARTS:
            # Numbers are never reused (a stalled PATCH may still be writing its part), so
            # an upload whose PATCHes were cut or refused often enough runs out of them.
            raise UploadExhausted(
                f"this upload used up the store's {S3_MAX_PARTS} part numbers (too many of its"
                " PATCHes were cut or refused); start a new upload"
            )
        return number

    def parts_used(self, state: TusState) -> int:
        with redis_errors("part numbering"):
            used = self.redis.hget(state_key(state.uid), "next_part")
        return int(used or 0)

    def forget(self, state: TusState) -> None:
        with redis_errors("upload removal"):
            self.redis.delete(state_key(state.uid))

    def unguard(self, state: TusState) -> None:
        with redis_errors("upload removal"):
            self.redis.zrem(PURGES_KEY, state.guard)

    def tracker(self, state: TusState) -> ExpiryTracker:
        return ExpiryTracker(self.redis, state.expires)


class ExpiryTracker:
    """Registers a resumable upload's multipart upload with the janitor, due at the upload's
    expiry (not at a lease's: it outlives the requests that write it)."""

    def __init__(self, client: Redis, expires: float) -> None:
        self.redis = client
        self.due_ms = int(expires * 1000)

    def started(self, key: str, upload_id: str) -> None:
        with redis_errors("upload registration"):
            self.redis.zadd(MULTIPART_KEY, {multipart_member(key, upload_id): self.due_ms})

    def ended(self, key: str, upload_id: str) -> None:
        try:
            self.redis.zrem(MULTIPART_KEY, multipart_member(key, upload_id))
        except redis.RedisError as exc:  # the janitor finds it completed or aborted
            log.info("could not unregister the upload of %s: %s", key, type(exc).__name__)


class BufferPool:
    """Idle part buffers of this process, for the next PATCH: allocating (and faulting in) a
    fresh 16 MiB buffer per PATCH cost about a third of the web process's CPU with 8 MiB
    PATCHes (bench/tus.py). At most `idle` are kept, so an idle process holds at most that
    many parts of memory."""

    def __init__(self, idle: int = 4) -> None:
        self.idle = idle
        self._free: list[PartBuffer] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> PartBuffer:
        with self._lock:
            for n, buffer in enumerate(self._free):
                if buffer.limit == size:
                    del self._free[n]
                    buffer.pos = 0
                    return buffer
        return PartBuffer(size, expected=size)

    def give(self, buffers: list[PartBuffer]) -> None:
        with self._lock:
            for buffer in buffers:
                if len(buffer.data) != buffer.limit:
                    continue
                if len(self._free) < self.idle and buffer not in self._free:
                    self._free.append(buffer)


POOL = BufferPool()


class Hashers:
    """The running BLAKE3 of the resumable uploads this process served last, each at the
    offset it covers. A hash continues only on the process that holds it (`PROCESS` is in the
    state) and only at that exact offset."""

    PROCESS = secrets.token_hex(8)

    def __init__(self, size: int = 512) -> None:
        self.size = size
        self._items: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def resume(self, state: TusState) -> Any:
        """A copy of the hash at the state's offset, or None when it cannot be continued."""
        if state.offset == 0:
            return blake3(max_threads=1)  # not AUTO: forked processes hang (core/ingest.py)
        if state.hasher != self.PROCESS:
            return None
        with self._lock:
            item = self._items.get(state.uid)
        return item[1].copy() if item is not None and item[0] == state.offset else None

    def keep(self, uid: str, offset: int, hasher: Any) -> None:
        with self._lock:
            self._items[uid] = (offset, hasher)
            self._items.move_to_end(uid)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def drop(self, uid: str) -> None:
        with self._lock:
            self._items.pop(uid, None)


@dataclass(frozen=True, slots=True)
class Checksum:
    """A PATCH's Upload-Checksum: algorithm (hashlib name) and the expected digest."""

    algorithm: str
    digest: bytes


@dataclass(slots=True, weakref_slot=True)
class _InFlight:
    future: Future[Any]
    buffer: PartBuffer
    number: int
    end: int  # the file offset just after this part
    hasher: Any  # the hash at `end` (None if lost)
    recorded: bool = False
    error: BaseException | None = None


class PatchWriter:
    """Appends one PATCH body at the upload's offset, holding its lock (`lease`).

    Progress is saved after every part (so a process killed mid-PATCH loses at most the part
    in flight) and, as a tail, when the body ends or is cut. A PATCH with a checksum is all
    or nothing: nothing of it is saved unless the checksum matches.
    """

    def __init__(
        self,
        store: Store,
        states: TusStates,
        lease: UploadLease,
        state: TusState,
        limits: Limits,
        part_uploads: Executor,
        hashers: Hashers,
    ) -> None:
        self.store = store
        self.states = states
        self.lease = lease
        self.state = state
        self.limits = state.limits(limits)
        self.part_size = limits.part_size
        self.part_uploads = part_uploads
        self.hashers = hashers
        self.inflight: _InFlight | None = None
        self.multipart: MultipartUpload | None = None
        self._saving = threading.Lock()  # a part's progress is saved from its thread
        self.deferred = False  # a checksummed PATCH saves nothing before its end
        self.buffers: list[PartBuffer] = []  # taken from the pool, given back at the end
        self.old_tail = state.tail_key

    def run(self, source: Source, checksum: Checksum | None = None) -> None:
        """Read the body to its end (or the upload's); the state afterwards says where the
        upload stands. Raises the body's or the store's error after saving what it can."""
        try:
            self._run(source, checksum)
        finally:  # no part is in flight any more: every path settles it first
            POOL.give(list(self.buffers))
            self.buffers.clear()

    def _run(self, source: Source, checksum: Checksum | None) -> None:
        state = self.state
        hasher = self.hashers.resume(state)
        check = hashlib.new(checksum.algorithm) if checksum else None
        self.deferred = check is not None
        buffer = self._buffer_with_tail()
        start = state.offset - state.tail_len  # the file offset of the buffer's first byte
        allowed = (state.length if state.length is not None else self.limits.max_bytes) - start
        try:
            while True:
                if buffer.full:
                    buffer, start = self._send(buffer, start, hasher)
                    allowed -= self.part_size
                    continue
                want = min(READ_SIZE, self.part_size - buffer.pos)
                with buffer.window(want) as window:
                    got = source.readinto(window)
                    if got:
                        with window[:got] as fresh:
                            if hasher is not None:
                                hasher.update(fresh)
                            if check is not None:
                                check.update(fresh)
                if not got:
                    break
                buffer.pos += got
                if buffer.pos > allowed:
                    raise TooLarge(self._too_long())
                if not state.sniffed and start == 0:
                    self._sniff(buffer, final=buffer.pos >= self.limits.max_head)
        except (ClientDisconnected, ClientTimeout):
            if check is None:  # keep what arrived: the client resumes from there
                self._end(buffer, start, hasher, cut=True)
            else:
                self._settle(quiet=True)
            raise
        except BaseException:
            self._settle(quiet=True)
            raise
        if checksum is not None and check is not None and check.digest() != checksum.digest:
            self._settle(quiet=True)
            raise ChecksumMismatch(
                f"the body does not match its Upload-Checksum ({checksum.algorithm});"
                " nothing of it was kept"
            )
        self._end(buffer, start, hasher)

    def _take(self) -> PartBuffer:
        buffer = POOL.take(self.part_size)
        self.buffers.append(buffer)
        return buffer

    def _buffer_with_tail(self) -> PartBuffer:
        state = self.state
        buffer = self._take()
        if not state.tail_len:
            return buffer
        try:
            body = self.store.open_range(state.tail_key, 0, state.tail_len)
        except NotFound:  # the janitor ended the upload (expired) under this request
            raise UploadExpired("this upload's stored bytes are gone; start a new one") from None
        try:
            while buffer.pos < state.tail_len:
                chunk = body.read(min(READ_SIZE, state.tail_len - buffer.pos))
                if not chunk:
                    raise NotFound("the stored tail of this upload is incomplete")
                with buffer.window(len(chunk)) as window:
                    window[:] = chunk
                buffer.pos += len(chunk)
        finally:
            body.close()
        return buffer

    def _sniff(self, buffer: PartBuffer, final: bool) -> None:
        state = self.state
        complete = state.length is not None and buffer.pos >= state.length
        with buffer.view() as head:
            found = sniff(head, final or complete)
        if isinstance(found, NeedMore):
            return
        check_sniffed(found, self.limits)
        state.sniffed = json.dumps(asdict(found), separators=(",", ":"))

    def _send(self, buffer: PartBuffer, start: int, hasher: Any) -> tuple[PartBuffer, int]:
        """Send a full buffer as the next part (its predecessor's outcome saved first);
        return a free buffer and the file offset it starts at."""
        if not self.state.sniffed:  # a full part is at least max_head: decided now
            self._sniff(buffer, final=True)
        free = self._settle()
        upload = self._multipart()
        number = self.states.next_part(self.state)
        future = self.part_uploads.submit(upload.upload_part, number, buffer.view())
        end = start + buffer.pos
        flight = _InFlight(future, buffer, number, end, _copy(hasher))
        self.inflight = flight
        if not self.deferred:  # saved once stored, even while the client sends nothing
            # Weakly: the future keeps its callbacks, and a strong reference to the flight
            # (which holds the future and a part buffer) would be a cycle that only the
            # cycle collector frees — 16 MiB a part, measured as RSS growing per PATCH.
            writer, flight_ref = weakref.ref(self), weakref.ref(flight)
            future.add_done_callback(lambda _: _record_weakly(writer, flight_ref))
        fresh = free or self._take()
        fresh.pos = 0
        return fresh, end

    def _settle(self, quiet: bool = False) -> PartBuffer | None:
        """Wait for the part in flight and save the progress it makes; its buffer is free
        again. `quiet`: a failure is already being raised; just wait."""
        flight, self.inflight = self.inflight, None
        if flight is None:
            return None
        try:
            flight.future.result()
        except BaseException:
            if quiet:
                return None
            raise
        if quiet:
            return None
        self._record(flight)
        if flight.error is not None:
            raise flight.error
        return flight.buffer

    def _record(self, flight: _InFlight) -> None:
        """Add a stored part to the state and save it (a checksummed PATCH only at its
        end): from the part's thread when it completes, or from `_settle`, whichever is
        first."""
        with self._saving:
            if flight.recorded or flight.future.exception() is not None:
                return
            flight.recorded = True
            state = self.state
            state.parts = [*state.parts, (flight.number, flight.future.result().etag)]
            state.tail_key, state.tail_len = "", 0  # the old tail went into the first part
            if self.deferred:
                return
            try:
                self._save(flight.end, flight.hasher, parts=state.parts, tail_key="", tail_len=0)
            except BaseException as exc:  # noqa: BLE001 - raised by `_settle`, in the request
                flight.error = exc

    def _end(self, buffer: PartBuffer, start: int, hasher: Any, cut: bool = False) -> None:
        """The body ended (or was `cut`): save the rest as a tail, or complete the upload."""
        self._settle()
        state = self.state
        end = start + buffer.pos
        if state.length is not None and end == state.length and not cut:
            self._complete(buffer, hasher)
            return
        if buffer.pos >= S3_MIN_PART and self._room_for_a_short_part(end):
            # Enough for a part of its own (S3 wants 5 MiB but the last): sent as one
            # rather than kept as a tail that the next PATCH reads back and rewrites.
            buffer, start = self._send(buffer, start, hasher)
            self._settle()
        if end == state.offset and not self.deferred:
            self._drop_old_tail()  # nothing new since the last save (or an empty PATCH)
            return
        tail_key = ""
        if time.time() > state.expires:
            raise UploadExpired("this upload expired before it was finished; start a new one")
        if buffer.pos:
            tail_key = f"{tails_prefix(state)}{secrets.token_hex(8)}"
            self.store.put(tail_key, buffer.view(), "application/octet-stream", {})
        self._save(end, hasher, parts=state.parts, tail_key=tail_key, tail_len=buffer.pos)
        self._drop_old_tail()

    def _complete(self, buffer: PartBuffer, hasher: Any) -> None:
        state = self.state
        head = state.head
        if head is None:  # a file shorter than the sniffer's wish: decide on what there is
            self._sniff(buffer, final=True)
            head = state.head
        assert head is not None
        key = state.keys.original
        meta = self._object_meta(head, None)
        if not state.upload_id:
            digest = hasher.hexdigest() if hasher is not None else _blake3_of(buffer)
            self.store.put(key, buffer.view(), head.content_type, self._object_meta(head, digest))
        else:
            self._complete_multipart(buffer, hasher)
            digest = hasher.hexdigest() if hasher is not None else self._rehash(key)
            if state.length is not None and state.length <= COPY_LIMIT:
                meta = self._object_meta(head, digest)
                self.store.replace_metadata(key, head.content_type, meta)
        length = state.length or 0
        self._save(length, None, parts=state.parts, tail_key="", tail_len=0, blake3=digest)
        self._drop_old_tail()
        self.hashers.drop(state.uid)
        # Tails of PATCHes whose process died between storing one and saving the state:
        # the image's prefix is no longer guarded once it is committed.
        with contextlib.suppress(PicstreamError):
            self.store.delete_prefix(tails_prefix(state))

    def _room_for_a_short_part(self, end: int) -> bool:
        """Whether the upload can spend a part number on less than a full part and still
        finish within S3's 10,000 parts (numbers of abandoned PATCHes count too)."""
        left = (self.state.length or self.limits.max_bytes) - end
        needed = -(-left // self.part_size) + 2  # this part, the rest, and a last one
        return self.states.parts_used(self.state) + needed + PART_MARGIN <= S3_MAX_PARTS

    def _drop_old_tail(self) -> None:
        """The tail this PATCH began with, once the saved state no longer names it."""
        if self.old_tail and self.old_tail != self.state.tail_key:
            _delete_quietly(self.store, self.old_tail)
        self.old_tail = self.state.tail_key

    def _complete_multipart(self, buffer: PartBuffer, hasher: Any) -> None:
        """Send the last part and complete the multipart upload, saving the whole length
        first: when a later step fails (the metadata copy, the re-hash, Redis), the retry
        (an empty PATCH at Upload-Length, or a HEAD) comes back here with nothing left to
        send and finds the object already completed."""
        state = self.state
        upload = self._multipart()
        if buffer.pos:
            number = self.states.next_part(state)
            done = upload.upload_part(number, buffer.view())
            state.parts = [*state.parts, (done.part_number, done.etag)]
        length = state.length or 0
        self._save(length, hasher, parts=state.parts, tail_key="", tail_len=0)
        try:
            upload.complete([_part(n, etag) for n, etag in state.parts])
        except NotFound:
            # Completed by an earlier try whose later steps failed: the object is there.
            if self.store.stat(state.keys.original).size != length:
                raise

    def _rehash(self, key: str) -> str:
        """The BLAKE3 of the stored object, read back once (the hash was lost between
        processes)."""
        hasher = blake3(max_threads=1)
        self.store.download(key, _HashingWriter(hasher))
        log.info("re-read %s to hash it (the upload moved between processes)", key)
        return str(hasher.hexdigest())

    def _multipart(self) -> MultipartUpload:
        if self.multipart is not None:
            return self.multipart
        state = self.state
        tracker = self.states.tracker(state)
        key = state.keys.original
        if state.upload_id:
            self.multipart = MultipartUpload(self.store, key, state.upload_id, tracker)
            return self.multipart
        head = state.head
        assert head is not None
        upload = self.store.start_multipart(
            key, head.content_type, self._object_meta(head, None), tracker
        )
        try:
            self.states.save(state, self.lease, upload_id=upload.upload_id)
        except PicstreamError:
            upload.abort()
            raise
        self.multipart = upload
        return upload

    def _object_meta(self, head: Sniffed, digest: str | None) -> dict[str, str]:
        state = self.state
        extra = {META_OWNER: state.owner, META_ID: state.image_id, META_GEN: state.gen}
        return object_metadata(head.format, digest, extra)

    def _save(self, offset: int, hasher: Any, **values: Any) -> None:
        state = self.state
        process = Hashers.PROCESS if hasher is not None else ""
        values.setdefault("sniffed", state.sniffed)
        self.states.save(state, self.lease, offset=offset, hasher=process, **values)
        if hasher is not None:
            self.hashers.keep(state.uid, offset, hasher)

    def _too_long(self) -> str:
        if self.state.length is not None:
            return f"the body goes past the Upload-Length of {self.state.length} bytes"
        return f"the upload is larger than the limit of {self.limits.max_bytes} bytes"


class _HashingWriter:
    def __init__(self, hasher: Any) -> None:
        self.hasher = hasher

    def write(self, chunk: bytes) -> int:
        self.hasher.update(chunk)
        return len(chunk)


def _record_weakly(writer: weakref.ref[PatchWriter], flight: weakref.ref[_InFlight]) -> None:
    held_writer, held_flight = writer(), flight()
    if held_writer is not None and held_flight is not None:
        held_writer._record(held_flight)


def _copy(hasher: Any) -> Any:
    return hasher.copy() if hasher is not None else None


def _blake3_of(buffer: PartBuffer) -> str:
    hasher = blake3(max_threads=1)
    with buffer.view() as view:
        hasher.update(view)
    return str(hasher.hexdigest())


def _part(number: int, etag: str) -> Part:
    return Part(number, etag)


def _delete_quietly(store: Store, key: str) -> None:
    try:
        store.delete(key)
    except PicstreamError as exc:  # under the guarded prefix: the janitor's then
        log.info("could not delete %s: %s", key, exc.detail)


def expires_at(seconds: float, now: float | None = None) -> float:
    return (now if now is not None else time.time()) + seconds
