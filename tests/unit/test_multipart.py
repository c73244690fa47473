"""api.multipart: streaming the file part out of multipart/form-data bodies."""

from __future__ import annotations

import itertools
import random
import tracemalloc
from collections.abc import Callable, Iterable, Iterator

import pytest
from urllib3 import encode_multipart_formdata
from urllib3.fields import RequestField

from api.multipart import FilePart, open_file_part, parse_boundary
from core.errors import BadRequest, ClientDisconnected

B = b"----WebKitFormBoundary7MA4YWxkTrZu0gW"
Reader = Callable[[int], bytes]


class ChunkedReader:
    """read(n) giving min(n, next size) bytes per call (sizes cycle), then b'' forever."""

    def __init__(self, body: bytes, sizes: Iterable[int] = (1 << 30,)) -> None:
        self.body, self.pos, self.steps = memoryview(body), 0, itertools.cycle(sizes)
        self.saw_eof = False

    def __call__(self, n: int) -> bytes:
        assert n > 0
        take = min(n, next(self.steps), len(self.body) - self.pos)
        self.pos += take
        self.saw_eof = not take
        return bytes(self.body[self.pos - take : self.pos])


def read_all(part: FilePart, n: int) -> bytes:
    """All content via read(n), checking the exactly-n-until-the-end contract."""
    chunks: list[bytes] = []
    while chunk := part.read(n):
        assert not chunks or len(chunks[-1]) == n, "short read before the end"
        assert len(chunk) <= n
        chunks.append(chunk)
    assert part.read(n) == b""
    return b"".join(chunks)


def extract(
    body: bytes,
    boundary: bytes = B,
    *,
    n: int = 1 << 20,
    sizes: Iterable[int] = (1 << 30,),
    **limits: int,
) -> bytes:
    return read_all(open_file_part(ChunkedReader(body, sizes), boundary, **limits), n)


def part(headers: bytes, content: bytes, boundary: bytes = B) -> bytes:
    return b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + content + b"\r\n"


def file_headers(filename: bytes = b'"photo.jpg"', name: bytes = b'"file"') -> bytes:
    return (
        b"Content-Disposition: form-data; name="
        + name
        + b"; filename="
        + filename
        + b"\r\nContent-Type: image/jpeg"
    )


def body_with(
    content: bytes,
    *,
    before: bytes = b"",
    after: bytes = b"",
    headers: bytes | None = None,
    boundary: bytes = B,
) -> bytes:
    file_part = part(file_headers() if headers is None else headers, content, boundary)
    return before + file_part + after + b"--" + boundary + b"--\r\n"


def field(name: bytes, value: bytes, boundary: bytes = B) -> bytes:
    return part(b'Content-Disposition: form-data; name="' + name + b'"', value, boundary)


def file_of(headers: bytes, **limits: int) -> FilePart:
    return open_file_part(ChunkedReader(body_with(b"x", headers=headers)), B, **limits)


# --- parse_boundary -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("multipart/form-data; boundary=abc", b"abc"),
        ('multipart/form-data; boundary="abc"', b"abc"),
        ("Multipart/Form-Data;BOUNDARY=abc", b"abc"),
        ("multipart/form-data; charset=utf-8; boundary=----x123", b"----x123"),
        ('multipart/form-data; boundary="with space:?=()"', b"with space:?=()"),
        ("multipart/form-data; boundary=" + "a" * 70, b"a" * 70),
        (" multipart/form-data ;  boundary = abc ; foo=bar", b"abc"),
    ],
)
def test_parse_boundary_accepts(header: str, expected: bytes) -> None:
    assert parse_boundary(header) == expected


@pytest.mark.parametrize(
    "header",
    [
        "multipart/form-data",
        "multipart/form-data; boundary=",
        'multipart/form-data; boundary=""',
        "multipart/form-data; boundary=" + "a" * 71,
        'multipart/form-data; boundary="ends with space "',
        "multipart/form-data; boundary=a@b",
        "multipart/form-data; boundary=caf\u00e9",
        "multipart/form-data; boundary=a; boundary=b",
        'multipart/form-data; boundary="unterminated',
        "multipart/mixed; boundary=abc",
        "application/json",
        "",
    ],
)
def test_parse_boundary_rejects(header: str) -> None:
    with pytest.raises(BadRequest):
        parse_boundary(header)


# --- well-formed bodies ---------------------------------------------------------------------


def test_urllib3_body_with_fields_around_the_file() -> None:
    content = bytes(range(256)) * 50
    body, content_type = encode_multipart_formdata(
        [("title", "holiday"), ("photo", ("beach.jpg", content, "image/jpeg")), ("tags", "sea")]
    )
    read = ChunkedReader(body, (333,))
    part_ = open_file_part(read, parse_boundary(content_type), chunk_size=1000)
    assert (part_.field_name, part_.filename, part_.content_type) == (
        "photo",
        "beach.jpg",
        "image/jpeg",
    )
    assert read_all(part_, 1000) == content
    assert read.saw_eof  # the rest of the body was checked and consumed


@pytest.mark.parametrize(
    "boundary",
    [
        b"------------------------d74496d66958873e",  # curl
        b"----WebKitFormBoundaryE19zNvXGzXaLvS5C",  # Chromium
        b"----geckoformboundary4b5b6ac0c1a5b1e8b0f5b1d2e0d1e5a",  # Firefox
        b"x",
    ],
)
def test_client_style_bodies(boundary: bytes) -> None:
    body = body_with(
        b"\xff\xd8\xff\xe0JFIF", boundary=boundary, before=field(b"caption", b"hi", boundary)
    )
    part_ = open_file_part(ChunkedReader(body), boundary)
    assert part_.filename == "photo.jpg"
    assert read_all(part_, 4) == b"\xff\xd8\xff\xe0JFIF"


TRICKY = [
    b"",
    b"\r",
    b"\r\n",
    b"\r\n-",
    b"\r\n--",
    b"a\r\n--" + B[:-1],
    b"\r\n--" + B[:-1] + b"\r\n",
    b"--" + B + b"\r\n",  # a boundary without the CRLF before it is content
    b"\r\n\r\n--\r\n--" + B[:10] + b"\r\r\n--" + B[:-3],
    b"\r\n" * 40 + b"-" * 40,
    b"payload\r\n--" + B[:20],
]


@pytest.mark.parametrize("content", TRICKY)
def test_content_is_exact_at_every_split_point(content: bytes) -> None:
    body = body_with(content, before=field(b"f", b"\r\n--" + B[:-1]), after=field(b"g", b"v"))
    for first in range(1, len(body) + 1):
        for n in (1, 7, 4096):
            assert extract(body, n=n, sizes=(first, len(body))) == content, (first, n)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 16, 64])
@pytest.mark.parametrize("step", [1, 2, 3, 7, 50])
def test_small_chunk_sizes_and_trickling_reader(chunk_size: int, step: int) -> None:
    content = b"|".join(TRICKY)
    assert b"\r\n--" + B not in content
    body = body_with(content, before=b"preamble\r\n" + field(b"f", b"value"))
    for n in (1, 3, 1000):
        assert extract(body, n=n, sizes=(step,), chunk_size=chunk_size) == content


def test_randomised_bodies() -> None:
    rng = random.Random(20240521)
    fragments = [b"\r", b"\n", b"-", b"\r\n--", B[:1], B[: len(B) // 2], B[:-1], b"x", b"\x00"]
    for _ in range(150):
        content = b"".join(rng.choice(fragments) for _ in range(rng.randrange(0, 40)))
        assert b"\r\n--" + B not in content
        fields = b"".join(field(b"f%d" % i, rng.choice(fragments) * 3) for i in range(3))
        body = body_with(content, before=fields, after=fields)
        sizes = [rng.randrange(1, 40) for _ in range(7)]
        n = rng.randrange(1, 60)
        got = extract(body, n=n, sizes=sizes, chunk_size=rng.choice([1, 8, 33, 4096]))
        assert got == content


def test_empty_file_and_empty_filename() -> None:
    # What a browser sends for a file input left empty.
    headers = (
        b'Content-Disposition: form-data; name="file"; filename=""\r\n'
        b"Content-Type: application/octet-stream"
    )
    part_ = open_file_part(ChunkedReader(body_with(b"", headers=headers)), B)
    assert part_.filename == ""
    assert part_.read(10) == b""
    assert part_.read(10) == b""


def test_preamble_epilogue_and_transport_padding() -> None:
    body = (
        b"This is the preamble.\r\n--" + B + b" \t\r\n" + file_headers() + b"\r\n\r\ndata"
        b"\r\n--" + B + b"--  \r\nepilogue, ignored\r\n--" + B + b"\r\n"
    )
    assert extract(body) == b"data"


def test_close_delimiter_without_final_crlf() -> None:
    assert extract(body_with(b"data")[:-2]) == b"data"


def test_part_without_content_type() -> None:
    headers = b'Content-Disposition: form-data; name="upload"; filename="a.bin"'
    part_ = open_file_part(ChunkedReader(body_with(b"1", headers=headers)), B)
    assert (part_.field_name, part_.content_type) == ("upload", None)


def test_large_content_in_big_and_odd_reads() -> None:
    content = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    body = body_with(content, before=field(b"a", b"b"))
    assert extract(body, n=1024 * 1024) == content
    assert extract(body, n=65536, sizes=(99_991,), chunk_size=300_000) == content


# --- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disposition", "expected"),
    [
        (b'filename="plain.jpg"', "plain.jpg"),
        (b"filename=token.jpg", "token.jpg"),
        (b'filename="a\\"b.jpg"', 'a"b.jpg'),  # RFC 2616 quoted-pair (curl --form-escape)
        (b'filename="a\\\\b.jpg"', "a\\b.jpg"),
        (b'filename="dir\\file.jpg"', "dir\\file.jpg"),  # WHATWG: backslash sent as is
        (b'filename="trailing\\"', "trailing\\"),
        (b'filename="a%22b.jpg"', "a%22b.jpg"),  # WHATWG-escaped quote stays raw
        (b'filename="semi;colon.jpg"', "semi;colon.jpg"),
        ('filename="caf\u00e9.jpg"'.encode(), "caf\u00e9.jpg"),  # browsers send raw UTF-8
        (b'filename="caf\xe9.jpg"', "caf\u00e9.jpg"),  # not UTF-8: read as Latin-1
        (b"filename*=UTF-8''%E2%82%AC%20rates.jpg", "\u20ac rates.jpg"),
        (b"filename=\"fallback.jpg\"; filename*=utf-8''%E2%82%AC.jpg", "\u20ac.jpg"),
        (b"filename*=UTF-8'en'%E2%82%AC.jpg; filename=\"fallback.jpg\"", "\u20ac.jpg"),
        (b"filename*=iso-8859-1''caf%E9.jpg", "caf\u00e9.jpg"),
        (b"filename=\"fallback.jpg\"; filename*=koi8-r''%C1.jpg", "fallback.jpg"),
        (b"filename=\"fallback.jpg\"; filename*=UTF-8''%FF.jpg", "fallback.jpg"),
        (b"filename*=nonsense", None),
    ],
)
def test_filename_parameters(disposition: bytes, expected: str | None) -> None:
    headers = b'Content-Disposition: form-data; name="file"; ' + disposition
    assert file_of(headers).filename == expected


def test_urllib3_encodes_awkward_filenames_readably() -> None:
    field_ = RequestField("file", b"x", filename='na"me\u00e9.jpg')
    field_.make_multipart(content_type="image/png")
    body, content_type = encode_multipart_formdata([field_], boundary=B.decode())
    part_ = open_file_part(ChunkedReader(body), parse_boundary(content_type))
    assert (part_.filename, part_.content_type) == ("na%22me\u00e9.jpg", "image/png")


def test_header_names_and_disposition_are_case_insensitive() -> None:
    headers = (
        b'content-DISPOSITION:Form-Data;NAME="f";FILENAME="x.png"\r\nCONTENT-TYPE:  image/png  '
    )
    part_ = file_of(headers)
    assert (part_.field_name, part_.filename, part_.content_type) == ("f", "x.png", "image/png")


def test_folded_header_line() -> None:
    headers = b'Content-Disposition: form-data; name="f";\r\n filename="x.png"'
    assert file_of(headers).filename == "x.png"


@pytest.mark.parametrize(
    "headers",
    [
        b"Content-Type: image/png",  # no Content-Disposition
        b'Content-Disposition: attachment; filename="x.png"',
        b'Content-Disposition: form-data; name="f"; filename="x.png"\r\nno colon here',
        b'Content-Disposition: form-data; name="f"; filename="x.png"\nContent-Type: a/b',  # LF
        b'Content-Disposition: form-data; name="f"; filename="x.png"\r\nContent-Type : a/b',
        b'Content-Disposition: form-data; name="f"; filename="a"; filename="b"',
        b'Content-Disposition: form-data; name="f"; filename="x"\r\nContent-Disposition: x',
        b'Content-Disposition: form-data; name="f"; filename="unterminated',
        b'Content-Disposition: form-data; name="f"; filename="x" junk',
        b'Content-Disposition: form-data; name; filename="x"',
    ],
)
def test_malformed_part_headers(headers: bytes) -> None:
    with pytest.raises(BadRequest):
        file_of(headers)


def test_part_without_headers() -> None:
    body = b"--" + B + b"\r\n\r\ncontent\r\n--" + B + b"--\r\n"
    with pytest.raises(BadRequest, match="Content-Disposition"):
        open_file_part(ChunkedReader(body), B)


def test_header_size_limit() -> None:
    base = file_headers()
    fits = base + b"\r\nX-Pad: " + b"p" * (200 - len(base) - 9)
    assert len(fits) == 200
    assert extract(body_with(b"ok", headers=fits), max_header_bytes=200, chunk_size=7) == b"ok"
    with pytest.raises(BadRequest, match="headers exceed 200 bytes"):
        extract(body_with(b"ok", headers=fits + b"p"), max_header_bytes=200, chunk_size=7)


def test_endless_header_block_is_cut_off() -> None:
    endless = b"--" + B + b"\r\n" + b"X-Pad: " + b"p" * 10_000_000
    with pytest.raises(BadRequest, match="headers exceed"):
        open_file_part(ChunkedReader(endless), B)


def test_endless_delimiter_line_is_cut_off() -> None:
    with pytest.raises(BadRequest, match="delimiter line"):
        open_file_part(ChunkedReader(b"--" + B + b" " * 10_000_000), B)


# --- malformed and truncated bodies ---------------------------------------------------------


def test_no_file_part() -> None:
    body = field(b"a", b"1") + field(b"b", b"2") + b"--" + B + b"--\r\n"
    with pytest.raises(BadRequest, match=r"^multipart body has no file part$"):
        open_file_part(ChunkedReader(body), B)


@pytest.mark.parametrize("body", [b"", b"just some bytes", body_with(b"x", boundary=b"other")])
def test_body_without_the_boundary(body: bytes) -> None:
    with pytest.raises(BadRequest):
        open_file_part(ChunkedReader(body), B)


@pytest.mark.parametrize("second", [b'"b.jpg"', b'""'])
def test_two_files(second: bytes) -> None:
    body = body_with(b"first", after=field(b"x", b"y") + part(file_headers(second), b"second"))
    part_ = open_file_part(ChunkedReader(body), B)
    assert part_.read(5) == b"first"
    with pytest.raises(BadRequest, match=r"^only one file per request$"):
        part_.read(5)


@pytest.mark.parametrize(
    "junk",
    [b"X\r\n", b"-\r\n", b"\r", b"\n" + file_headers(), b"x--"],
)
def test_delimiter_followed_by_junk(junk: bytes) -> None:
    body = b"--" + B + b"\r\n" + file_headers() + b"\r\n\r\ndata\r\n--" + B + junk + b"\r\n\r\n"
    with pytest.raises(BadRequest):
        extract(body)


def test_lf_only_body_is_rejected() -> None:
    body = body_with(b"data", before=field(b"a", b"b")).replace(b"\r\n", b"\n")
    with pytest.raises(BadRequest):
        extract(body)


def truncation_outcome(
    body: bytes, cut: int, n: int, sizes: Iterable[int]
) -> BadRequest | ClientDisconnected:
    try:
        extract(body[:cut], n=n, sizes=sizes, chunk_size=5)
    except (BadRequest, ClientDisconnected) as exc:
        return exc
    raise AssertionError(f"a body cut at {cut} was accepted")


def test_truncated_body_at_every_offset() -> None:
    body = body_with(b"content\r\n--", before=field(b"a", b"1"), after=field(b"b", b"2"))
    complete = len(body) - 2  # the CRLF after the close delimiter is optional
    first_delimiter = len(b"--" + B)
    for cut in range(complete):
        expected = BadRequest if cut < first_delimiter else ClientDisconnected
        for n, sizes in ((1, (1,)), (4, (3, 11)), (1 << 20, (1 << 30,))):
            outcome = truncation_outcome(body, cut, n, sizes)
            assert type(outcome) is expected, (cut, n)
            if expected is ClientDisconnected:
                assert outcome.detail == "request body ended before the multipart closing boundary"


def test_skipped_bytes_before_the_file_are_bounded() -> None:
    fields = field(b"a", b"x" * 500) + field(b"b", b"y" * 500)
    body = body_with(b"data", before=fields)
    assert extract(body, max_skipped_bytes=len(fields) + 100) == b"data"
    with pytest.raises(BadRequest, match="before the file exceed"):
        extract(body, max_skipped_bytes=900)
    many_empty_fields = field(b"e", b"") * 100
    with pytest.raises(BadRequest, match="before the file exceed"):
        extract(body_with(b"data", before=many_empty_fields), max_skipped_bytes=1000)
    with pytest.raises(BadRequest, match="before the file exceed"):
        extract(body_with(b"data", before=b"p" * 2000), max_skipped_bytes=1000)


def test_skipped_bytes_after_the_file_are_bounded() -> None:
    after = field(b"a", b"x" * 2000)
    assert extract(body_with(b"data", after=after), max_skipped_bytes=2200) == b"data"
    with pytest.raises(BadRequest, match="after the file exceed"):
        extract(body_with(b"data", after=after), max_skipped_bytes=1000)
    with pytest.raises(BadRequest, match="after the file exceed"):
        extract(body_with(b"data") + b"e" * 2000, max_skipped_bytes=1000)


# --- the underlying stream ------------------------------------------------------------------


@pytest.mark.parametrize("error", [TimeoutError("timed out"), OSError("reset"), ValueError("x")])
@pytest.mark.parametrize("fail_after", [0, 10, 200, 250])
def test_reader_errors_propagate_unchanged(error: Exception, fail_after: int) -> None:
    body = body_with(b"z" * 100, before=field(b"a", b"b"))
    good = ChunkedReader(body, (3,))
    served = 0

    def failing(n: int) -> bytes:
        nonlocal served
        if served >= fail_after:
            raise error
        data = good(n)
        served += len(data)
        return data

    with pytest.raises(type(error)) as caught:
        read_all(open_file_part(failing, B, chunk_size=4), 8)
    assert caught.value is error


def test_read_requires_a_positive_size() -> None:
    part_ = open_file_part(ChunkedReader(body_with(b"x")), B)
    with pytest.raises(ValueError, match="positive"):
        part_.read(0)


def generated(pieces: Iterator[bytes], asked: list[int]) -> Reader:
    """A reader over generated pieces; records every size it is asked for."""
    pending = memoryview(b"")

    def read(n: int) -> bytes:
        nonlocal pending
        asked.append(n)
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


def test_streams_in_bounded_memory() -> None:
    mib = 1024 * 1024
    block = random.Random(3).randbytes(mib)

    def pieces() -> Iterator[bytes]:
        yield part(file_headers(), b"")[:-2]
        yield from itertools.repeat(block, 48)
        yield b"\r\n--" + B + b"--\r\n"

    asked: list[int] = []
    tracemalloc.start()
    try:
        part_ = open_file_part(generated(pieces(), asked), B, chunk_size=mib)
        total = 0
        while chunk := part_.read(mib):
            assert chunk[:16] == block[:16]  # the content lines up with the blocks
            total += len(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == 48 * mib
    assert max(asked) <= mib
    assert peak < 6 * mib
