"""Range, conditional requests, Content-Disposition, signed links, Accept, Repr-Digest: the
pure rules."""

from __future__ import annotations

import base64
import hashlib

import pytest

from api.digest import parse_repr_digest
from api.http import (
    ByteRange,
    Unsatisfiable,
    content_disposition,
    etag_matches,
    if_range_allows,
    parse_range,
)
from api.negotiation import accepted_formats, best_variant
from core.errors import BadRequest
from core.models import ImageRecord, Variant
from core.signing import sign, verify

HUGE = "9" * 4400  # more digits than int() converts (sys.get_int_max_str_digits: 4300)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, ByteRange(0, 9)),
        ("bytes=90-", 100, ByteRange(90, 99)),
        ("bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=-1000", 100, ByteRange(0, 99)),  # suffix longer than the body: all of it
        ("bytes=50-1000", 100, ByteRange(50, 99)),  # end past the body is clamped
        ("bytes=0-0", 1, ByteRange(0, 0)),
        (" bytes = 5 - 6 ", 100, ByteRange(5, 6)),
        ("bytes=0-9,20-29", 100, None),  # several ranges: we send everything (allowed)
        ("items=0-9", 100, None),  # another unit: ignored
        ("bytes=9-0", 100, None),  # invalid: ignored
        ("bytes=abc", 100, None),
        ("bytes=-", 100, None),
        ("BYTES=1-2", 100, ByteRange(1, 2)),  # range units are case-insensitive
        ("Bytes=-10", 100, ByteRange(90, 99)),
        ("bytes=" + HUGE, 100, None),  # no dash: not a range at all
        ("bytes=0-" + HUGE, 100, ByteRange(0, 99)),  # a last-pos past any end is the end
        ("bytes=-" + HUGE, 100, ByteRange(0, 99)),  # a suffix longer than any body: all
        ("bytes=" + "0" * 4400 + "5-" + "0" * 4400 + "6", 100, ByteRange(5, 6)),
        (f"bytes={HUGE}9-{HUGE}", 100, None),  # last-pos before first-pos: ignored
        ("bytes=\u0663-5", 100, None),  # a digit to re's \d and int(), not to HTTP
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=-5", 0),
        (f"bytes={HUGE}-", 100),  # a valid first-pos past the end
        (f"bytes={HUGE}-{HUGE}9", 100),
        ("bytes=18446744073709551616-", 100),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_content_range() -> None:
    assert ByteRange(90, 99).content_range(100) == "bytes 90-99/100"
    assert ByteRange(90, 99).length == 10


def test_conditionals() -> None:
    etag = '"abc"'
    assert etag_matches('"abc"', etag)
    assert etag_matches('W/"abc"', etag)
    assert etag_matches('"x", "abc"', etag)
    assert etag_matches("*", etag)
    assert not etag_matches('"abd"', etag)
    assert not etag_matches(None, etag)
    assert if_range_allows(None, etag)
    assert if_range_allows('"abc"', etag)
    assert not if_range_allows('W/"abc"', etag)  # If-Range needs a strong match
    assert not if_range_allows("Sat, 21 Nov 2026 12:00:00 GMT", etag)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (None, "inline"),
        ("photo.jpg", 'inline; filename="photo.jpg"'),
        ("été.jpg", "inline; filename=\"ete.jpg\"; filename*=UTF-8''%C3%A9t%C3%A9.jpg"),
        ('a"b\\c.png', "inline; filename=\"a_b_c.png\"; filename*=UTF-8''a%22b%5Cc.png"),
        (
            "x\r\nSet-Cookie: a=b",
            "inline; filename=\"xSet-Cookie_ a=b\"; filename*=UTF-8''xSet-Cookie%3A%20a%3Db",
        ),
        ("写真.heic", "inline; filename=\"image.heic\"; filename*=UTF-8''%E5%86%99%E7%9C%9F.heic"),
        ("\x00\x01", "inline"),
    ],
)
def test_content_disposition_never_injects(name: str | None, expected: str) -> None:
    header = content_disposition(name)
    assert header == expected
    assert "\r" not in header and "\n" not in header
    assert all(32 <= ord(ch) < 127 for ch in header)


def test_signed_links() -> None:
    key = b"k" * 32
    query = dict(
        part.split("=")
        for part in sign(key, "/v1/images/a/original", "alice", 60, now=1000).split("&")
    )
    assert query["owner"] == "alice" and query["expires"] == "1060"
    ok = ("/v1/images/a/original", "alice", query["expires"], query["sig"])
    assert verify(key, *ok, now=1059)
    assert verify(key, *ok, now=1060)
    assert not verify(key, *ok, now=1061)  # expired
    assert not verify(b"x" * 32, *ok, now=1000)  # another key
    assert not verify(key, "/v1/images/b/original", *ok[1:], now=1000)  # another path
    assert not verify(key, ok[0], "bob", *ok[2:], now=1000)  # another owner
    assert not verify(key, ok[0], ok[1], "99999", ok[3], now=1000)  # extended expiry
    assert not verify(key, *ok[:3], ok[3][:-1] + "0", now=1000)  # tampered signature
    assert not verify(key, ok[0], ok[1], "soon", ok[3], now=1000)


@pytest.mark.parametrize(
    ("accept", "formats"),
    [
        (None, {"jpeg", "png", "gif"}),
        ("", {"jpeg", "png", "gif"}),
        ("image/avif,image/webp,*/*", {"avif", "webp", "jpeg", "png", "gif"}),
        ("*/*", {"jpeg", "png", "gif"}),  # wildcards never grant AVIF/WebP
        ("image/*", {"jpeg", "png", "gif"}),
        ("image/avif;q=0.0,image/webp", {"webp", "jpeg", "png", "gif"}),
        ("image/avif;q=0.00", {"jpeg", "png", "gif"}),
        ("image/avif;q=0.000", {"jpeg", "png", "gif"}),
        ("image/avif;q=0", {"jpeg", "png", "gif"}),
        ("image/avif;Q=0", {"jpeg", "png", "gif"}),
        ("image/avif ; q = 0 ", {"jpeg", "png", "gif"}),
        ("IMAGE/AVIF;q=0.001", {"avif", "jpeg", "png", "gif"}),
        ("image/avif;q=0.5", {"avif", "jpeg", "png", "gif"}),
        ("image/avif;q=1.000", {"avif", "jpeg", "png", "gif"}),
        ("image/avif;q=2", {"jpeg", "png", "gif"}),  # not a qvalue: the member is ignored
        ("image/avif;q=0.0001", {"jpeg", "png", "gif"}),
        ("image/avif;q=abc", {"jpeg", "png", "gif"}),
        ("image/avif, image/avif;q=0", {"jpeg", "png", "gif"}),  # a refusal stands
        ('image/avif;x="a,image/webp;q=1";q=1', {"avif", "jpeg", "png", "gif"}),
        ("image/*;q=0", set()),
        ("image/*;q=0,image/png", {"png"}),
        ("image/*;q=0,image/webp", {"webp"}),
        ("*/*;q=0", set()),
        ("image/*;q=0.5,*/*;q=0", {"jpeg", "png", "gif"}),  # the more specific range wins
        ("image/jpeg;q=0", {"png", "gif"}),
        ("text/html", {"jpeg", "png", "gif"}),  # baseline formats unless refused
        ("garbage;;,,;q=", {"jpeg", "png", "gif"}),
    ],
)
def test_accepted_formats(accept: str | None, formats: set[str]) -> None:
    assert set(accepted_formats(accept)) == formats


def _record(*variants: tuple[str, str, int]) -> ImageRecord:
    return ImageRecord(
        id="a",
        owner="alice",
        size=1,
        blake3="0" * 64,
        format="jpeg",
        content_type="image/jpeg",
        width=2048,
        height=1536,
        orientation=1,
        filename=None,
        created_at="2026-11-21T12:00:00.000Z",
        variants=tuple(
            Variant(name, "ready", fmt, width, 1, 1, "0" * 64) for name, fmt, width in variants
        ),
    )


@pytest.mark.parametrize(
    ("accept", "width", "chosen"),
    [
        ("image/avif,image/webp,*/*", 200, "w256.avif"),
        ("image/avif;q=0.5,image/webp;q=0.9", 200, "w256.webp"),  # the client's weights
        ("image/avif,image/webp", 200, "w256.avif"),  # equal weights: the smaller format
        ("image/webp;q=0.1", 200, "w256.webp"),  # named beats the unnamed default
        ("image/avif;q=0,image/webp;q=0", 300, "w1024.jpeg"),
        ("image/avif", 5000, "w1024.avif"),  # wider than anything: the widest
    ],
)
def test_best_variant(accept: str, width: int, chosen: str) -> None:
    record = _record(
        ("w256.avif", "avif", 256),
        ("w256.webp", "webp", 256),
        ("w256.jpeg", "jpeg", 256),
        ("w1024.avif", "avif", 1024),
        ("w1024.webp", "webp", 1024),
        ("w1024.jpeg", "jpeg", 1024),
    )
    assert best_variant(record, width, accept).name == chosen


def _sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def test_repr_digest() -> None:
    digest = _sha256(b"x")
    assert parse_repr_digest(f"sha-256=:{digest}:") == {"sha256": hashlib.sha256(b"x").digest()}
    assert parse_repr_digest(f"unixsum=:AA==:, sha-256=:{digest}:").keys() == {"sha256"}
    assert parse_repr_digest(None) == {}


@pytest.mark.parametrize(
    "header",
    [
        f"sha-256=:{_sha256(b'x')}:, sha-256=:{_sha256(b'y')}:",
        f"sha-256=:{_sha256(b'x')}:,sha-256=:{_sha256(b'x')}:",  # even when they agree
        "unixsum=:AA==:, unixsum=:AA==:",
    ],
)
def test_repr_digest_refuses_a_member_twice(header: str) -> None:
    with pytest.raises(BadRequest, match="more than once"):
        parse_repr_digest(header)


@pytest.mark.parametrize("sig", ["\u00e9", "\udcff", "\uff21\uff22", "0" * 64 + "\u00e9", ""])
def test_a_non_ascii_or_empty_signature_is_refused_not_an_error(sig: str) -> None:
    assert verify(b"k" * 32, "/v1/images/x/original", "alice", "9999999999", sig) is False


@pytest.mark.parametrize("expires", ["١٢٣٤٥٦٧٨٩٠", "+9999999999", " 9999999999", "9_999_999_999"])
def test_expiry_must_be_plain_digits(expires: str) -> None:
    key = b"k" * 32
    query = dict(part.split("=") for part in sign(key, "/p", "alice", 60).split("&"))
    assert verify(key, "/p", "alice", query["expires"], query["sig"]) is True
    assert verify(key, "/p", "alice", expires, query["sig"]) is False
