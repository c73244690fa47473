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
from dataclasses import dataclass, field
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

Reader = Callable[[int], bytes]
READ_SIZE = 1024 * 1024


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
    """A part-sized buffer reused across parts. The first one grows, so a small upload
    costs only its own size, not a whole part."""

    __slots__ = ("data", "pos")

    def __init__(self) -> None:
        self.data = bytearray()
        self.pos = 0

    def add(self, chunk: bytes) -> None:
        end = self.pos + len(chunk)
        if self.pos == len(self.data):
            self.data += chunk
        else:  # a recycled full-size buffer: overwrite in place, no reallocation
            self.data[self.pos : end] = chunk
        self.pos = end

    def view(self) -> memoryview:
        return memoryview(self.data)[: self.pos]


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


@dataclass
class Ingest:
    """One upload body. `run()` drives it to the end or raises a domain error."""

    read: Reader
    limits: Limits
    sink: PartSink
    declared_size: int | None = None
    # algorithm name (hashlib) -> expected raw digest, from the client's Repr-Digest.
    expected_digests: Mapping[str, bytes] = field(default_factory=dict)

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
        hasher = blake3(max_threads=1)  # AUTO hangs in forked children (FACTS.md)
        checks = {name: hashlib.new(name) for name in self.expected_digests}
        part = PartBuffer()
        total = 0
        sniffed: Sniffed | None = None
        need = 1  # head bytes the sniffer wants before it can decide
        while True:
            # A full part waits until a further byte proves the body goes on: a body of
            # exactly one part must still go as a single PUT.
            room = self.limits.part_size - part.pos or self.limits.part_size
            want = need - part.pos if sniffed is None else READ_SIZE
            chunk = self.read(max(1, min(want, room, READ_SIZE)))
            if not chunk:
                break
            total += len(chunk)
            if total > self.limits.max_bytes:
                raise TooLarge(self._too_large_detail())
            hasher.update(chunk)
            for check in checks.values():
                check.update(chunk)
            if part.pos == self.limits.part_size:
                assert sniffed is not None  # max_head <= part_size: decided by now
                part = self._flush(part, sniffed)
            part.add(chunk)
            if sniffed is None and part.pos >= need:
                sniffed, need = self._sniff(part, final=part.pos >= self.limits.max_head)
        if total == 0:
            raise EmptyBody("the request body is empty")
        if self.declared_size is not None and total < self.declared_size:
            raise ClientDisconnected(
                f"request body ended after {total} of {self.declared_size} bytes"
            )
        if sniffed is None:
            sniffed, _ = self._sniff(part, final=True)
            assert sniffed is not None  # final=True always decides
        self._verify(checks)
        result = Ingested(total, hasher.hexdigest(), sniffed)
        self.sink.finish(part, result)
        return result

    def _flush(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer:
        free = self.sink.write_part(part, sniffed) or PartBuffer()
        free.pos = 0
        return free

    def _sniff(self, part: PartBuffer, final: bool) -> tuple[Sniffed | None, int]:
        head = part.data if part.pos == len(part.data) else part.data[: part.pos]
        found = sniff(head, final)
        if isinstance(found, NeedMore):
            return None, min(found.at_least, self.limits.max_head)
        self._check(found)
        return found, 0

    def _check(self, found: Sniffed) -> None:
        if found.format not in self.limits.allowed_formats:
            accepted = ", ".join(sorted(self.limits.allowed_formats))
            raise UnsupportedFormat(f"{found.format} images are not accepted here ({accepted} are)")
        if found.width is not None and found.height is not None:
            pixels = found.width * found.height
            if pixels > self.limits.max_pixels:
                raise TooManyPixels(
                    f"{found.width}x{found.height} is {pixels} pixels,"
                    f" above the limit of {self.limits.max_pixels}"
                )

    def _verify(self, checks: Mapping[str, hashlib._Hash]) -> None:
        for name, check in checks.items():
            if check.digest() != self.expected_digests[name]:
                raise DigestMismatch(
                    f"the body does not match the {name} digest sent in Repr-Digest"
                )

    def _too_large_detail(self) -> str:
        return f"the body is larger than the limit of {self.limits.max_bytes} bytes"
