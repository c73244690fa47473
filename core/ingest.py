"""The pass-through reader: one pass over an upload body in constant memory.

While bytes arrive it counts them, BLAKE3-hashes them (plus any digest the client asked us to
verify), sniffs the head for format/dimensions/orientation, enforces the limits, and hands
full parts to a `PartSink` (the S3 multipart writer, or a null sink). Rejections that the
head decides (not an image, unsupported, corrupt header, too many pixels) happen before the
rest of the body is read and, since the head always lies inside the first part, before any
S3 call is made.

Memory: at most two part buffers per upload (one filling, one being uploaded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from blake3 import blake3

from core.errors import (
    ClientDisconnected,
    DigestMismatch,
    EmptyBody,
    TooLarge,
    TooManyPixels,
    UnsupportedFormat,
)
from core.sniff import NeedMore, Sniffed, sniff

READ_SIZE = 1024 * 1024
_MIN_GROWTH = 64 * 1024
# What is read while the head is sniffed: the most a rejected body has read of it.
_HEAD_READ = 16 * 1024


class Source(Protocol):
    """Where body bytes come from: fills the view's start, returns the count; 0 at the end."""

    def readinto(self, view: memoryview) -> int: ...


class ReadSource:
    """A Source over a `read(n) -> bytes` callable (one copy into the part buffer)."""

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self.read = read

    def readinto(self, view: memoryview) -> int:
        chunk = self.read(len(view))
        view[: len(chunk)] = chunk
        return len(chunk)


@dataclass(frozen=True, slots=True)
class Limits:
    part_size: int
    max_bytes: int
    max_pixels: int
    max_head: int
    allowed_formats: frozenset[str]


@dataclass(frozen=True, slots=True)
class Ingested:
    size: int
    blake3: str
    sniffed: Sniffed


class PartBuffer:
    """One part's bytes, read straight into place. Grows (doubling) up to the part size
    when the body's length is unknown, so a small upload costs its own size, not a part."""

    __slots__ = ("data", "limit", "pos")

    def __init__(self, limit: int, expected: int | None = None) -> None:
        self.limit = limit
        self.data = bytearray(min(expected, limit) if expected else 0)
        self.pos = 0

    @property
    def full(self) -> bool:
        return self.pos == self.limit

    @property
    def spare(self) -> int:
        """Bytes allocated but not yet filled: what a read can take without growing."""
        return len(self.data) - self.pos

    def window(self, n: int) -> memoryview:
        """A writable view of the next n bytes (release it before the next call)."""
        end = self.pos + n
        if end > len(self.data):
            size = min(self.limit, max(end, 2 * len(self.data), _MIN_GROWTH))
            self.data += bytes(size - len(self.data))
        with memoryview(self.data) as whole:
            return whole[self.pos : end]

    def view(self) -> memoryview:
        """The bytes held so far."""
        with memoryview(self.data) as whole:
            return whole[: self.pos]


class PartSink(Protocol):
    """Where parts go. `write_part` may return a buffer that is free again for reuse."""

    def write_part(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer | None: ...

    def finish(self, last: PartBuffer, result: Ingested) -> None: ...

    def abort(self) -> None: ...


class NullSink:
    """Discards parts: for hashing a body without storing it, and for benchmarks."""

    def write_part(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer | None:
        return part

    def finish(self, last: PartBuffer, result: Ingested) -> None:
        pass

    def abort(self) -> None:
        pass


class Ingest:
    """One upload body. `run()` drives it to the end or raises a domain error."""

    def __init__(
        self,
        source: Source,
        limits: Limits,
        sink: PartSink,
        declared_size: int | None = None,
        expected_digests: Mapping[str, bytes] | None = None,
    ) -> None:
        self.source = source
        self.limits = limits
        self.sink = sink
        self.declared_size = declared_size
        # hashlib name -> expected raw digest, from the client's Repr-Digest.
        self.expected_digests = dict(expected_digests or {})
        # Not AUTO: once a process has used AUTO, a child it forks that uses AUTO hangs
        # forever (blake3 1.0.11), and gunicorn and rq both fork.
        self._blake3 = blake3(max_threads=1)
        self._checks = {name: hashlib.new(name) for name in self.expected_digests}
        self._total = 0

    def run(self) -> Ingested:
        """Read the whole body into the sink; abort the sink on any failure, then re-raise."""
        if self.declared_size is not None and self.declared_size > self.limits.max_bytes:
            raise TooLarge(self._too_large_detail())
        try:
            return self._pump()
        except BaseException:
            # BaseException too: a gunicorn timeout or Ctrl-C must not leave a multipart
            # upload behind in the bucket.
            self.sink.abort()
            raise

    def _pump(self) -> Ingested:
        part = PartBuffer(self.limits.part_size, self.declared_size)
        sniffed: Sniffed | None = None
        need = 1  # head bytes the sniffer wants before it can decide
        while True:
            if self.declared_size is not None and self._total >= self.declared_size:
                break  # the body's source ends at its declared length: nothing more to read
            if part.full:
                # A full part is sent only once a further byte proves the body goes on:
                # a body of exactly one part must still go as a single PUT.
                assert sniffed is not None  # max_head <= part_size: decided by now
                ahead = self._read_ahead()
                if not ahead:
                    break
                part = self._flush(part, sniffed)
                with part.window(len(ahead)) as window:
                    window[:] = ahead
                part.pos += len(ahead)
                continue
            # While sniffing, a head's worth at once: asking for exactly what the sniffer
            # wants next took 8 reads and sniffs of a plain 1 MB JPEG's head.
            head = max(need, min(_HEAD_READ, self.limits.max_head))
            want = head - part.pos if sniffed is None else READ_SIZE
            size = min(want, part.limit - part.pos, READ_SIZE)
            if self.declared_size is not None:
                # Its buffer was allocated to the declared length: asking for more would grow
                # (copy) it, twice per 1 MB upload (half the web process's CPU per small
                # upload, found by profiling bench/small.py).
                size = min(size, part.spare)
            with part.window(max(1, size)) as window:
                got = self.source.readinto(window)
                if got:
                    with window[:got] as fresh:
                        self._take(fresh)
            if not got:
                break
            part.pos += got
            if sniffed is None and part.pos >= need:
                sniffed, need = self._sniff(part, final=part.pos >= self.limits.max_head)
        return self._finish(part, sniffed)

    def _take(self, fresh: memoryview) -> None:
        """Count, check the limit and hash bytes just received."""
        self._total += len(fresh)
        if self._total > self.limits.max_bytes:
            raise TooLarge(self._too_large_detail())
        self._blake3.update(fresh)
        for check in self._checks.values():
            check.update(fresh)

    def _read_ahead(self) -> bytes:
        scratch = bytearray(READ_SIZE)
        with memoryview(scratch) as window:
            got = self.source.readinto(window)
            if got:
                with window[:got] as fresh:
                    self._take(fresh)
        return bytes(scratch[:got])

    def _finish(self, part: PartBuffer, sniffed: Sniffed | None) -> Ingested:
        total = self._total
        if total == 0:
            raise EmptyBody("the request body is empty")
        if self.declared_size is not None and total < self.declared_size:
            raise ClientDisconnected(
                f"request body ended after {total} of {self.declared_size} bytes"
            )
        if sniffed is None:
            sniffed, _ = self._sniff(part, final=True)
            assert sniffed is not None  # final=True always decides
        self._verify(self._checks)
        result = Ingested(total, self._blake3.hexdigest(), sniffed)
        self.sink.finish(part, result)
        return result

    def _flush(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer:
        # Past the first part the body is known to be large: allocate whole parts at once
        # (growing one would briefly hold old and new copies).
        size = self.limits.part_size
        free = self.sink.write_part(part, sniffed) or PartBuffer(size, expected=size)
        free.pos = 0
        return free

    def _sniff(self, part: PartBuffer, final: bool) -> tuple[Sniffed | None, int]:
        with part.view() as head:
            found = sniff(head, final)
        if isinstance(found, NeedMore):
            return None, min(found.at_least, self.limits.max_head)
        self._check(found)
        return found, 0

    def _check(self, found: Sniffed) -> None:
        check_sniffed(found, self.limits)

    def _verify(self, checks: Mapping[str, hashlib._Hash]) -> None:
        for name, check in checks.items():
            if check.digest() != self.expected_digests[name]:
                raise DigestMismatch(
                    f"the body does not match the {name} digest sent in Repr-Digest"
                )

    def _too_large_detail(self) -> str:
        return too_large_detail(self.limits)


def check_sniffed(found: Sniffed, limits: Limits) -> None:
    """Refuse what the head shows is not acceptable: a format not allowed, too many pixels."""
    if found.format not in limits.allowed_formats:
        accepted = ", ".join(sorted(limits.allowed_formats))
        raise UnsupportedFormat(f"{found.format} images are not accepted here ({accepted} are)")
    if found.width is not None and found.height is not None:
        pixels = found.width * found.height
        if pixels > limits.max_pixels:
            raise TooManyPixels(
                f"{found.width}x{found.height} is {pixels} pixels,"
                f" above the limit of {limits.max_pixels}"
            )


def too_large_detail(limits: Limits) -> str:
    return f"the body is larger than the limit of {limits.max_bytes} bytes"
