"""The pass-through reader on its own: hashing, counting, limits, part hand-off, abort."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from blake3 import blake3

from core.errors import (
    ClientDisconnected,
    DigestMismatch,
    EmptyBody,
    NotAnImage,
    TooLarge,
    TooManyPixels,
    UnsupportedFormat,
)
from core.ingest import Ingest, Ingested, Limits, PartBuffer, ReadSource
from core.sniff import Sniffed
from tests.images import Body, jpeg, png

MiB = 1024 * 1024
LIMITS = Limits(
    part_size=5 * MiB,
    max_bytes=64 * MiB,
    max_pixels=100_000_000,
    max_head=2 * MiB,
    allowed_formats=frozenset({"jpeg", "png", "gif"}),
)


class Source:
    """A read(n) over bytes that returns at most `piece` bytes per call, and counts reads."""

    def __init__(self, data: bytes, piece: int | None = None) -> None:
        self.data = data
        self.pos = 0
        self.piece = piece

    def read(self, n: int) -> bytes:
        assert n > 0
        if self.piece:
            n = min(n, self.piece)
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


class RecordingSink:
    """Keeps what it is given, and recycles buffers the way the S3 sink does."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.last: bytes | None = None
        self.allocated: list[int] = []  # bytes allocated by each buffer handed over
        self.aborted = False
        self.held: PartBuffer | None = None
        self.buffers: set[int] = set()

    def write_part(self, part: PartBuffer, sniffed: Sniffed) -> PartBuffer | None:
        self.parts.append(bytes(part.view()))
        self.allocated.append(len(part.data))
        self.buffers.add(id(part))
        free, self.held = self.held, part
        return free

    def finish(self, last: PartBuffer, result: Ingested) -> None:
        self.last = bytes(last.view())
        self.allocated.append(len(last.data))

    def abort(self) -> None:
        self.aborted = True


def run(
    data: bytes, piece: int | None = None, limits: Limits = LIMITS, **kw: object
) -> tuple[Ingested, RecordingSink]:
    sink = RecordingSink()
    result = Ingest(ReadSource(Source(data, piece).read), limits, sink, **kw).run()  # type: ignore[arg-type]
    return result, sink


@pytest.mark.parametrize("size", [1000, 5 * MiB - 1, 5 * MiB, 5 * MiB + 1, 15 * MiB, 17 * MiB + 3])
def test_parts_reassemble_to_the_body(size: int) -> None:
    data = Body(size).read_all()
    result, sink = run(data, piece=700_001)
    assert (result.size, result.blake3) == (size, blake3(data).hexdigest())
    assert b"".join(sink.parts) + (sink.last or b"") == data
    # Every part but the last is exactly one part size; the last is never empty.
    assert all(len(p) == 5 * MiB for p in sink.parts)
    assert sink.last
    # A body of at most one part is never split (it goes as one PUT).
    assert (len(sink.parts) == 0) == (size <= 5 * MiB)
    # Two buffers at most, whatever the length.
    assert len(sink.buffers) <= 2


@pytest.mark.parametrize("size", [1000, 1_000_003, 5 * MiB, 5 * MiB + 1, 11 * MiB + 7])
def test_a_declared_body_is_read_into_buffers_of_its_own_length(size: int) -> None:
    """A Content-Length body costs its own size in memory: its buffer is never grown (a
    grown buffer is a copy of everything read so far, and held twice for a moment)."""
    data = Body(size).read_all()
    result, sink = run(data, piece=65_536, declared_size=size)
    assert (result.size, result.blake3) == (size, blake3(data).hexdigest())
    assert b"".join(sink.parts) + (sink.last or b"") == data
    assert sink.allocated[0] == min(size, 5 * MiB)
    assert all(n == 5 * MiB for n in sink.allocated[1:])


def test_head_in_one_byte_pieces_gives_the_same_answer() -> None:
    data = jpeg(4000, 3000, orientation=6, pad=70_000)
    whole, _ = run(data)
    bytewise, _ = run(data, piece=1)
    assert whole == bytewise
    assert (whole.sniffed.width, whole.sniffed.height, whole.sniffed.orientation) == (3000, 4000, 6)


class CountingSource(Source):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.asked = 0

    def read(self, n: int) -> bytes:
        self.asked += n
        return super().read(n)


@pytest.mark.parametrize(
    ("head", "error"),
    [
        (b"plain text, certainly not an image" * 3, NotAnImage),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 100, UnsupportedFormat),
    ],
)
def test_rejection_reads_only_the_head(head: bytes, error: type[Exception]) -> None:
    source = CountingSource(head + b"\x00" * (20 * MiB))
    sink = RecordingSink()
    with pytest.raises(error):
        Ingest(ReadSource(source.read), LIMITS, sink).run()
    assert source.pos < 64 * 1024
    assert sink.parts == [] and sink.aborted


def test_pixel_limit() -> None:
    limits = replace(LIMITS, max_pixels=1000)
    with pytest.raises(TooManyPixels, match="above the limit of 1000"):
        run(png(40, 26), limits=limits)
    run(png(40, 25), limits=limits)


def test_size_limits() -> None:
    limits = replace(LIMITS, max_bytes=6 * MiB)
    data = Body(6 * MiB + 1).read_all()
    with pytest.raises(TooLarge):
        run(data, limits=limits, declared_size=len(data))  # refused before reading
    sink = RecordingSink()
    with pytest.raises(TooLarge):
        Ingest(ReadSource(Source(data).read), limits, sink).run()  # counted
    assert sink.aborted
    assert run(data[:-1], limits=limits)[0].size == 6 * MiB


def test_empty_and_short_bodies() -> None:
    with pytest.raises(EmptyBody):
        run(b"")
    data = png()
    with pytest.raises(ClientDisconnected, match="ended after"):
        run(data, declared_size=len(data) + 10)


def test_digests() -> None:
    data = png(9, 9)
    good = {"sha256": hashlib.sha256(data).digest()}
    assert run(data, expected_digests=good)[0].size == len(data)
    sink = RecordingSink()
    with pytest.raises(DigestMismatch):
        Ingest(
            ReadSource(Source(data).read), LIMITS, sink, expected_digests={"sha256": b"\x00" * 32}
        ).run()
    assert sink.aborted


def test_abort_on_base_exceptions() -> None:
    def exploding(n: int) -> bytes:
        raise SystemExit(1)  # what gunicorn's sync worker raises on timeout

    sink = RecordingSink()
    with pytest.raises(SystemExit):
        Ingest(ReadSource(exploding), LIMITS, sink).run()
    assert sink.aborted
