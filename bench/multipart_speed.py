"""Throughput of api.multipart.FilePart.read against reading the raw body stream.

Usage: python -m bench.multipart_speed [MiB]   (default 512)

The body (a text field, then one file part of MiB random-looking mebibytes, then the close
delimiter) is generated on the fly by a generator-backed reader, so it is never held in memory.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterator

from api.multipart import open_file_part

MIB = 1024 * 1024
BOUNDARY = b"----bench7MA4YWxkTrZu0gW"


def body_pieces(mib: int) -> Iterator[bytes]:
    """The multipart body in pieces; the file content repeats one random mebibyte."""
    block = random.Random(7).randbytes(MIB)
    yield (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="title"\r\n\r\nbench\r\n'
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; '
        b'filename="big.bin"\r\nContent-Type: application/octet-stream\r\n\r\n'
    )
    for _ in range(mib):
        yield block
    yield b"\r\n--" + BOUNDARY + b"--\r\n"


def make_reader(pieces: Iterator[bytes]) -> Callable[[int], bytes]:
    """read(n) with gunicorn's contract: exactly n bytes, fewer only at EOF."""
    pending = memoryview(b"")

    def read(n: int) -> bytes:
        nonlocal pending
        out: list[bytes | memoryview] = []
        while n:
            if not pending:
                piece = next(pieces, None)
                if piece is None:
                    break
                pending = memoryview(piece)
            out.append(pending[:n])
            n -= len(out[-1])
            pending = pending[len(out[-1]) :]
        return b"".join(out)

    return read


def timed(label: str, read: Callable[[int], bytes], size: int) -> None:
    start = time.perf_counter()
    total = 0
    while data := read(size):
        total += len(data)
    elapsed = time.perf_counter() - start
    print(f"{label:<44} {total / MIB:8.0f} MiB {elapsed:6.2f} s {total / MIB / elapsed:8.0f} MiB/s")


def main() -> None:
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    for size in (MIB, 64 * 1024):
        timed(f"raw stream read({size // 1024} KiB)", make_reader(body_pieces(mib)), size)
        part = open_file_part(make_reader(body_pieces(mib)), BOUNDARY)
        timed(f"FilePart.read({size // 1024} KiB), chunk_size 1 MiB", part.read, size)


if __name__ == "__main__":
    main()
