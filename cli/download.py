"""`picstream get`: an original or a variant to a file, resumed and verified.

- A file that exists partially is continued with `Range: bytes=<its size>-` and `If-Range:
  "<blake3>"` (the ETag it was started with, kept in the file's `user.picstream.etag`
  extended attribute where the file system has them, else the record's). A `206` appends,
  a `200` (the bytes changed on the server since) starts the file again.
- A connection cut mid-body is retried the same way, with backoff, from what was written.
- At the end the whole file's BLAKE3 must equal the ETag (the API's ETag is the BLAKE3 of
  the bytes): a resumed file that does not is downloaded once more from the start, any
  other mismatch is an error.
- `-` writes to stdout (no resume; verified as it streams).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from blake3 import blake3

from cli.client import BACKOFF, Api, ApiError, NetworkError

XATTR = "user.picstream.etag"
CHUNK = 1024 * 1024
_EXTENSIONS = {"jpeg": "jpg", "tiff": "tif", "heif": "heic"}


class VerifyError(Exception):
    """The bytes do not have the BLAKE3 the server announced."""


@dataclass(frozen=True)
class Target:
    """What to download: its path on the server, its BLAKE3 and size per the record, and
    a default local name."""

    path: str
    blake3: str
    size: int | None
    name: str


@dataclass(frozen=True)
class Downloaded:
    file: str
    size: int
    blake3: str
    resumed_from: int

    def as_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "size": self.size,
            "blake3": self.blake3,
            "resumed_from": self.resumed_from,
        }


def target(record: dict[str, Any], variant: str | None) -> Target:
    """The original, or the named ready variant, of a record."""
    image_id = record["id"]
    if variant is None:
        ext = _EXTENSIONS.get(record.get("format") or "", record.get("format") or "bin")
        return Target(
            f"/v1/images/{image_id}/original",
            record["blake3"],
            record.get("size"),
            f"{image_id}.{ext}",
        )
    for item in record.get("variants") or []:
        if item.get("name") == variant and item.get("status") == "ready":
            return Target(
                f"/v1/images/{image_id}/variants/{variant}",
                item["blake3"],
                item.get("size"),
                f"{image_id}.{variant}",
            )
    ready = [v["name"] for v in record.get("variants") or [] if v.get("status") == "ready"]
    raise ApiError(
        404,
        "Not found",
        f"image {image_id!r} has no ready variant {variant!r}"
        + (f" (ready: {', '.join(ready)})" if ready else " (none is ready yet)"),
    )


def etag_digest(value: str | None) -> str | None:
    """The BLAKE3 hex of an ETag `"<hex>"` (weak or strong)."""
    if not value:
        return None
    return value.strip().removeprefix("W/").strip('"') or None


def file_blake3(path: Path) -> str:
    hasher = blake3()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            hasher.update(block)
    return str(hasher.hexdigest())


class Downloader:
    """Downloads from one server; `progress(done, total)` is told how far it got."""

    def __init__(self, api: Api, progress: Callable[[int, int | None], None] | None = None) -> None:
        self.api = api
        self.progress = progress or (lambda done, total: None)

    def to_file(self, what: Target, out: Path) -> Downloaded:
        """Download into `out`, continuing what it holds; verified."""
        have = out.stat().st_size if out.exists() else 0
        if have and have == what.size and file_blake3(out) == what.blake3:
            return Downloaded(str(out), have, what.blake3, have)  # already complete
        if what.size is not None and have > what.size:
            have = 0
        resumed_from = have
        digest, have = self._fetch(what, out, have)
        actual = file_blake3(out)
        if actual != digest and resumed_from:
            # What the file held was not a prefix of these bytes: start it again.
            resumed_from = 0
            digest, have = self._fetch(what, out, 0)
            actual = file_blake3(out)
        if actual != digest:
            raise VerifyError(f"{out}: BLAKE3 {actual} does not match the server's {digest}")
        _forget_etag(out)
        return Downloaded(str(out), have, actual, resumed_from)

    def to_stdout(self, what: Target) -> Downloaded:
        """Stream to stdout, hashing as it goes; an error at the end if it did not match."""
        hasher = blake3()
        stdout = sys.stdout.buffer
        with self.api.stream("GET", what.path) as resp:
            digest = etag_digest(resp.headers.get("etag")) or what.blake3
            size = 0
            for block in resp.iter_bytes(CHUNK):
                hasher.update(block)
                stdout.write(block)
                size += len(block)
            stdout.flush()
        if hasher.hexdigest() != digest:
            raise VerifyError(f"BLAKE3 {hasher.hexdigest()} does not match the server's {digest}")
        return Downloaded("-", size, digest, 0)

    def _fetch(self, what: Target, out: Path, have: int) -> tuple[str, int]:
        """Write the bytes from `have` on, retrying cuts from what was written; the digest
        the server announced and the file's size."""
        failures = 0
        while True:
            try:
                return self._once(what, out, have)
            except NetworkError:
                now = out.stat().st_size if out.exists() else 0
                failures = 0 if now > have else failures + 1
                have = now
                if failures >= len(BACKOFF):
                    raise
                time.sleep(BACKOFF[failures])

    def _once(self, what: Target, out: Path, have: int) -> tuple[str, int]:
        headers = {}
        if have:
            etag = _saved_etag(out) or f'"{what.blake3}"'
            headers = {"Range": f"bytes={have}-", "If-Range": etag}
        try:
            with self.api.stream("GET", what.path, headers) as resp:
                digest = etag_digest(resp.headers.get("etag")) or what.blake3
                if resp.status_code == 206 and _range_start(resp) == have:
                    mode = "r+b"
                else:  # the whole body: the file starts again
                    have, mode = 0, "wb"
                with open(out, mode) as f:
                    _remember_etag(out, digest)
                    f.seek(have)
                    have = self._copy(resp.iter_bytes(CHUNK), f, have, what.size)
                    f.truncate()
                return digest, have
        except ApiError as exc:
            if exc.status == 416 and have:  # longer than the bytes now are: start again
                return self._once(what, out, 0)
            raise

    def _copy(self, blocks: Any, f: IO[bytes], have: int, total: int | None) -> int:
        self.progress(have, total)
        for block in blocks:
            f.write(block)
            have += len(block)
            self.progress(have, total)
        return have


def _range_start(resp: Any) -> int | None:
    value = resp.headers.get("content-range", "")  # bytes a-b/size
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _saved_etag(path: Path) -> str | None:
    with contextlib.suppress(OSError, AttributeError):
        return f'"{os.getxattr(path, XATTR).decode()}"'
    return None


def _remember_etag(path: Path, digest: str) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setxattr(path, XATTR, digest.encode())


def _forget_etag(path: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.removexattr(path, XATTR)
