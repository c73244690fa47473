"""Range, conditional requests, Content-Disposition, signed links: the pure rules."""

from __future__ import annotations

import pytest

from api.http import (
    ByteRange,
    Unsatisfiable,
    content_disposition,
    etag_matches,
    if_range_allows,
    parse_range,
)
from core.signing import sign, verify


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
    ],
)
def test_parse_range(header: str | None, size: int, expected: ByteRange | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=100-", 100), ("bytes=-0", 100), ("bytes=0-", 0), ("bytes=-5", 0)]
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
